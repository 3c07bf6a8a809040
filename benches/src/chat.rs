//! The `chat` scenario: N users in pairs, each writing to its partner.
//!
//! By default every user is a real `hush-client` (PQXDH sessions, Double Ratchet, sealed
//! sender, padding, an encrypted local store, delivery receipts on): the figures are what
//! apps would see. With `--raw-envelopes` each user is a bare authenticated connection
//! sending opaque envelopes of the same size, which isolates the relay.
//!
//! Every message carries its sender, sequence number and intended send time, so
//! deliveries are counted exactly (a loss or a duplicate is reported, and a loss fails the
//! run) and latency runs from the time the message was due, not from when it went out: a
//! stalled relay cannot hide its stall (coordinated omission).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hush_client::protocol::{AccountId, DeviceAddress, EnvelopeId};
use hush_client::{
    Body, Client, ClientConfig, ClientEvent, ConnectOptions, Connection, DeviceKey, Event,
    StorageKey, Trust,
};
use rand_core::{OsRng, RngCore};
use tokio::task::JoinSet;

use crate::child::{self, Child};
use crate::monitor::Monitor;
use crate::report::{self, RelayFigures, Report};
use crate::stats::{message_key, read_stamp, stamped, Tally};
use crate::{parse_duration, RelayArgs};

/// Sender, sequence and intended send time, at the front of every message.
const HEADER: usize = 16;
/// The same three as hex text, at the front of every E2E text message.
const TEXT_HEADER: usize = 32;
/// How long deliveries may trail the last send before what is missing counts as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Clone)]
pub struct ChatArgs {
    /// Users, in pairs (rounded up to an even number).
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Open loop: messages per second each user sends. Without it, closed loop: each user
    /// keeps `--window` messages in flight.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: messages in flight per user (sends an E2E client has under way at
    /// once; `--window 1` is a user who waits for each send before the next).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Message size in bytes (the plaintext; padding is added on top in E2E mode).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// How long to send.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Opaque envelopes over bare connections instead of full E2E clients.
    #[arg(long)]
    raw_envelopes: bool,
    /// Put this string in every plaintext, then scan the relay's data dir and log for it.
    #[arg(long)]
    plaintext_canary: Option<String>,
    #[command(flatten)]
    relay: RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and latency percentiles over time to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Closed-loop ramp: run `--duration` at each load, doubling it from 1 message in
    /// flight per user up to `--window` (E2E: from 2 users up to `--users`), report the
    /// maximum sustained rate, then run open loop at half of it for the latency there.
    #[arg(long, conflicts_with = "rate")]
    ramp: bool,
}

impl ChatArgs {
    /// Raw envelopes through a relay the bench starts (for the comparison).
    pub fn raw(
        users: usize,
        window: usize,
        rate: Option<f64>,
        size: usize,
        duration: Duration,
    ) -> Self {
        ChatArgs {
            users,
            rate,
            window,
            size,
            duration,
            raw_envelopes: true,
            plaintext_canary: None,
            relay: RelayArgs::default(),
            json: None,
            plot: None,
            ramp: false,
        }
    }
}

/// The relay a run talks to: one the bench started, or one given by address.
pub struct Target {
    pub options: ConnectOptions,
    pub child: Option<Child>,
    pub pid: Option<u32>,
}

impl Target {
    pub async fn open(args: &RelayArgs, config: &str) -> anyhow::Result<Self> {
        if let (Some(address), Some(fingerprint)) = (&args.relay, &args.fingerprint) {
            let pin = child::parse_fingerprint(fingerprint)?;
            return Ok(Target {
                options: ConnectOptions::new(*address, Trust::Pinned(pin)),
                child: None,
                pid: args.relay_pid,
            });
        }
        let (options, child) = child::start_hush_relay(config, args.keep_data.as_deref()).await?;
        let pid = child.pid();
        Ok(Target {
            options,
            child: Some(child),
            pid,
        })
    }

    /// The admin socket of a relay the bench started.
    pub fn admin_socket(&self) -> Option<PathBuf> {
        Some(self.child.as_ref()?.dir().join("data").join("admin.sock"))
    }

    /// The relay's group-commit counters (fsyncs, writes), asked over its admin socket.
    pub fn commit_counts(&self) -> Option<(u64, u64)> {
        let values =
            self.metrics(&["hush_store_commits_total", "hush_store_commit_writes_total"])?;
        Some((values[0], values[1]))
    }

