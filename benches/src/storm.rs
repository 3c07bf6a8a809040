//! The `reconnect-storm` scenario: every device drops off, one envelope is queued for
//! each, and all reconnect at the same moment (a relay restart or a network blip as the
//! devices see it). How long until each is back and has its envelope, and what the storm
//! costs the relay.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::chat::Target;
use crate::child;
use crate::devices::{self, Sockets};
use crate::stats::Percentiles;
use crate::RelayArgs;

const RECONNECT_LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Clone)]
pub struct StormArgs {
    /// Devices that reconnect at once.
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    #[command(flatten)]
    relay: RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn storm(args: StormArgs) -> anyhow::Result<()> {
    let config = format!(
        "[limits]\nmax_connections = {}\nrequire_address_validation = false\n",
        args.users + 1000
    );
    let target = Target::open(&args.relay, &config).await?;
    let sockets = Sockets::new(&target.options, args.users + 1)?;
    println!("reconnect-storm: {} devices", args.users);
    let mut registered = devices::register(&sockets, args.users + 1).await?;
    let (_, sender) = registered
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no sender"))?;
    let users: Vec<_> = registered
        .into_iter()
        .map(|(device, connection)| {
            connection.close();
            device
        })
        .collect();
    for (index, device) in users.iter().enumerate() {
        sender
            .send_to(&[device.address], devices::payload(index as u64, 256))
            .await?;
    }

    let relay_cpu_before = target.pid.map(child::process_cpu_s).transpose()?;
    let begun = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, device) in users.into_iter().enumerate() {
        let sockets = sockets.clone();
        tasks.spawn(async move {
            let connection = devices::reconnect(&sockets, index, &device).await?;
            let back = begun.elapsed();
            let (got, _) = devices::drain(&connection, 1, RECONNECT_LIMIT).await;
            let delivered = begun.elapsed();
            anyhow::Ok((back, delivered, got, connection))
        });
    }
    let mut back = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut delivered_at = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut delivered, mut failed) = (0u64, 0u64);
    let mut connections = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok((reconnected, got_it, got, connection)) => {
                let _ = back.record(micros(reconnected));
                if got == 1 {
                    delivered += 1;
                    let _ = delivered_at.record(micros(got_it));
                }
                connections.push(connection);
            }
            Err(_) => failed += 1,
        }
    }
    let storm_s = begun.elapsed().as_secs_f64();
    let relay_cpu = match (relay_cpu_before, target.pid) {
        (Some(before), Some(pid)) => Some(child::process_cpu_s(pid)? - before),
        _ => None,
    };
    let reconnect = Percentiles::of(&back);
    let first_envelope = Percentiles::of(&delivered_at);
    println!(
        "  all back in         {storm_s:.2} s   failed reconnects {failed}   envelopes delivered \
         {delivered}/{}",
        args.users
    );
    println!(
        "  reconnected by ms   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        reconnect.p50, reconnect.p90, reconnect.p99, reconnect.max
    );
    println!(
        "  envelope by ms      p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        first_envelope.p50, first_envelope.p90, first_envelope.p99, first_envelope.max
    );
    if let Some(cpu) = relay_cpu {
        println!("  relay CPU           {cpu:.2} CPU-s for the storm");
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "reconnect-storm",
            "config": { "users": args.users },
            "storm_s": storm_s,
            "failed_reconnects": failed,
            "delivered": delivered,
            "reconnected_ms": reconnect,
            "envelope_delivered_ms": first_envelope,
            "relay_cpu_s": relay_cpu,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    for connection in &connections {
        connection.close();
    }
    if let Some(child) = target.child {
        child.stop().await;
    }
    if failed > 0 || delivered < args.users as u64 {
        bail!(
            "{failed} reconnects failed, {} envelopes not delivered",
            args.users as u64 - delivered.min(args.users as u64)
        );
    }
    Ok(())
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}
