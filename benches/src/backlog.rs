//! The `backlog` scenario: receivers go offline while senders queue M envelopes for them;
//! the relay restarts with that backlog on disk (start-up time); then every receiver
//! connects at once and drains its mailbox (drain rate, exact counts).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::task::JoinSet;

use crate::chat::Target;
use crate::child::{self, dir_size};
use crate::devices::{self, Sockets};
use crate::RelayArgs;

/// Many thousands of handshakes share a few client sockets here; QUIC Retry is off for
/// the same reason as in the calls scenario (see `calls.rs`).
const RELAY_CONFIG: &str = "[limits]\nrequire_address_validation = false\n";
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Clone)]
pub struct BacklogArgs {
    /// Envelopes to queue.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Offline receivers the envelopes are spread over.
    #[arg(long, default_value_t = 100)]
    receivers: usize,
    /// Sending connections.
    #[arg(long, default_value_t = 16)]
    senders: usize,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Envelope size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Do not restart the relay between queueing and draining.
    #[arg(long)]
    no_restart: bool,
    #[command(flatten)]
    relay: RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn backlog(args: BacklogArgs) -> anyhow::Result<()> {
    if args.receivers == 0 || args.senders == 0 || args.window == 0 {
        bail!("--receivers, --senders and --window must be at least 1");
    }
    let mut target = Target::open(&args.relay, RELAY_CONFIG).await?;
    let sockets = Sockets::new(&target.options, args.receivers + args.senders)?;
    println!(
        "backlog: {} envelopes of {} B for {} offline receivers",
        args.messages, args.size, args.receivers
    );
    let receivers: Vec<_> = devices::register(&sockets, args.receivers)
        .await?
        .into_iter()
        .map(|(device, connection)| {
            connection.close();
            device
        })
        .collect();
    let senders = devices::register(&sockets, args.senders).await?;

    // Queue: lanes take the next message number until all are sent.
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let addresses: Arc<Vec<_>> = Arc::new(receivers.iter().map(|d| d.address).collect());
    let started = Instant::now();
    let mut lanes = JoinSet::new();
    let connections: Vec<_> = senders.into_iter().map(|(_, c)| Arc::new(c)).collect();
    for connection in &connections {
        for _ in 0..args.window {
            let (connection, next, failed, addresses) = (
                connection.clone(),
                next.clone(),
                failed.clone(),
                addresses.clone(),
            );
            let (total, size) = (args.messages, args.size);
            lanes.spawn(async move {
                loop {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    if key >= total {
                        break;
                    }
                    let to = addresses[(key % addresses.len() as u64) as usize];
                    if connection
                        .send_to(&[to], devices::payload(key, size))
                        .await
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    while lanes.join_next().await.is_some() {}
    let queue_s = started.elapsed().as_secs_f64();
    for connection in &connections {
        connection.close();
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} sends failed while queueing");
    }
    println!(
        "  queued              {} in {queue_s:.1} s ({:.0} msgs/s, durable)",
        args.messages,
        args.messages as f64 / queue_s
    );
    let store_bytes = target
        .child
        .as_ref()
        .map(|child| dir_size(&child.dir().join("data")));
    if let Some(bytes) = store_bytes {
        println!(
            "  store               {:.1} MiB",
            bytes as f64 / 1_048_576.0
        );
    }

    // Restart with the backlog on disk: how long until it listens again.
    let mut startup_s = None;
    if !args.no_restart {
        if let Some(child) = target.child.take() {
            let guard = child.terminate(Duration::from_secs(60)).await;
            let begun = Instant::now();
            let (options, child) = child::start_hush_relay_in(guard, RELAY_CONFIG).await?;
            let seconds = begun.elapsed().as_secs_f64();
            println!("  relay start-up      {seconds:.2} s with the backlog on disk");
            startup_s = Some(seconds);
            target.pid = child.pid();
            target.child = Some(child);
            target.options = options;
        }
    }

    // Everyone back at once, each draining its mailbox.
    let sockets = Sockets::new(&target.options, args.receivers)?;
    let relay_cpu_before = target.pid.map(child::process_cpu_s).transpose()?;
    let begun = Instant::now();
    let mut drains = JoinSet::new();
    for (index, device) in receivers.into_iter().enumerate() {
        let sockets = sockets.clone();
        let expected = args.messages / args.receivers as u64
            + u64::from((index as u64) < args.messages % args.receivers as u64);
        drains.spawn(async move {
            let connection = devices::reconnect(&sockets, index, &device).await?;
            let (got, duplicates) = devices::drain(&connection, expected, DRAIN_LIMIT).await;
            connection.close();
            anyhow::Ok((expected, got, duplicates))
        });
    }
    let (mut expected, mut delivered, mut duplicated) = (0, 0, 0);
    while let Some(done) = drains.join_next().await {
        let (e, got, dups) = done??;
        expected += e;
        delivered += got;
        duplicated += dups;
    }
    let drain_s = begun.elapsed().as_secs_f64();
    let relay_cpu = match (relay_cpu_before, target.pid) {
        (Some(before), Some(pid)) => Some(child::process_cpu_s(pid)? - before),
        _ => None,
    };
    let lost = expected.saturating_sub(delivered);
    println!(
        "  drained             {delivered} in {drain_s:.1} s ({:.0} msgs/s)   lost {lost}   \
         duplicated {duplicated}",
        delivered as f64 / drain_s
    );
    if let Some(cpu) = relay_cpu {
        println!("  relay CPU (drain)   {:.2} cores", cpu / drain_s);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "backlog",
            "config": {
                "messages": args.messages, "receivers": args.receivers, "senders": args.senders,
                "window": args.window, "size": args.size, "restart": !args.no_restart,
            },
            "queued": args.messages, "queue_s": queue_s,
            "queue_per_s": args.messages as f64 / queue_s,
            "store_bytes": store_bytes,
            "startup_s": startup_s,
            "delivered": delivered, "lost": lost, "duplicated": duplicated,
            "drain_s": drain_s, "drain_per_s": delivered as f64 / drain_s,
            "relay_cpu_cores_drain": relay_cpu.map(|cpu| cpu / drain_s),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(child) = target.child {
        child.stop().await;
    }
    if lost > 0 || duplicated > 0 {
        bail!("{lost} queued envelopes lost, {duplicated} duplicated");
    }
    Ok(())
}