    /// The relay's metrics of these names (with their labels, if any), asked over its
    /// admin socket (only when the bench started it).
    pub fn metrics<const N: usize>(&self, names: &[&str; N]) -> Option<[u64; N]> {
        let text = hush_server::admin::query(&self.admin_socket()?, "metrics").ok()?;
        let value = |name: &str| {
            text.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
                rest.trim().parse::<u64>().ok()
            })
        };
        // A labelled counter is left out until it is first counted.
        let mut values = [0; N];
        for (slot, name) in values.iter_mut().zip(names) {
            *slot = value(name).unwrap_or_default();
        }
        Some(values)
    }
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let reports = if args.ramp {
        ramp(&args).await?
    } else {
        vec![run(&args).await?]
    };
    if let Some(path) = &args.json {
        report::write_json(path, &reports)?;
    }
    if let Some(path) = &args.plot {
        report::plot(path, &reports)?;
    }
    reports.iter().try_for_each(Report::verdict)
}

/// The closed-loop ramp: one run per load step (each on a fresh relay when the bench
/// starts it), the highest delivered rate without loss, and an open-loop run at half that.
async fn ramp(args: &ChatArgs) -> anyhow::Result<Vec<Report>> {
    let (first, last) = if args.raw_envelopes {
        (1, args.window.max(1))
    } else {
        (2, args.users.max(2))
    };
    let mut reports = Vec::new();
    let mut step = first;
    loop {
        let mut load = args.clone();
        if args.raw_envelopes {
            load.window = step;
        } else {
            load.users = step;
        }
        let mut report = run(&load).await?;
        report.system = if args.raw_envelopes {
            format!("hush window {step}")
        } else {
            format!("hush {step} users")
        };
        reports.push(report);
        if step >= last {
            break;
        }
        step = (step * 2).min(last);
    }
    let best = reports
        .iter()
        .filter(|r| r.counts.lost == 0 && r.counts.duplicated == 0)
        .max_by(|a, b| {
            a.counts
                .delivered_per_s
                .total_cmp(&b.counts.delivered_per_s)
        })
        .map(|r| {
            (
                r.system.clone(),
                r.counts.delivered_per_s,
                r.config["users"].as_u64(),
            )
        });
    let Some((at, max_rate, Some(users))) = best else {
        bail!("no step of the ramp delivered everything it sent");
    };
    println!("\nmaximum sustained rate: {max_rate:.0} delivered msgs/s ({at})");
    let mut half = args.clone();
    half.users = users as usize;
    half.rate = Some(max_rate / 2.0 / users as f64);
    let mut report = run(&half).await?;
    "hush at 50% open".clone_into(&mut report.system);
    reports.push(report);
    report::print_table(&reports);
    Ok(reports)
}

/// Runs the scenario through Hush and prints the figures.
pub async fn run(args: &ChatArgs) -> anyhow::Result<Report> {
    let header = if args.raw_envelopes {
        HEADER
    } else {
        TEXT_HEADER
    };
    if args.size < header {
        bail!("--size must be at least {header}");
    }
    if args.raw_envelopes && args.plaintext_canary.is_some() {
        bail!("--plaintext-canary checks end-to-end encryption; raw envelopes have none");
    }
    if let Some(canary) = &args.plaintext_canary {
        if canary.len() + TEXT_HEADER > args.size {
            bail!("--size must hold the {TEXT_HEADER}-byte header and the canary");
        }
    }
    if args.rate.is_some_and(|rate| rate <= 0.0) {
        bail!("--rate must be positive");
    }
    let target = Target::open(&args.relay, "").await?;
    let report = load(args, &target).await?;
    report.print();
    let mut report = report;
    report.canary_found = match (&args.plaintext_canary, &target.child) {
        (Some(canary), Some(child)) => {
            let found = scan_for(child.dir(), canary.as_bytes());
            if found.is_empty() {
                println!(
                    "  plaintext canary    not found in {} (data dir and log)",
                    child.dir().display()
                );
            } else {
                println!("  plaintext canary    FOUND in {found:?}");
            }
            Some(!found.is_empty())
        }
        (Some(_), None) => {
            println!("  plaintext canary    not scanned: the relay was not started by the bench");
            None
        }
        _ => None,
    };
    if let (Some(dir), Some(_)) = (&args.relay.keep_data, &target.child) {
        println!("  relay data and log kept in {}", dir.display());
    }
    if let Some(child) = target.child {
        child.stop().await;
    }
    Ok(report)
}

