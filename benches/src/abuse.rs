//! The `abuse` scenario: a well-behaved open-loop raw chat load, measured alone and then
//! while each connection attack runs beside it in turn (handshake flood, stream churn,
//! half-sent frames, idle connections en masse, media datagram flood). What it shows is
//! whether the relay stays responsive to well-behaved clients: their latency
//! percentiles, and that nothing they sent is lost.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hush_client::protocol::{encode_frame, ClientFrame, Hello, ServerFrame};
use hush_client::{ConnectOptions, Connection, Connector, DeviceKey};
use hush_tests::flood::HandshakeFlood;
use tokio::task::JoinSet;

use crate::chat::{self, ChatArgs, Target};
use crate::report::Report;
use crate::{parse_duration, RelayArgs};

/// Connections one client socket carries, as in the other many-connection scenarios.
const CONNECTIONS_PER_SOCKET: usize = 32;
/// How long the relay gets to let go of one attack's connections before the next phase.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Clone)]
pub struct AbuseArgs {
    /// Well-behaved users, in pairs.
    #[arg(long, default_value_t = 8)]
    users: usize,
    /// Messages per second each well-behaved user sends (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// How long each phase (the baseline, then each attack) runs.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Connections the half-open and idle attacks keep open.
    #[arg(long, default_value_t = 1000)]
    held: usize,
    /// Concurrent attackers in the stream-churn and datagram-flood attacks.
    #[arg(long, default_value_t = 8)]
    attackers: usize,
    /// Keep the relay's data dir and log in this directory.
    #[arg(long)]
    keep_data: Option<PathBuf>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The attacks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    None,
    HandshakeFlood,
    StreamChurn,
    HalfOpen,
    Idle,
    DatagramFlood,
}

impl Attack {
    const ALL: [Attack; 6] = [
        Attack::None,
        Attack::HandshakeFlood,
        Attack::StreamChurn,
        Attack::HalfOpen,
        Attack::Idle,
        Attack::DatagramFlood,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::None => "none (baseline)",
            Attack::HandshakeFlood => "handshake flood",
            Attack::StreamChurn => "stream churn",
            Attack::HalfOpen => "half-sent frames",
            Attack::Idle => "idle connections",
            Attack::DatagramFlood => "datagram flood",
        }
    }
}

/// The relay's counters an attack's rate is read from.
const COUNTERS: [&str; 8] = [
    "hush_address_validations_total",
    "hush_connections_opened_total",
    "hush_connections_refused_total",
    "hush_handshake_failures_total",
    "hush_media_dropped_unknown_total",
    "hush_media_dropped_no_peer_total",
    "hush_connections_open",
    "hush_connections_closed_total{code=\"FrameTimeout\"}",
];

/// What an attack counts on its side: its main operation, and a second one where it has
/// one (the handshake flood's answered Retries).
#[derive(Default)]
struct Ops {
    main: AtomicU64,
    second: AtomicU64,
}

/// One phase: the load's report, and what the attack achieved.
struct Phase {
    attack: Attack,
    rate: String,
    attacker_ops: [u64; 2],
    relay_counter_deltas: [u64; 8],
    relay_open_connections_peak: u64,
    report: Report,
}

