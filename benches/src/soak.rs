//! The `soak` scenario: steady mixed load for a long time — users in pairs sending to each
//! other on a schedule, acknowledging what arrives, and each dropping its connection and
//! coming back every so often (their partner's messages wait in the store meanwhile) —
//! while the relay's memory, file descriptors and errors are sampled. A relay that leaks
//! shows it as drift between the end and the state after warm-up.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hush_client::protocol::{DeviceAddress, EnvelopeId};
use hush_client::{Connection, Event};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::chat::Target;
use crate::child;
use crate::devices::{self, Device, Sockets};
use crate::monitor::Monitor;
use crate::report::mib;
use crate::stats::{read_stamp, stamped, Tally};
use crate::{parse_duration, RelayArgs};

/// How often the relay's resources are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Acknowledgements are sent in batches of this many, or after this long.
const ACK_BATCH: usize = 64;
const ACK_DELAY: Duration = Duration::from_millis(5);

#[derive(clap::Args, Clone)]
pub struct SoakArgs {
    /// Users, in pairs (rounded up to an even number).
    #[arg(long, default_value_t = 32)]
    users: usize,
    /// Messages per second each user sends.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// How long the load runs.
    #[arg(long, value_parser = parse_duration, default_value = "30m")]
    duration: Duration,
    /// Each user drops its connection and reconnects this often (staggered).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    reconnect_every: Duration,
    /// Resource figures are compared with their state this long into the run.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    warm_up: Duration,
    #[command(flatten)]
    relay: RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The relay's resources at one moment.
#[derive(Clone, Copy, Debug, Serialize)]
struct ResourceSample {
    at_s: f64,
    rss_bytes: u64,
    open_fds: u64,
    failed_sends: u64,
    reconnects: u64,
}

pub async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let users = args.users.max(2).div_ceil(2) * 2;
    let config = format!(
        "[limits]\nmax_connections = {}\nrequire_address_validation = false\n",
        users * 2 + 100
    );
    let target = Target::open(&args.relay, &config).await?;
    let Some(pid) = target.pid else {
        bail!("soak samples the relay's memory and descriptors: give --relay-pid or let the bench start it");
    };
    let sockets = Sockets::new(&target.options, users)?;
    println!(
        "soak: {users} users, {} msgs/s each, {} B, reconnecting every {:?}, for {:?}",
        args.rate, args.size, args.reconnect_every, args.duration
    );
    let registered = devices::register(&sockets, users).await?;
    let addresses: Vec<DeviceAddress> = registered.iter().map(|(d, _)| d.address).collect();