/// Registers the users on `target`, runs the load and measures it; prints only the live
/// progress line.
pub async fn load(args: &ChatArgs, target: &Target) -> anyhow::Result<Report> {
    let users = args.users.max(2).div_ceil(2) * 2;
    let client_dirs = tempfile::tempdir()?;
    let parties = if args.raw_envelopes {
        raw_parties(&target.options, users).await?
    } else {
        e2e_parties(&target.options, users, client_dirs.path()).await?
    };

    let tally = Arc::new(Tally::new()?);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = JoinSet::new();
    for party in &parties {
        receivers.spawn(party.clone().receive(tally.clone(), epoch, stop.clone()));
    }

    let mode = match args.rate {
        Some(rate) => format!("open loop, {rate} msgs/s per user"),
        None => format!("closed loop, {} in flight per user", args.window),
    };
    let label = if args.raw_envelopes {
        "chat --raw-envelopes"
    } else {
        "chat (E2E clients)"
    };
    println!("{label}: {users} users, {} B messages, {mode}", args.size);
    let monitor = Monitor::start(tally.clone(), target.pid, args.duration, label);
    let relay_cpu_before = target.pid.map(child::process_cpu_s).transpose()?;
    let bench_cpu_before = child::process_cpu_s(std::process::id())?;
    let commits_before = target.commit_counts();
    let deadline = Instant::now() + args.duration;
    let mut senders = JoinSet::new();
    for (index, party) in parties.iter().enumerate() {
        let plan = SendPlan {
            party: party.clone(),
            to: parties[index ^ 1].address(),
            index: index as u32,
            size: args.size,
            canary: args.plaintext_canary.clone(),
            epoch,
            deadline,
            tally: tally.clone(),
        };
        if let Some(rate) = args.rate {
            senders.spawn(plan.open_loop(rate));
        } else {
            let lanes = args.window.max(1);
            for lane in 0..lanes {
                senders.spawn(plan.clone().closed_loop(lane, lanes));
            }
        }
    }
    while senders.join_next().await.is_some() {}
    let window = args.duration.max(epoch.elapsed().min(args.duration * 2));
    let seconds = window.as_secs_f64();
    let delivered_in_window = Tally::count(&tally.delivered);
    let relay_cpu = match (relay_cpu_before, target.pid) {
        (Some(before), Some(pid)) => Some(child::process_cpu_s(pid)? - before),
        _ => None,
    };
    let bench_cpu = child::process_cpu_s(std::process::id())? - bench_cpu_before;
    let commits = target
        .commit_counts()
        .zip(commits_before)
        .map(|(after, before)| (after.0 - before.0, after.1 - before.1));

    tally.wait_for_delivery(DRAIN_LIMIT).await;
    stop.store(true, Ordering::Relaxed);
    let timeline = monitor.finish().await;
    for party in &parties {
        party.close();
    }
    while receivers.join_next().await.is_some() {}

    let relay = target.child.as_ref().map(|child| RelayFigures {
        cpu_cores: relay_cpu.unwrap_or_default() / seconds,
        rss_peak_bytes: timeline
            .iter()
            .filter_map(|s| s.relay_rss_bytes)
            .max()
            .unwrap_or_default(),
        rss_end_bytes: child.rss_bytes().unwrap_or_default(),
        store_bytes: child::dir_size(&child.dir().join("data")),
        fsyncs_per_s: commits.map(|(c, _)| c as f64 / seconds),
        writes_per_fsync: commits.map(|(c, w)| w as f64 / c.max(1) as f64),
    });
    let report = Report {
        scenario: label.to_owned(),
        system: "hush".to_owned(),
        durability: "after the fsync of a group commit (P4)".to_owned(),
        config: serde_json::json!({
            "users": users, "size": args.size, "rate_per_user": args.rate,
            "window": args.window,
            "duration_s": args.duration.as_secs_f64(), "raw_envelopes": args.raw_envelopes,
            "relay_started_by_bench": target.child.is_some(),
            "plaintext_canary": args.plaintext_canary.is_some(),
        }),
        duration_s: seconds,
        counts: tally.counts(seconds, delivered_in_window),
        relay,
        bench_cpu_cores: bench_cpu / seconds,
        timeline,
        canary_found: None,
    };
    Ok(report)
}

