//! The `calls` scenario: N concurrent 1:1 calls, each 50 frames/s per direction of 160
//! bytes (a 20 ms audio codec), through the Hush relay and, side by side, through coturn.
//!
//! Frames are not end-to-end encrypted: the bench isolates the relay, which forwards the
//! opaque bytes as they are either way. Each frame carries its send time, call, sequence
//! and direction; latency is one way (send call to receive) over loopback, where both ends
//! read the same clock, so it is the relay's added delay plus both ends' socket path.
//!
//! Both relays run as child processes so that their CPU time (`/proc/<pid>/stat`, all
//! threads) is theirs alone, not the bench's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use hush_client::{Connection, Connector, DeviceKey};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::chat::Target;
use crate::child::{process_cpu_s, which, Child};
use crate::turn;

/// What a run can drive: Hush with its UDP media port, Hush with QUIC datagrams only,
/// coturn.
const SYSTEMS: [&str; 3] = ["hush", "hush-quic", "coturn"];

/// A 20 ms codec: 50 frames per second per direction.
const FRAME_INTERVAL: Duration = Duration::from_millis(20);
/// Media frame size, as an Opus/G.711-class voice frame.
pub const FRAME_LEN: usize = 160;
/// Scheduler tasks; each drives every K-th call, phase-shifted so that the sends of one
/// 20 ms period are spread over it instead of all leaving at once.
const SCHEDULERS: usize = 20;
/// Calls set up at once (registration commits are grouped by the relay).
const SETUP_CONCURRENCY: usize = 64;
/// Time after the last send for frames still in flight to arrive.
const DRAIN: Duration = Duration::from_millis(500);
/// Histogram shards, so that receivers rarely wait on each other's lock.
const SHARDS: usize = 16;

#[derive(clap::Args, Clone)]
pub struct CallArgs {
    /// Concurrent calls.
    #[arg(long, default_value_t = 1000)]
    calls: usize,
    /// How long media flows (after setup).
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Media flows this long before the measured window starts.
    #[arg(long, value_parser = crate::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Raise the call count (100, 250, 375, 500, 750, 1000, 1500, 2000, 3000, ...) until loss reaches
    /// --max-loss; report the largest count below it.
    #[arg(long)]
    ramp: bool,
    /// Loss, in percent, at which --ramp stops.
    #[arg(long, default_value_t = 0.5)]
    max_loss: f64,
    /// Also drive the same load through coturn (`turnserver`), side by side.
    #[arg(long)]
    turn: bool,
    /// Also drive the same load through Hush with media as QUIC datagrams (the clients
    /// leave the relay's UDP media port unused), side by side.
    #[arg(long)]
    quic_datagrams: bool,
    /// UDP sockets per side (callers, callees) that the Hush connections share.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    #[command(flatten)]
    relay: crate::RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Clone, Debug)]
struct Report {
    system: &'static str,
    calls: usize,
    setup_s: f64,
    window_s: f64,
    /// Per direction: caller to callee, callee to caller.
    sent: [u64; 2],
    received: [u64; 2],
    send_errors: u64,
    /// Frames received in the measured window, and the relay's CPU seconds over it.
    window_frames: u64,
    relay_cpu_s: Option<f64>,
    /// The bench's own CPU seconds over the window: it shares the cores with the relay.
    bench_cpu_s: f64,
    latency: Histogram<u64>,
}

impl Report {
    fn loss_pct(&self) -> f64 {
        let sent: u64 = self.sent.iter().sum();
        let received: u64 = self.received.iter().sum();
        if sent == 0 {
            return 100.0;
        }
        100.0 * sent.saturating_sub(received) as f64 / sent as f64
    }

    fn frames_per_s(&self) -> f64 {
        self.window_frames as f64 / self.window_s
    }

    fn cpu_per_1000(&self) -> Option<f64> {
        self.relay_cpu_s
            .map(|cpu| 1000.0 * cpu / self.window_frames.max(1) as f64)
    }

    fn frames_per_cpu_s(&self) -> Option<f64> {
        self.relay_cpu_s
            .map(|cpu| self.window_frames as f64 / cpu.max(1e-9))
    }

    fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "system": self.system,
            "calls": self.calls,
            "frame_bytes": FRAME_LEN,
            "frames_per_s_per_direction_per_call": 50,
            "setup_s": self.setup_s,
            "window_s": self.window_s,
            "sent": { "caller_to_callee": self.sent[0], "callee_to_caller": self.sent[1] },
            "received": { "caller_to_callee": self.received[0], "callee_to_caller": self.received[1] },
            "send_errors": self.send_errors,
            "loss_pct": self.loss_pct(),
            "forwarded_frames_per_s": self.frames_per_s(),
            "latency_ms": {
                "p50": self.latency_ms(0.5),
                "p99": self.latency_ms(0.99),
                "p99_9": self.latency_ms(0.999),
                "max": self.latency.max() as f64 / 1000.0,
            },
            "relay_cpu_s": self.relay_cpu_s,
            "bench_cpu_s": self.bench_cpu_s,
            "relay_cpu_s_per_1000_frames": self.cpu_per_1000(),
            "frames_per_relay_cpu_s": self.frames_per_cpu_s(),
        })
    }
}

pub async fn calls(args: CallArgs) -> anyhow::Result<()> {
    if args.sockets == 0 || args.calls == 0 {
        bail!("--calls and --sockets must be at least 1");
    }
    let turn_available = if args.turn {
        let found = which("turnserver").is_some();
        if !found {
            eprintln!(
                "!!! coturn's `turnserver` is not installed (apt-get install coturn): \
                 SKIPPING the coturn comparison !!!"
            );
        }
        found
    } else {
        false
    };

    let steps: Vec<usize> = if args.ramp {
        vec![
            100, 250, 375, 500, 750, 1000, 1500, 2000, 3000, 4000, 6000, 8000,
        ]
    } else {
        vec![args.calls]
    };
    let mut reports = Vec::new();
    let mut largest_ok: [Option<usize>; SYSTEMS.len()] = [None; SYSTEMS.len()];
    let mut done = [false, !args.quic_datagrams, !turn_available];
    for calls in steps {
        for (index, system) in SYSTEMS.into_iter().enumerate() {
            if done[index] {
                continue;
            }
            println!("-- {system}: {calls} calls");
            let result = match index {
                0 => run_hush(&args, calls, true).await,
                1 => run_hush(&args, calls, false).await,
                _ => run_turn(&args, calls).await,
            };
            match result {
                Ok(report) => {
                    print_one(&report);
                    if report.loss_pct() < args.max_loss {
                        largest_ok[index] = Some(calls);
                    } else {
                        done[index] = true;
                    }
                    reports.push(report);
                }
                Err(error) => {
                    println!("   {system} at {calls} calls failed: {error:#}");
                    done[index] = true;
                }
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }

    print_table(&reports);
    if args.ramp {
        for (index, system) in SYSTEMS.into_iter().enumerate() {
            if (index == 1 && !args.quic_datagrams) || (index == 2 && !turn_available) {
                continue;
            }
            match largest_ok[index] {
                Some(n) => println!(
                    "{system}: largest call count with loss < {} %: {n}",
                    args.max_loss
                ),
                None => println!("{system}: no step stayed under {} % loss", args.max_loss),
            }
        }
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "calls",
            "ramp": args.ramp,
            "max_loss_pct": args.max_loss,
            "coturn_skipped": args.turn && !turn_available,
            "largest_calls_under_max_loss": {
                "hush": largest_ok[0],
                "hush-quic": largest_ok[1],
                "coturn": largest_ok[2],
            },
            "runs": reports.iter().map(Report::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn print_one(report: &Report) {
    println!(
        "   sent {}+{}  received {}+{}  send errors {}  loss {:.3} %  {:.0} frames/s  \
         p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  (setup {:.1} s)\n   \
         CPU over the window: relay {}  bench {:.2} cores",
        report.sent[0],
        report.sent[1],
        report.received[0],
        report.received[1],
        report.send_errors,
        report.loss_pct(),
        report.frames_per_s(),
        report.latency_ms(0.5),
        report.latency_ms(0.99),
        report.latency_ms(0.999),
        report.setup_s,
        report.relay_cpu_s.map_or_else(
            || "-".to_owned(),
            |cpu| format!("{:.2} cores", cpu / report.window_s)
        ),
        report.bench_cpu_s / report.window_s,
    );
}

fn print_table(reports: &[Report]) {
    println!();
    println!(
        "{:<9} {:>6} {:>10} {:>8} {:>8} {:>8} {:>9} {:>12} {:>14}",
        "relay",
        "calls",
        "frames/s",
        "loss %",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU-s/1000f",
        "frames/CPU-s"
    );
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by_key(|r| (r.calls, r.system));
    for report in sorted {
        let cpu = report
            .cpu_per_1000()
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.5}"));
        let per_cpu = report
            .frames_per_cpu_s()
            .map_or_else(|| "-".to_owned(), |f| format!("{f:.0}"));
        println!(
            "{:<9} {:>6} {:>10.0} {:>8.3} {:>8.2} {:>8.2} {:>9.2} {:>12} {:>14}",
            report.system,
            report.calls,
            report.frames_per_s(),
            report.loss_pct(),
            report.latency_ms(0.5),
            report.latency_ms(0.99),
            report.latency_ms(0.999),
            cpu,
            per_cpu
        );
    }
}

/// Counters and latency shared by the senders and receivers of one run.
struct Tally {
    epoch: Instant,
    sent: [AtomicU64; 2],
    received: [AtomicU64; 2],
    send_errors: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        let mut latency = Vec::new();
        for _ in 0..SHARDS {
            latency.push(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
        }
        Ok(Tally {
            epoch: Instant::now(),
            sent: [AtomicU64::new(0), AtomicU64::new(0)],
            received: [AtomicU64::new(0), AtomicU64::new(0)],
            send_errors: AtomicU64::new(0),
            latency,
        })
    }

    /// A frame: send time (ns since the epoch), call, sequence, direction, then filler.
    fn frame(&self, call: u32, sequence: u32, direction: u8) -> [u8; FRAME_LEN] {
        let mut frame = [0x5A; FRAME_LEN];
        let nanos = self.epoch.elapsed().as_nanos() as u64;
        frame[..8].copy_from_slice(&nanos.to_be_bytes());
        frame[8..12].copy_from_slice(&call.to_be_bytes());
        frame[12..16].copy_from_slice(&sequence.to_be_bytes());
        frame[16] = direction;
        frame
    }

    fn record(&self, frame: &[u8], shard: usize) {
        if frame.len() != FRAME_LEN {
            return;
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&frame[..8]);
        let micros = (now.saturating_sub(u64::from_be_bytes(sent)) / 1000).max(1);
        let direction = usize::from(frame[16] & 1);
        self.received[direction].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut latency) = self.latency[shard % SHARDS].lock() {
            let _ = latency.record(micros);
        }
    }

    fn received(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }

    fn latency(&self) -> anyhow::Result<Histogram<u64>> {
        let mut all = Histogram::new_with_bounds(1, 60_000_000, 3)?;
        for shard in &self.latency {
            let shard = shard.lock().map_err(|_| anyhow!("poisoned"))?;
            all.add(&*shard)?;
        }
        Ok(all)
    }
}

/// One direction's sending end of a call.
enum Leg {
    /// A Hush connection and the call's allocation: one QUIC datagram per frame.
    Hush(Arc<Connection>, u32),
    /// A UDP socket connected to coturn, sending ChannelData on this channel.
    TurnChannel(Arc<UdpSocket>, u16),
    /// A plain UDP socket connected to the caller's relayed address.
    TurnPeer(Arc<UdpSocket>),
}

impl Leg {
    /// Sends without waiting, as a media path must; false when the frame was not sent.
    fn send(&self, frame: &[u8], scratch: &mut Vec<u8>) -> bool {
        match self {
            Leg::Hush(connection, allocation) => connection.send_media(*allocation, frame).is_ok(),
            Leg::TurnChannel(socket, channel) => {
                turn::channel_data(*channel, frame, scratch);
                socket.try_send(scratch).is_ok()
            }
            Leg::TurnPeer(socket) => socket.try_send(frame).is_ok(),
        }
    }
}

/// Both sending ends of a call: caller to callee, callee to caller.
type Call = [Leg; 2];

/// Drives every call's frames for `duration`, samples the relay's CPU over the window after
/// `warmup`, waits for stragglers, and stops the receivers.
async fn drive(
    calls: Vec<Call>,
    tally: Arc<Tally>,
    receivers: JoinSet<()>,
    args: &CallArgs,
    relay_pid: Option<u32>,
    setup_s: f64,
    system: &'static str,
) -> anyhow::Result<Report> {
    let calls = Arc::new(calls);
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + args.warmup + args.duration;
    let mut schedulers = JoinSet::new();
    for shard in 0..SCHEDULERS {
        let calls = calls.clone();
        let tally = tally.clone();
        let phase = FRAME_INTERVAL * shard as u32 / SCHEDULERS as u32;
        schedulers.spawn(async move {
            // Burst catches up after a stall, so that the offered load stays what it says.
            let mut ticks = tokio::time::interval_at((start + phase).into(), FRAME_INTERVAL);
            let mut scratch = Vec::with_capacity(FRAME_LEN + 4);
            let mut sequence = 0u32;
            loop {
                let tick = ticks.tick().await;
                if tick.into_std() >= deadline {
                    break;
                }
                for index in (shard..calls.len()).step_by(SCHEDULERS) {
                    for (direction, leg) in calls[index].iter().enumerate() {
                        let frame = tally.frame(index as u32, sequence, direction as u8);
                        tally.sent[direction].fetch_add(1, Ordering::Relaxed);
                        if !leg.send(&frame, &mut scratch) {
                            tally.send_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                sequence += 1;
                // Sending never waits; let the receivers and the QUIC drivers run.
                tokio::task::yield_now().await;
            }
        });
    }

    tokio::time::sleep_until((start + args.warmup).into()).await;
    let window_start = Instant::now();
    let cpu_before = relay_pid.map(process_cpu_s).transpose()?;
    let bench_before = process_cpu_s(std::process::id())?;
    let frames_before = tally.received();
    tokio::time::sleep_until(deadline.into()).await;
    let cpu_after = relay_pid.map(process_cpu_s).transpose()?;
    let bench_after = process_cpu_s(std::process::id())?;
    let frames_after = tally.received();
    let window_s = window_start.elapsed().as_secs_f64();
    while schedulers.join_next().await.is_some() {}
    tokio::time::sleep(DRAIN).await;
    let mut receivers = receivers;
    receivers.abort_all();
    while receivers.join_next().await.is_some() {}

    Ok(Report {
        system,
        calls: calls.len(),
        setup_s,
        window_s,
        sent: [
            tally.sent[0].load(Ordering::Relaxed),
            tally.sent[1].load(Ordering::Relaxed),
        ],
        received: [
            tally.received[0].load(Ordering::Relaxed),
            tally.received[1].load(Ordering::Relaxed),
        ],
        send_errors: tally.send_errors.load(Ordering::Relaxed),
        window_frames: frames_after - frames_before,
        relay_cpu_s: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        bench_cpu_s: bench_after - bench_before,
        latency: tally.latency()?,
    })
}

async fn run_hush(args: &CallArgs, calls: usize, udp: bool) -> anyhow::Result<Report> {
    let target = Target::open(&args.relay, &relay_config(calls)).await?;
    let (mut options, relay_pid, child) = (target.options, target.pid, target.child);
    options.udp_media = udp;
    let system = if udp { SYSTEMS[0] } else { SYSTEMS[1] };

    let setup = Instant::now();
    let mut connectors = Vec::new();
    for _ in 0..2 * args.sockets {
        connectors.push(Arc::new(Connector::new(options.clone())?));
    }
    let connectors = Arc::new(connectors);
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut setups = JoinSet::new();
    for index in 0..calls {
        let connectors = connectors.clone();
        let gate = gate.clone();
        let sockets = args.sockets;
        setups.spawn(async move {
            let _permit = gate.acquire().await?;
            let caller = connectors[index % sockets].connect().await?;
            caller
                .register(b"bench", &DeviceKey::generate(), None)
                .await?;
            let callee = connectors[sockets + index % sockets].connect().await?;
            let address = callee
                .register(b"bench", &DeviceKey::generate(), None)
                .await?;
            let (allocation, token, _) = caller.allocate_call(address.account).await?;
            callee.join_call(allocation, token).await?;
            anyhow::Ok((index, Arc::new(caller), Arc::new(callee), allocation))
        });
    }
    let mut parties = Vec::with_capacity(calls);
    while let Some(setup) = setups.join_next().await {
        parties.push(setup?.context("setting up a call")?);
    }
    parties.sort_by_key(|p| p.0);
    let setup_s = setup.elapsed().as_secs_f64();

    let tally = Arc::new(Tally::new()?);
    let mut receivers = JoinSet::new();
    let mut legs = Vec::with_capacity(calls);
    for (index, caller, callee, allocation) in parties {
        for connection in [&caller, &callee] {
            let connection = connection.clone();
            let tally = tally.clone();
            receivers.spawn(async move {
                while let Some((_, frame)) = connection.next_media().await {
                    tally.record(&frame, index);
                }
            });
        }
        legs.push([Leg::Hush(caller, allocation), Leg::Hush(callee, allocation)]);
    }
    let report = drive(legs, tally, receivers, args, relay_pid, setup_s, system).await?;
    drop(child);
    Ok(report)
}

/// A child hush-relay's configuration with room for `calls` calls. Address validation
/// (QUIC Retry) is off: thousands of handshakes sharing a few client sockets
/// intermittently fail with "invalid Retry Token" (or stall until the idle timeout) with
/// it on, and it touches only the handshake, not the media path measured here.
fn relay_config(calls: usize) -> String {
    format!(
        "[limits]\nmax_call_allocations = {}\nrequire_address_validation = false\n",
        (calls + 1000).max(10_000)
    )
}

const TURN_USER: &str = "bench";
const TURN_PASSWORD: &str = "bench";
const TURN_REALM: &str = "hush";

async fn run_turn(args: &CallArgs, calls: usize) -> anyhow::Result<Report> {
    let (server, child) = start_coturn(calls).await?;
    let setup = Instant::now();
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut setups = JoinSet::new();
    for index in 0..calls {
        let gate = gate.clone();
        setups.spawn(async move {
            let _permit = gate.acquire().await?;
            let (caller, callee) = turn_call(server, index as u32).await?;
            anyhow::Ok((index, caller, callee))
        });
    }
    let mut parties = Vec::with_capacity(calls);
    while let Some(setup) = setups.join_next().await {
        parties.push(setup?.context("setting up a TURN allocation")?);
    }
    parties.sort_by_key(|p| p.0);
    let setup_s = setup.elapsed().as_secs_f64();

    let tally = Arc::new(Tally::new()?);
    let mut receivers = JoinSet::new();
    let mut legs = Vec::with_capacity(calls);
    for (index, caller, callee) in parties {
        let (socket, tally_caller) = (caller.clone(), tally.clone());
        receivers.spawn(async move {
            let mut buffer = [0u8; 2048];
            while let Ok(len) = socket.recv(&mut buffer).await {
                if let Some((_, frame)) = turn::parse_channel_data(&buffer[..len]) {
                    tally_caller.record(frame, index);
                }
            }
        });
        let (socket, tally_callee) = (callee.clone(), tally.clone());
        receivers.spawn(async move {
            let mut buffer = [0u8; 2048];
            while let Ok(len) = socket.recv(&mut buffer).await {
                tally_callee.record(&buffer[..len], index);
            }
        });
        legs.push([
            Leg::TurnChannel(caller, turn::FIRST_CHANNEL),
            Leg::TurnPeer(callee),
        ]);
    }
    let report = drive(
        legs,
        tally,
        receivers,
        args,
        child.pid(),
        setup_s,
        SYSTEMS[2],
    )
    .await?;
    drop(child);
    Ok(report)
}

/// One call through coturn: the caller allocates (long-term credentials), permits and
/// channel-binds the callee's plain socket; the callee talks to the relayed address.
async fn turn_call(
    server: SocketAddr,
    call: u32,
) -> anyhow::Result<(Arc<UdpSocket>, Arc<UdpSocket>)> {
    let caller = UdpSocket::bind("127.0.0.1:0").await?;
    caller.connect(server).await?;
    let callee = UdpSocket::bind("127.0.0.1:0").await?;
    let peer = callee.local_addr()?;
    let transaction = |step: u32| {
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&call.to_be_bytes());
        id[4..8].copy_from_slice(&step.to_be_bytes());
        id
    };

    let challenge = transact(
        &caller,
        turn::Request::new(turn::ALLOCATE, transaction(0))
            .requested_transport_udp()
            .finish(),
    )
    .await?;
    let (Some(realm), Some(nonce)) = (challenge.realm, challenge.nonce) else {
        bail!("coturn's Allocate challenge had no realm or nonce");
    };
    let key = turn::long_term_key(TURN_USER, &realm, TURN_PASSWORD);
    let allocated = transact(
        &caller,
        turn::Request::new(turn::ALLOCATE, transaction(1))
            .requested_transport_udp()
            .lifetime(3600)
            .authenticate(TURN_USER, &realm, &nonce, &key),
    )
    .await?;
    let (true, Some(relayed)) = (allocated.success, allocated.relayed) else {
        bail!("Allocate failed: error {:?}", allocated.error_code);
    };
    for (step, request) in [
        (
            2,
            turn::Request::new(turn::CREATE_PERMISSION, transaction(2)).xor_peer_address(peer),
        ),
        (
            3,
            turn::Request::new(turn::CHANNEL_BIND, transaction(3))
                .channel_number(turn::FIRST_CHANNEL)
                .xor_peer_address(peer),
        ),
    ] {
        let answer = transact(
            &caller,
            request.authenticate(TURN_USER, &realm, &nonce, &key),
        )
        .await?;
        if !answer.success {
            bail!("TURN request {step} failed: error {:?}", answer.error_code);
        }
    }
    callee.connect(relayed).await?;
    Ok((Arc::new(caller), Arc::new(callee)))
}

/// Sends a request and waits for its answer, retransmitting as STUN over UDP does.
async fn transact(socket: &UdpSocket, request: Vec<u8>) -> anyhow::Result<turn::Response> {
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&request[8..turn::HEADER_LEN]);
    let method = u16::from_be_bytes([request[0], request[1]]);
    let mut buffer = [0u8; 2048];
    for attempt in 0..7u32 {
        socket.send(&request).await?;
        let wait = Duration::from_millis(250) * (1 << attempt.min(3));
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
            if let Some(response) = turn::parse_response(&buffer[..received?]) {
                if response.transaction == transaction && response.method == method {
                    return Ok(response);
                }
            }
        }
    }
    bail!("no answer from coturn")
}

/// Starts `turnserver` on a free loopback port with static credentials and a temporary
/// dir, and waits until it answers.
async fn start_coturn(calls: usize) -> anyhow::Result<(SocketAddr, Child)> {
    let binary = which("turnserver").context("turnserver not installed")?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (dir, guard) = Child::workdir(None)?;
    // Relay ports below Linux's ephemeral range (32768+), where the bench's own sockets
    // live, with room for every call.
    let (min_port, max_port) = (10_000, 10_000 + (calls as u32 + 2000).max(20_000));
    if max_port > 32_767 {
        bail!("more calls than coturn relay ports below the ephemeral range");
    }
    let log = std::fs::File::create(dir.join("turnserver.log"))?;
    let child = tokio::process::Command::new(&binary)
        .args([
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--lt-cred-mech",
            "--no-multicast-peers",
        ])
        .args(["--allow-loopback-peers", "--no-stdout-log", "--simple-log"])
        .args(["--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"])
        .args(["--listening-port", &port.to_string()])
        .args([
            "--min-port",
            &min_port.to_string(),
            "--max-port",
            &max_port.to_string(),
        ])
        .args([
            "--user",
            &format!("{TURN_USER}:{TURN_PASSWORD}"),
            "--realm",
            TURN_REALM,
        ])
        .arg("--log-file")
        .arg(dir.join("turnserver.log"))
        .arg("--pidfile")
        .arg(dir.join("turnserver.pid"))
        .arg("--db")
        .arg(dir.join("turndb"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Child::new(child, guard);

    // Ready once it answers a Binding request.
    let probe = UdpSocket::bind("127.0.0.1:0").await?;
    probe.connect(server).await?;
    let ready = Instant::now();
    let binding = turn::Request::new(0x0001, [9; 12]).finish();
    let mut buffer = [0u8; 1024];
    loop {
        probe.send(&binding).await?;
        if let Ok(Ok(len)) =
            tokio::time::timeout(Duration::from_millis(200), probe.recv(&mut buffer)).await
        {
            if turn::parse_response(&buffer[..len]).is_some() {
                break;
            }
        }
        if ready.elapsed() > Duration::from_secs(10) {
            bail!("turnserver did not answer within 10 s");
        }
    }
    Ok((server, child))
}