    let tally = Arc::new(Tally::new()?);
    let reconnects = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let deadline = epoch + args.duration;
    let monitor = Monitor::start(tally.clone(), Some(pid), args.duration, "soak");
    let sampler = {
        let (tally, reconnects) = (tally.clone(), reconnects.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            while Instant::now() < deadline + SAMPLE_EVERY {
                ticker.tick().await;
                samples.push(ResourceSample {
                    at_s: epoch.elapsed().as_secs_f64(),
                    rss_bytes: child::process_rss_bytes(pid).unwrap_or_default(),
                    open_fds: open_fds(pid),
                    failed_sends: Tally::count(&tally.failed),
                    reconnects: reconnects.load(Ordering::Relaxed),
                });
            }
            samples
        })
    };

    let mut tasks = JoinSet::new();
    for (index, (device, connection)) in registered.into_iter().enumerate() {
        let user = User {
            index,
            device,
            partner: addresses[index ^ 1],
            sockets: sockets.clone(),
            tally: tally.clone(),
            reconnects: reconnects.clone(),
            interval: Duration::from_secs_f64(1.0 / args.rate),
            size: args.size,
            epoch,
            deadline,
            // Staggered so that reconnects are spread evenly over every period.
            first_reconnect: epoch + args.reconnect_every.mul_f64(index as f64 / users as f64),
            reconnect_every: args.reconnect_every,
        };
        tasks.spawn(user.run(connection));
    }
    tokio::time::sleep_until(deadline.into()).await;
    tally.wait_for_delivery(Duration::from_secs(60)).await;
    // Users run until stopped; one that ended on its own failed to reconnect.
    let mut user_errors = Vec::new();
    while let Some(done) = tasks.try_join_next() {
        if let Ok(Err(error)) = done {
            user_errors.push(format!("{error:#}"));
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let timeline = monitor.finish().await;
    let samples = sampler.await?;
    let counts = tally.counts(args.duration.as_secs_f64(), Tally::count(&tally.delivered));

    let warm = samples
        .iter()
        .find(|s| s.at_s >= args.warm_up.as_secs_f64())
        .or(samples.first())
        .copied();
    let end = samples.last().copied();
    let (Some(warm), Some(end)) = (warm, end) else {
        bail!("no resource samples were taken");
    };
    let peak_rss = samples
        .iter()
        .map(|s| s.rss_bytes)
        .max()
        .unwrap_or_default();
    let rss_drift = end.rss_bytes as f64 / warm.rss_bytes.max(1) as f64 - 1.0;
    let failed_after_warm_up = end.failed_sends - warm.failed_sends;
    println!(
        "  sent {}  delivered {}  lost {}  duplicated {}  failed sends {}  reconnects {}",
        counts.sent,
        counts.delivered,
        counts.lost,
        counts.duplicated,
        counts.failed,
        end.reconnects
    );
    println!(
        "  send->deliver ms    p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        counts.latency_ms.p50,
        counts.latency_ms.p99,
        counts.latency_ms.p99_9,
        counts.latency_ms.max
    );
    println!(
        "  relay RSS           {:.1} MiB after warm-up ({:.0} s), {:.1} MiB at the end, peak \
         {:.1} MiB: drift {:+.1} %",
        mib(warm.rss_bytes),
        warm.at_s,
        mib(end.rss_bytes),
        mib(peak_rss),
        rss_drift * 100.0
    );
    println!(
        "  relay descriptors   {} after warm-up, {} at the end",
        warm.open_fds, end.open_fds
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "soak",
            "config": {
                "users": users, "rate_per_user": args.rate, "size": args.size,
                "duration_s": args.duration.as_secs_f64(),
                "reconnect_every_s": args.reconnect_every.as_secs_f64(),
                "warm_up_s": args.warm_up.as_secs_f64(),
            },
            "counts": counts,
            "rss_drift": rss_drift,
            "failed_after_warm_up": failed_after_warm_up,
            "user_errors": user_errors,
            "resources": samples,
            "timeline": timeline,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(child) = target.child {
        child.stop().await;
    }
    for error in &user_errors {
        eprintln!("  a user stopped: {error}");
    }
    if counts.lost > 0 || counts.duplicated > 0 || counts.failed > 0 || !user_errors.is_empty() {
        bail!(
            "{} lost, {} duplicated, {} failed sends",
            counts.lost,
            counts.duplicated,
            counts.failed
        );
    }
    Ok(())
}

/// One simulated user of the soak.
struct User {
    index: usize,
    device: Device,
    partner: DeviceAddress,
    sockets: Arc<Sockets>,
    tally: Arc<Tally>,
    reconnects: Arc<AtomicU64>,
    interval: Duration,
    size: usize,
    epoch: Instant,
    deadline: Instant,
    first_reconnect: Instant,
    reconnect_every: Duration,
}

impl User {
    /// Sends on schedule, takes and acknowledges what arrives, and reconnects on its own
    /// schedule, until aborted.
    async fn run(self, mut connection: Connection) -> anyhow::Result<()> {
        let start = self.epoch + self.interval.mul_f64(self.index as f64 % 64.0 / 64.0);
        let mut sequence = 0u32;
        let mut next_reconnect = self.first_reconnect;
        // Envelope ids already passed on: a redelivery of an envelope not acknowledged
        // before a reconnect is the protocol working, not a duplicate message.
        let mut seen: HashSet<EnvelopeId> = HashSet::new();
        let mut pending: Vec<EnvelopeId> = Vec::new();
        loop {
            let due = start + self.interval * sequence;
            let sending = due < self.deadline;
            tokio::select! {
                () = tokio::time::sleep_until(due.into()), if sending => {
                    let nanos = u64::try_from(due.duration_since(self.epoch).as_nanos())
                        .unwrap_or(u64::MAX);
                    let message = stamped(self.index as u32, sequence, nanos, self.size);
                    match connection.send_to(&[self.partner], message).await {
                        Ok(()) => self.tally.sent(),
                        Err(_) => self.tally.failed(),
                    }
                    sequence += 1;
                }
                event = connection.next_event() => match event {
                    Some(Event::Envelope(envelope)) => {
                        if seen.insert(envelope.id) {
                            if let Some((key, due)) = read_stamp(&envelope.payload) {
                                let due = self.epoch + Duration::from_nanos(due);
                                self.tally.delivered(key, due.elapsed());
                            }
                        }
                        pending.push(envelope.id);
                        if pending.len() >= ACK_BATCH {
                            let _ = connection.ack(&std::mem::take(&mut pending)).await;
                        }
                    }
                    Some(Event::Closed(_)) | None => {
                        connection = self.reconnect(&connection, &mut pending).await?;
                    }
                    Some(_) => {}
                },
                () = tokio::time::sleep(ACK_DELAY), if !pending.is_empty() => {
                    let _ = connection.ack(&std::mem::take(&mut pending)).await;
                }
                () = tokio::time::sleep_until(next_reconnect.into()) => {
                    connection = self.reconnect(&connection, &mut pending).await?;
                    next_reconnect += self.reconnect_every;
                }
            }
        }
    }

    async fn reconnect(
        &self,
        old: &Connection,
        pending: &mut Vec<EnvelopeId>,
    ) -> anyhow::Result<Connection> {
        if !pending.is_empty() {
            let _ = old.ack(&std::mem::take(pending)).await;
        }
        old.close();
        let connection = devices::reconnect(&self.sockets, self.index, &self.device).await?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        Ok(connection)
    }
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64)
}