/// Files under `dir` that contain `needle`.
fn scan_for(dir: &std::path::Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            found.extend(scan_for(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|window| window == needle) {
                found.push(path);
            }
        }
    }
    found
}

/// One simulated user.
#[derive(Clone)]
enum Party {
    Raw {
        connection: Arc<Connection>,
        address: DeviceAddress,
    },
    E2e {
        client: Arc<Client>,
        account: AccountId,
    },
}

/// Whom a party writes to.
#[derive(Clone, Copy)]
enum Address {
    Device(DeviceAddress),
    Account(AccountId),
}

impl Party {
    fn address(&self) -> Address {
        match self {
            Party::Raw { address, .. } => Address::Device(*address),
            Party::E2e { account, .. } => Address::Account(*account),
        }
    }

    fn close(&self) {
        match self {
            Party::Raw { connection, .. } => connection.close(),
            Party::E2e { client, .. } => client.close(),
        }
    }

    async fn send(&self, to: Address, message: Vec<u8>) -> bool {
        match (self, to) {
            (Party::Raw { connection, .. }, Address::Device(to)) => {
                connection.send_to(&[to], message).await.is_ok()
            }
            (Party::E2e { client, .. }, Address::Account(to)) => {
                // The message is ASCII (hex header, canary, filler) by construction.
                let text = String::from_utf8_lossy(&message).into_owned();
                client.send_text(to, &text).await.is_ok()
            }
            _ => false,
        }
    }

    async fn receive(self, tally: Arc<Tally>, epoch: Instant, stop: Arc<AtomicBool>) {
        match self {
            Party::Raw { connection, .. } => receive_raw(connection, tally, epoch, stop).await,
            Party::E2e { client, .. } => receive_e2e(client, tally, epoch, stop).await,
        }
    }
}

async fn raw_parties(options: &ConnectOptions, users: usize) -> anyhow::Result<Vec<Party>> {
    let mut parties = Vec::with_capacity(users);
    for _ in 0..users {
        let connection = Connection::connect(options)
            .await
            .context("connecting a user")?;
        let address = connection
            .register(b"bench", &DeviceKey::generate(), None)
            .await?;
        parties.push(Party::Raw {
            connection: Arc::new(connection),
            address,
        });
    }
    Ok(parties)
}

/// Registers `users` full clients, each with its own encrypted store, and makes partners
/// contacts of each other.
async fn e2e_parties(
    options: &ConnectOptions,
    users: usize,
    dirs: &std::path::Path,
) -> anyhow::Result<Vec<Party>> {
    let mut clients = Vec::with_capacity(users);
    for index in 0..users {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let config = ClientConfig::new(
            options.clone(),
            dirs.join(index.to_string()),
            StorageKey::from_bytes(key),
        );
        clients.push(
            Client::create(config, None)
                .await
                .context("creating a user")?,
        );
    }
    let mut parties = Vec::with_capacity(users);
    for pair in clients.chunks(2) {
        let [a, b] = pair else { continue };
        let b_account = a.add_contact(&b.contact_card().await).await?;
        let a_account = b.add_contact(&a.contact_card().await).await?;
        parties.push((a_account, b_account));
    }
    Ok(clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            let (a, b) = parties[index / 2];
            Party::E2e {
                client: Arc::new(client),
                account: if index % 2 == 0 { a } else { b },
            }
        })
        .collect())
}

/// What one user sends, and until when.
#[derive(Clone)]
struct SendPlan {
    party: Party,
    to: Address,
    index: u32,
    size: usize,
    canary: Option<String>,
    epoch: Instant,
    deadline: Instant,
    tally: Arc<Tally>,
}

