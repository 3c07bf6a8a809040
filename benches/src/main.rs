//! `hush-bench`: drives a relay with real clients over loopback QUIC and reports what it
//! delivered, how fast, and with what latency.
//!
//! The `envelopes` scenario isolates the relay: N senders and N receivers exchange opaque
//! envelopes (no end-to-end encryption), every send is durably committed before the relay
//! acknowledges it, and every delivery is checked for loss and duplication.
//!
//! The `calls` scenario (see `calls.rs`) carries concurrent 1:1 call media through the
//! relay, and the same load through coturn side by side.

mod calls;
mod turn;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use hush_client::protocol::{DeviceAddress, EnvelopeId};
use hush_client::{ConnectOptions, Connection, DeviceKey, Event, Trust};
use hush_server::clock::SystemClock;
use hush_server::config::Config;
use hush_server::Relay;

#[derive(Parser)]
#[command(
    name = "hush-bench",
    about = "Load-testing bench client for the Hush relay"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N senders and N receivers exchanging opaque envelopes through the relay.
    Envelopes(EnvelopeArgs),
    /// Concurrent 1:1 calls (50 frames/s each way, 160 B), optionally beside coturn.
    Calls(calls::CallArgs),
}

#[derive(clap::Args, Clone)]
struct EnvelopeArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 16)]
    pairs: usize,
    /// How long to send.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Envelope payload size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Open loop: total sends per second, spread over the senders. Without it, closed loop:
    /// each sender keeps `--window` sends in flight.
    #[arg(long)]
    rate: Option<u64>,
    /// Closed loop: sends in flight per sender.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// A running relay to use instead of starting one (needs --fingerprint).
    #[arg(long, requires = "fingerprint")]
    relay: Option<SocketAddr>,
    /// The running relay's certificate fingerprint (hex).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {text:?} (use ms, s or m)")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.scenario {
        Scenario::Envelopes(args) => runtime.block_on(envelopes(args)),
        Scenario::Calls(args) => runtime.block_on(calls::calls(args)),
    }
}

/// Payload header: send time (ns since the bench's epoch), sender, sequence.
const HEADER: usize = 16;

struct Tally {
    delivered: AtomicU64,
    duplicates: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    seen: Mutex<HashSet<u64>>,
}