pub async fn abuse(args: AbuseArgs) -> anyhow::Result<()> {
    if args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    // The relay's defaults (Retry on, 30 s frame deadline, 60 s idle timeout), with room
    // for the held connections.
    let config = format!(
        "[limits]\nmax_connections = {}\n",
        args.held + args.users + 10_000
    );
    let relay_args = RelayArgs {
        keep_data: args.keep_data.clone(),
        ..RelayArgs::default()
    };
    let target = Target::open(&relay_args, &config).await?;
    let load = ChatArgs::raw(args.users, 1, Some(args.rate), args.size, args.duration);
    println!(
        "abuse: {} well-behaved users at {} msgs/s each, {} B, {:.0} s per phase",
        load_users(args.users),
        args.rate,
        args.size,
        args.duration.as_secs_f64()
    );

    let mut phases = Vec::new();
    for attack in Attack::ALL {
        settle(&target).await;
        let before = target.metrics(&COUNTERS).context("the relay's metrics")?;
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(Ops::default());
        let peak = Arc::new(AtomicU64::new(0));
        let attacker = tokio::spawn(run_attack(
            attack,
            args.clone(),
            target.options.clone(),
            stop.clone(),
            ops.clone(),
        ));
        let sampler = tokio::spawn(sample_open_connections(
            target.admin_socket(),
            stop.clone(),
            peak.clone(),
        ));
        // The attack gets a moment to reach its rate before the load is measured.
        if attack != Attack::None {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let started = Instant::now();
        let report = chat::load(&load, &target).await;
        let attack_s = started.elapsed().as_secs_f64() + 1.0;
        stop.store(true, Ordering::Relaxed);
        let attack_result = attacker.await.context("the attack task")?;
        let _ = sampler.await;
        let report = report?;
        attack_result?;
        let after = target.metrics(&COUNTERS).context("the relay's metrics")?;
        let mut deltas = [0; 8];
        for (i, delta) in deltas.iter_mut().enumerate() {
            *delta = after[i].saturating_sub(before[i]);
        }
        let attacker_ops = [
            ops.main.load(Ordering::Relaxed),
            ops.second.load(Ordering::Relaxed),
        ];
        let phase = Phase {
            attack,
            rate: describe_rate(attack, attacker_ops, &deltas, attack_s, &args),
            attacker_ops,
            relay_counter_deltas: deltas,
            relay_open_connections_peak: peak.load(Ordering::Relaxed),
            report,
        };
        print_phase(&phase);
        phases.push(phase);
    }
    print_table(&phases);
    if let Some(path) = &args.json {
        write_json(path, &args, &phases)?;
    }
    if let Some(child) = target.child {
        child.stop().await;
    }
    let lost: u64 = phases.iter().map(|p| p.report.counts.lost).sum();
    if lost > 0 {
        bail!("{lost} well-behaved messages were lost");
    }
    Ok(())
}

fn load_users(users: usize) -> usize {
    users.max(2).div_ceil(2) * 2
}

/// Waits (bounded) until the relay holds no connections from an earlier phase.
async fn settle(target: &Target) {
    let deadline = Instant::now() + SETTLE_LIMIT;
    while Instant::now() < deadline {
        match target.metrics(&["hush_connections_open"]) {
            Some([0]) | None => return,
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Samples the relay's open-connection gauge every 100 ms until `stop`; keeps the peak.
async fn sample_open_connections(
    socket: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
) {
    let Some(socket) = socket else { return };
    while !stop.load(Ordering::Relaxed) {
        let socket = socket.clone();
        let open = tokio::task::spawn_blocking(move || {
            let text = hush_server::admin::query(&socket, "metrics").ok()?;
            text.lines()
                .find_map(|line| line.strip_prefix("hush_connections_open ")?.parse().ok())
        })
        .await
        .ok()
        .flatten();
        if let Some(open) = open {
            peak.fetch_max(open, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn describe_rate(
    attack: Attack,
    [ops, second]: [u64; 2],
    deltas: &[u64; 8],
    seconds: f64,
    args: &AbuseArgs,
) -> String {
    let per_s = |n: u64| n as f64 / seconds;
    match attack {
        Attack::None => "-".to_owned(),
        Attack::HandshakeFlood => format!(
            "{:.0} Initials/s, {:.0} Retries/s from the relay, {:.0} handshakes/s abandoned \
             after the Retry, {:.0}/s refused at the connection limit",
            per_s(ops),
            per_s(deltas[0]),
            per_s(second),
            per_s(deltas[2])
        ),
        Attack::StreamChurn => format!("{:.0} streams opened and ended/s", per_s(ops)),
        Attack::HalfOpen => format!("{} stalled frames held ({} opened)", args.held, ops),
        Attack::Idle => format!("{} idle connections held ({} opened)", args.held, ops),
        Attack::DatagramFlood => format!(
            "{:.0} datagrams/s sent, {:.0}/s reached the relay and were dropped",
            per_s(ops),
            per_s(deltas[4] + deltas[5])
        ),
    }
}

fn print_phase(phase: &Phase) {
    let latency = &phase.report.counts.latency_ms;
    println!(
        "  {:<18} p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  lost {}   attack: {}",
        phase.attack.name(),
        latency.p50,
        latency.p99,
        latency.p99_9,
        phase.report.counts.lost,
        phase.rate
    );
}

fn print_table(phases: &[Phase]) {
    println!(
        "\n{:<18} {:>8} {:>8} {:>9} {:>6} {:>10} {:>9}  attack rate achieved",
        "attack", "p50 ms", "p99 ms", "p99.9 ms", "lost", "relay CPU", "open peak"
    );
    for phase in phases {
        let counts = &phase.report.counts;
        println!(
            "{:<18} {:>8.2} {:>8.2} {:>9.2} {:>6} {:>10} {:>9}  {}",
            phase.attack.name(),
            counts.latency_ms.p50,
            counts.latency_ms.p99,
            counts.latency_ms.p99_9,
            counts.lost,
            phase
                .report
                .relay
                .as_ref()
                .map_or("-".to_owned(), |relay| format!("{:.2}", relay.cpu_cores)),
            phase.relay_open_connections_peak,
            phase.rate
        );
    }
}

fn write_json(path: &PathBuf, args: &AbuseArgs, phases: &[Phase]) -> anyhow::Result<()> {
    let phases = phases
        .iter()
        .map(|phase| {
            let counters: serde_json::Map<_, _> = COUNTERS
                .iter()
                .zip(phase.relay_counter_deltas)
                .map(|(name, delta)| ((*name).to_owned(), delta.into()))
                .collect();
            Ok(serde_json::json!({
                "attack": phase.attack.name(),
                "attack_rate": phase.rate,
                "attacker_operations": phase.attacker_ops[0],
                "attacker_second_operations": phase.attacker_ops[1],
                "relay_counter_deltas": counters,
                "relay_open_connections_peak": phase.relay_open_connections_peak,
                "well_behaved": serde_json::to_value(&phase.report)?,
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let json = serde_json::json!({
        "scenario": "abuse",
        "config": {
            "users": load_users(args.users), "rate_per_user": args.rate, "size": args.size,
            "phase_s": args.duration.as_secs_f64(), "held": args.held,
            "attackers": args.attackers,
        },
        "phases": phases,
    });
    std::fs::write(path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs one attack until `stop`, counting its operations in `ops`.
async fn run_attack(
    attack: Attack,
    args: AbuseArgs,
    options: ConnectOptions,
    stop: Arc<AtomicBool>,
    ops: Arc<Ops>,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    match attack {
        Attack::None => return Ok(()),
        Attack::HandshakeFlood => {
            tasks.spawn(handshake_flood(options.address, stop, ops));
        }
        Attack::StreamChurn => {
            for _ in 0..args.attackers {
                let connector = Arc::new(Connector::new(options.clone())?);
                tasks.spawn(until(stop.clone(), ops.clone(), move || {
                    churn_one(connector.clone())
                }));
            }
        }
        Attack::HalfOpen | Attack::Idle => {
            let keep_alive = (attack == Attack::HalfOpen).then_some(Duration::from_secs(15));
            let mut connectors = Vec::new();
            for _ in 0..args.held.div_ceil(CONNECTIONS_PER_SOCKET) {
                connectors.push(Arc::new(Connector::with_keep_alive(
                    options.clone(),
                    keep_alive,
                )?));
            }
            let half_frame = attack == Attack::HalfOpen;
            for index in 0..args.held {
                let connector = connectors[index / CONNECTIONS_PER_SOCKET].clone();
                let stop = stop.clone();
                tasks.spawn(until(stop.clone(), ops.clone(), move || {
                    hold_one(connector.clone(), half_frame, stop.clone())
                }));
            }
        }
        Attack::DatagramFlood => {
            for _ in 0..args.attackers {
                let connection = Connection::connect(&options).await?;
                let address = connection
                    .register(b"flooder", &DeviceKey::generate(), None)
                    .await?;
                // Its own allocation, which nobody joins.
                let (allocation, _, _) = connection.allocate_call(address.account).await?;
                tasks.spawn(datagram_flood(
                    connection,
                    allocation,
                    stop.clone(),
                    ops.clone(),
                ));
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.context("an attacker")??;
    }
    Ok(())
}

/// Repeats `one` until `stop`, counting each completed round.
async fn until<F, Fut>(stop: Arc<AtomicBool>, ops: Arc<Ops>, one: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    while !stop.load(Ordering::Relaxed) {
        one().await?;
        ops.main.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Initials that never answer the Retry, and handshakes abandoned after answering it.
async fn handshake_flood(
    relay: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    ops: Arc<Ops>,
) -> anyhow::Result<()> {
    let mut flood = HandshakeFlood::new(relay).await?;
    while !stop.load(Ordering::Relaxed) {
        let sent = flood.unanswered_initials(64).await?;
        let abandoned = flood
            .abandoned_handshakes(16, Duration::from_millis(200))
            .await?;
        ops.main
            .fetch_add((sent + abandoned.initials) as u64, Ordering::Relaxed);
        ops.second
            .fetch_add(abandoned.retries_answered as u64, Ordering::Relaxed);
        // Paced so the flood is a flood, not a busy loop starving the load's own tasks
        // on a machine this small.
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// A connection whose only stream says `Hello` and then ends, by finishing or resetting.
async fn churn_one(connector: Arc<Connector>) -> anyhow::Result<()> {
    let connection = connector.connect_quic().await?;
    let (mut send, _recv) = connection.open_bi().await?;
    send.write_all(&encode_frame(&ClientFrame::Hello(Hello::current())))
        .await?;
    if connection.stable_id() % 2 == 0 {
        send.finish()?;
    } else {
        send.reset(0u32.into())?;
    }
    tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .context("the relay did not close a churned connection")?;
    Ok(())
}

/// One connection past `Hello` that then sits: quiet with no keep-alives, or with three
/// bytes of a frame header sent and keep-alives on. Returns when the relay closes it, or
/// at `stop`.
async fn hold_one(
    connector: Arc<Connector>,
    half_frame: bool,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut raw = connector.connect_raw().await?;
    raw.write(&encode_frame(&ClientFrame::Hello(Hello::current())))
        .await?;
    let hello = tokio::time::timeout(Duration::from_secs(30), raw.read_frame())
        .await
        .context("no HelloOk within 30 s")?;
    match hello? {
        Some(ServerFrame::HelloOk(_)) => {}
        other => bail!("expected HelloOk, got {other:?}"),
    }
    if half_frame {
        raw.write(&[0, 0, 3]).await?;
    }
    while !stop.load(Ordering::Relaxed) {
        if tokio::time::timeout(Duration::from_millis(200), raw.closed())
            .await
            .is_ok()
        {
            break;
        }
    }
    raw.quic().close(0u32.into(), b"done");
    Ok(())
}

/// Media datagrams as fast as the connection takes them: half for allocations that do
/// not exist, half for the flooder's own allocation that has no peer.
async fn datagram_flood(
    connection: Connection,
    allocation: u32,
    stop: Arc<AtomicBool>,
    ops: Arc<Ops>,
) -> anyhow::Result<()> {
    let frame = [0xA5u8; 160];
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            n = n.wrapping_add(1);
            let result = if n % 2 == 0 {
                let mut datagram = (allocation ^ 0x8000_0000 ^ n).to_be_bytes().to_vec();
                datagram.extend_from_slice(&frame);
                connection.send_raw_datagram(datagram)
            } else {
                connection.send_media(allocation, &frame)
            };
            if result.is_ok() {
                ops.main.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::task::yield_now().await;
    }
    connection.close();
    Ok(())
}