impl SendPlan {
    fn message(&self, sequence: u32, due: Instant) -> Vec<u8> {
        let nanos = u64::try_from(due.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        match self.party {
            Party::Raw { .. } => stamped(self.index, sequence, nanos, self.size),
            Party::E2e { .. } => {
                let mut text = format!("{:08x}{sequence:08x}{nanos:016x}", self.index);
                text.push_str(self.canary.as_deref().unwrap_or_default());
                let mut message = text.into_bytes();
                message.resize(self.size, b'~');
                message
            }
        }
    }

    async fn send(&self, sequence: u32, due: Instant) {
        if self.party.send(self.to, self.message(sequence, due)).await {
            self.tally.sent();
        } else {
            self.tally.failed();
        }
    }

    /// Keeps one send in flight on this lane; lanes interleave sequence numbers.
    async fn closed_loop(self, lane: usize, lanes: usize) {
        let mut sequence = lane as u32;
        while Instant::now() < self.deadline {
            self.send(sequence, Instant::now()).await;
            sequence += lanes as u32;
        }
    }

    /// Sends on a fixed schedule, whether or not earlier sends have returned. One task per
    /// user keeps its sends in flight and one timer, and sends every message that is due
    /// when it wakes: a task and a timer per message cost the bench more CPU than the
    /// relay's work for the message, on the cores the relay is measured on.
    async fn open_loop(self, per_second: f64) {
        let interval = Duration::from_secs_f64(1.0 / per_second);
        // Users start spread over one interval, not all at once.
        let start = Instant::now() + interval.mul_f64(f64::from(self.index % 64) / 64.0);
        let due = |sequence: u32| start + interval * sequence;
        let mut in_flight = FuturesUnordered::new();
        let mut sequence = 0u32;
        let timer = tokio::time::sleep_until(due(0).into());
        tokio::pin!(timer);
        while due(sequence) < self.deadline {
            tokio::select! {
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                () = &mut timer => {}
            }
            let now = Instant::now();
            while due(sequence) <= now && due(sequence) < self.deadline {
                in_flight.push(self.send(sequence, due(sequence)));
                sequence += 1;
            }
            timer.as_mut().reset(due(sequence).into());
        }
        while in_flight.next().await.is_some() {}
    }
}

async fn receive_raw(
    connection: Arc<Connection>,
    tally: Arc<Tally>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) {
    let (acks, queue) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_loop(connection.clone(), queue));
    loop {
        let event = tokio::select! {
            event = connection.next_event() => event,
            () = tokio::time::sleep(STOP_POLL), if stop.load(Ordering::Relaxed) => break,
        };
        match event {
            Some(Event::Envelope(envelope)) => {
                if let Some((key, due)) = read_stamp(&envelope.payload) {
                    let due = epoch + Duration::from_nanos(due);
                    tally.delivered(key, due.elapsed());
                }
                let _ = acks.send(envelope.id);
            }
            Some(Event::Closed(_)) | None => break,
            Some(_) => {}
        }
    }
    // The acks still queued go out before the connection closes.
    drop(acks);
    let _ = acker.await;
}

/// Once the run has stopped, a receiver leaves after this long without an envelope (or when
/// its connection closes).
const STOP_POLL: Duration = Duration::from_millis(50);

/// Acknowledges received envelopes as `hush-client` does: one ack in flight, carrying
/// whatever arrived while the previous one was being committed, so acks batch by
/// themselves under load, and the relay's delivery window never waits on a timer here.
async fn ack_loop(
    connection: Arc<Connection>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<EnvelopeId>,
) {
    while let Some(first) = queue.recv().await {
        let mut ids = vec![first];
        while ids.len() < hush_client::protocol::limits::MAX_ACKS_PER_FRAME {
            match queue.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        let _ = connection.ack(&ids).await;
    }
}

async fn receive_e2e(
    client: Arc<Client>,
    tally: Arc<Tally>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) {
    loop {
        let event = tokio::select! {
            event = client.next_event() => event,
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
        };
        match event {
            Some(ClientEvent::Message { message, .. }) => {
                if let Body::Text { text } = &message.body {
                    if let Some((key, due)) = parse_text(text) {
                        let due = epoch + Duration::from_nanos(due);
                        tally.delivered(key, due.elapsed());
                    }
                }
            }
            Some(_) => {}
            None => break,
        }
    }
}

fn parse_text(text: &str) -> Option<(u64, u64)> {
    let sender = u32::from_str_radix(text.get(..8)?, 16).ok()?;
    let sequence = u32::from_str_radix(text.get(8..16)?, 16).ok()?;
    let due = u64::from_str_radix(text.get(16..32)?, 16).ok()?;
    Some((message_key(sender, sequence), due))
}