async fn envelopes(args: EnvelopeArgs) -> anyhow::Result<()> {
    if args.size < HEADER {
        bail!("--size must be at least {HEADER}");
    }
    let (relay, _data, options) = if let (Some(address), Some(fingerprint)) =
        (&args.relay, &args.fingerprint)
    {
        let pin: [u8; 32] = hex::decode(fingerprint)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("fingerprint must be 32 bytes of hex"))?;
        (
            None,
            None,
            ConnectOptions::new(*address, Trust::Pinned(pin)),
        )
    } else {
        let data = tempfile::tempdir()?;
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data.path().to_owned(),
            ..Config::default()
        };
        let relay = Relay::start(config, Arc::new(SystemClock)).await?;
        let options = ConnectOptions::new(relay.local_addr(), Trust::Pinned(relay.fingerprint()));
        (Some(relay), Some(data), options)
    };

    // Register everyone first; only then does the clock start.
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..args.pairs {
        let sender = Connection::connect(&options)
            .await
            .context("connecting a sender")?;
        sender
            .register(b"bench", &DeviceKey::generate(), None)
            .await?;
        senders.push(Arc::new(sender));
        let receiver = Connection::connect(&options)
            .await
            .context("connecting a receiver")?;
        let address = receiver
            .register(b"bench", &DeviceKey::generate(), None)
            .await?;
        receivers.push((Arc::new(receiver), address));
    }

    let tally = Arc::new(Tally {
        delivered: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        seen: Mutex::new(HashSet::new()),
    });
    let epoch = Instant::now();
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut receiver_tasks = Vec::new();
    for (receiver, _) in &receivers {
        receiver_tasks.push(tokio::spawn(receive(
            receiver.clone(),
            tally.clone(),
            epoch,
            stop_receiving.clone(),
        )));
    }

    let commits_before = relay.as_ref().map(Relay::commit_counts);
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = epoch + args.duration;
    let mut sender_tasks = Vec::new();
    for (index, sender) in senders.iter().enumerate() {
        let to = receivers[index].1;
        let job = SendJob {
            connection: sender.clone(),
            to,
            index: index as u32,
            size: args.size,
            epoch,
            deadline,
            acked: acked.clone(),
            failed: failed.clone(),
        };
        match args.rate {
            Some(rate) => {
                let per_sender = (rate as f64 / args.pairs as f64).max(0.001);
                sender_tasks.push(tokio::spawn(job.open_loop(per_sender, tally.clone())));
            }
            None => {
                for lane in 0..args.window {
                    sender_tasks.push(tokio::spawn(job.clone().closed_loop(lane, args.window)));
                }
            }
        }
    }
    for task in sender_tasks {
        task.await?;
    }
    let send_elapsed = epoch.elapsed();
    let delivered_at_deadline = tally.delivered.load(Ordering::Relaxed);
    let commits_after = relay.as_ref().map(Relay::commit_counts);

    // Let in-flight envelopes arrive, then check the counts.
    let acked_total = acked.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while tally.delivered.load(Ordering::Relaxed) < acked_total && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_receiving.store(true, Ordering::Relaxed);
    for receiver in &receivers {
        receiver.0.close();
    }
    for task in receiver_tasks {
        let _ = task.await;
    }

    let delivered = tally.delivered.load(Ordering::Relaxed);
    let duplicates = tally.duplicates.load(Ordering::Relaxed);
    let lost = acked_total.saturating_sub(delivered);
    let seconds = send_elapsed.as_secs_f64();
    let latency = tally
        .latency
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let commits = match (commits_before, commits_after) {
        (Some(before), Some(after)) => Some((after.0 - before.0, after.1 - before.1)),
        _ => None,
    };

    let mode = match args.rate {
        Some(rate) => format!("open loop, {rate} msgs/s offered"),
        None => format!("closed loop, {} in flight per sender", args.window),
    };
    println!(
        "hush-bench envelopes: {} pairs, {} B payloads, {mode}, {:.1} s",
        args.pairs, args.size, seconds
    );
    println!(
        "  sent (acknowledged, durable) {acked_total:>10}   failed sends {:>6}",
        failed.load(Ordering::Relaxed)
    );
    println!(
        "  delivered                    {delivered:>10}   lost {lost}   duplicated {duplicates}"
    );
    println!(
        "  delivered msgs/s             {:>10.0}",
        delivered_at_deadline as f64 / seconds
    );
    println!(
        "  send->deliver latency ms     p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.9)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(latency.max())
    );
    if let Some((commits, writes)) = commits {
        println!(
            "  group commit                 {:.0} fsyncs/s, {:.1} writes per fsync",
            commits as f64 / seconds,
            writes as f64 / commits.max(1) as f64
        );
    }

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "envelopes",
            "config": {
                "pairs": args.pairs, "size": args.size, "duration_s": seconds,
                "rate": args.rate, "window": args.window, "durable": true,
            },
            "sent_acknowledged": acked_total,
            "failed_sends": failed.load(Ordering::Relaxed),
            "delivered": delivered,
            "lost": lost,
            "duplicated": duplicates,
            "delivered_per_s": delivered_at_deadline as f64 / seconds,
            "latency_ms": {
                "p50": ms(latency.value_at_quantile(0.5)),
                "p90": ms(latency.value_at_quantile(0.9)),
                "p99": ms(latency.value_at_quantile(0.99)),
                "p99_9": ms(latency.value_at_quantile(0.999)),
                "max": ms(latency.max()),
            },
            "fsyncs_per_s": commits.map(|(c, _)| c as f64 / seconds),
            "writes_per_fsync": commits.map(|(c, w)| w as f64 / c.max(1) as f64),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    drop(senders);
    if let Some(relay) = relay {
        relay.shutdown().await;
    }
    if lost > 0 || duplicates > 0 {
        bail!("{lost} acknowledged messages lost, {duplicates} duplicated");
    }
    Ok(())
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

