//! The `idle` scenario: C connected devices that say nothing. What each one costs the
//! relay in memory, and whether they all stay connected (keep-alives against the idle
//! timeout).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::chat::Target;
use crate::devices::{self, Sockets};
use crate::{parse_duration, RelayArgs};

#[derive(clap::Args, Clone)]
pub struct IdleArgs {
    /// Connected devices.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// How long they stay connected after the last one is up.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    hold: Duration,
    #[command(flatten)]
    relay: RelayArgs,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    if args.relay.relay.is_some() {
        bail!("idle measures the relay's memory: let the bench start it");
    }
    // Room for every connection; Retry off as in the other many-connection scenarios.
    let config = format!(
        "[limits]\nmax_connections = {}\nrequire_address_validation = false\n",
        args.connections + 1000
    );
    let target = Target::open(&args.relay, &config).await?;
    let child = target.child.as_ref().context("the relay child")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = child.rss_bytes()?;
    println!("idle: {} connected, quiet devices", args.connections);

    let begun = Instant::now();
    let sockets = Sockets::new(&target.options, args.connections)?;
    let connections = devices::register(&sockets, args.connections).await?;
    let setup_s = begun.elapsed().as_secs_f64();
    println!(
        "  connected           {} in {setup_s:.1} s (each registered an account)",
        connections.len()
    );

    let mut rss_peak = 0;
    let held = Instant::now();
    while held.elapsed() < args.hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak = rss_peak.max(child.rss_bytes()?);
    }
    let rss_end = child.rss_bytes()?;
    let open = connections
        .iter()
        .filter(|(_, connection)| connection.close_code().is_none())
        .count();
    let per_connection = rss_end.saturating_sub(rss_before) as f64 / args.connections as f64;
    println!(
        "  relay RSS           {:.1} MiB before, {:.1} MiB with them (peak {:.1} MiB)",
        rss_before as f64 / 1_048_576.0,
        rss_end as f64 / 1_048_576.0,
        rss_peak as f64 / 1_048_576.0
    );
    println!(
        "  per idle connection {:.1} KiB   still open after {:.0} s: {open}",
        per_connection / 1024.0,
        args.hold.as_secs_f64()
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "idle",
            "config": { "connections": args.connections, "hold_s": args.hold.as_secs_f64() },
            "setup_s": setup_s,
            "relay_rss_before_bytes": rss_before,
            "relay_rss_end_bytes": rss_end,
            "relay_rss_peak_bytes": rss_peak,
            "relay_bytes_per_connection": per_connection,
            "still_open": open,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    for (_, connection) in &connections {
        connection.close();
    }
    if open < args.connections {
        bail!(
            "{} of {} connections were dropped while idle",
            args.connections - open,
            args.connections
        );
    }
    Ok(())
}