#[derive(Clone)]
struct SendJob {
    connection: Arc<Connection>,
    to: DeviceAddress,
    index: u32,
    size: usize,
    epoch: Instant,
    deadline: Instant,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl SendJob {
    fn payload(&self, sequence: u32, sent_at: Instant) -> Vec<u8> {
        let mut payload = vec![0x5A; self.size];
        let nanos = sent_at.duration_since(self.epoch).as_nanos() as u64;
        payload[..8].copy_from_slice(&nanos.to_be_bytes());
        payload[8..12].copy_from_slice(&self.index.to_be_bytes());
        payload[12..16].copy_from_slice(&sequence.to_be_bytes());
        payload
    }

    async fn send(&self, sequence: u32, intended: Instant) {
        match self
            .connection
            .send_to(&[self.to], self.payload(sequence, intended))
            .await
        {
            Ok(()) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Keeps one send in flight on this lane; lanes interleave sequence numbers.
    async fn closed_loop(self, lane: usize, lanes: usize) {
        let mut sequence = lane as u32;
        while Instant::now() < self.deadline {
            self.send(sequence, Instant::now()).await;
            sequence += lanes as u32;
        }
    }

    /// Sends on a fixed schedule. Latency counts from the scheduled time, not from when the
    /// send actually went out, so a stalled relay cannot hide its stall (coordinated
    /// omission).
    async fn open_loop(self, per_second: f64, _tally: Arc<Tally>) {
        let interval = Duration::from_secs_f64(1.0 / per_second);
        let start = Instant::now();
        let mut in_flight = tokio::task::JoinSet::new();
        let mut sequence = 0u32;
        loop {
            let intended = start + interval * sequence;
            if intended >= self.deadline {
                break;
            }
            tokio::time::sleep_until(intended.into()).await;
            let job = self.clone();
            in_flight.spawn(async move { job.send(sequence, intended).await });
            sequence += 1;
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }
}

async fn receive(
    connection: Arc<Connection>,
    tally: Arc<Tally>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) {
    let mut pending: Vec<EnvelopeId> = Vec::new();
    loop {
        let event = tokio::select! {
            event = connection.next_event() => event,
            () = tokio::time::sleep(Duration::from_millis(2)), if !pending.is_empty() => {
                flush(&connection, &mut pending);
                continue;
            }
        };
        match event {
            Some(Event::Envelope(envelope)) => {
                let now = epoch.elapsed().as_nanos() as u64;
                let header = &envelope.payload[..HEADER.min(envelope.payload.len())];
                if header.len() == HEADER {
                    let sent = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
                    let key = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
                    if let Ok(mut latency) = tally.latency.lock() {
                        let _ = latency.record((now.saturating_sub(sent) / 1000).max(1));
                    }
                    let fresh = tally.seen.lock().map_or(true, |mut seen| seen.insert(key));
                    if fresh {
                        tally.delivered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                pending.push(envelope.id);
                if pending.len() >= 256 {
                    flush(&connection, &mut pending);
                }
            }
            Some(
                Event::Drained
                | Event::LowPrekeys { .. }
                | Event::Provisioning(_)
                | Event::CallEnded { .. },
            ) => {}
            Some(Event::Closed(_)) | None => break,
        }
        if stop.load(Ordering::Relaxed) && pending.is_empty() {
            break;
        }
    }
}

/// Acknowledges in the background so that receiving never waits for a commit.
fn flush(connection: &Arc<Connection>, pending: &mut Vec<EnvelopeId>) {
    let ids = std::mem::take(pending);
    let connection = connection.clone();
    tokio::spawn(async move {
        let _ = connection.ack(&ids).await;
    });
}
