//! The `idle` scenario: C connected devices that say nothing. What each one costs the
//! relay in memory, and whether they all stay connected (keep-alives against the idle
//! timeout).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::chat::Target;
use crate::child;
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
    let mut target = Target::open(&args.relay, &config).await?;
    println!("idle: {} connected, quiet devices", args.connections);

    // New devices: each registers an account, so what the relay gains also holds the
    // store's pages and caches those registrations filled.
    let rss_before = settled_rss(&target).await?;
    let begun = Instant::now();
    let sockets = Sockets::new(&target.options, args.connections)?;
    let connections = devices::register(&sockets, args.connections).await?;
    let setup_s = begun.elapsed().as_secs_f64();
    println!(
        "  registered          {} in {setup_s:.1} s (each registered an account)",
        connections.len()
    );
    let mut new = hold(&target, connections, args.hold, rss_before).await?;
    new.print("new devices");

    // Returning devices, the everyday case: the accounts exist, the relay restarts, and
    // every device connects and authenticates again. What the relay gains now is what
    // the connections cost.
    let child = target.child.take().context("the relay child")?;
    let guard = child.terminate(Duration::from_secs(60)).await;
    let (options, child) = child::start_hush_relay_in(guard, &config).await?;
    target.pid = child.pid();
    target.child = Some(child);
    target.options = options;
    let rss_before_return = settled_rss(&target).await?;
    let begun = Instant::now();
    let sockets = Sockets::new(&target.options, args.connections)?;
    let connections = devices::reconnect_all(&sockets, std::mem::take(&mut new.devices)).await?;
    let reconnect_s = begun.elapsed().as_secs_f64();
    println!(
        "  reconnected         {} in {reconnect_s:.1} s after a relay restart",
        connections.len()
    );
    let returning = hold(&target, connections, args.hold, rss_before_return).await?;
    returning.print("returning devices");

    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scenario": "idle",
            "config": { "connections": args.connections, "hold_s": args.hold.as_secs_f64() },
            "setup_s": setup_s,
            "reconnect_s": reconnect_s,
            "new_devices": new.json(),
            "returning_devices": returning.json(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(child) = target.child.take() {
        child.stop().await;
    }
    for figures in [&new, &returning] {
        if figures.open < args.connections {
            bail!(
                "{} of {} connections were dropped while idle",
                args.connections - figures.open,
                args.connections
            );
        }
    }
    Ok(())
}

/// The relay's RSS once it has been quiet for a second.
async fn settled_rss(target: &Target) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let child = target.child.as_ref().context("the relay child")?;
    child.rss_bytes()
}

/// What one phase of idle connections cost.
struct Held {
    devices: Vec<devices::Device>,
    connections: usize,
    open: usize,
    hold: Duration,
    rss_before: u64,
    rss_end: u64,
    rss_peak: u64,
}

/// Holds `connections` open and quiet for `hold`, sampling the relay's RSS each second;
/// then closes them.
async fn hold(
    target: &Target,
    connections: Vec<(devices::Device, hush_client::Connection)>,
    hold: Duration,
    rss_before: u64,
) -> anyhow::Result<Held> {
    let child = target.child.as_ref().context("the relay child")?;
    let mut rss_peak = 0;
    let held = Instant::now();
    while held.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak = rss_peak.max(child.rss_bytes()?);
    }
    let rss_end = child.rss_bytes()?;
    let open = connections
        .iter()
        .filter(|(_, connection)| connection.close_code().is_none())
        .count();
    let count = connections.len();
    let devices = connections
        .into_iter()
        .map(|(device, connection)| {
            connection.close();
            device
        })
        .collect();
    Ok(Held {
        devices,
        connections: count,
        open,
        hold,
        rss_before,
        rss_end,
        rss_peak,
    })
}

impl Held {
    fn per_connection(&self) -> f64 {
        self.rss_end.saturating_sub(self.rss_before) as f64 / self.connections.max(1) as f64
    }

    fn print(&self, what: &str) {
        let mib = |bytes: u64| bytes as f64 / 1_048_576.0;
        println!(
            "  {what}: relay RSS {:.1} MiB before, {:.1} MiB with them (peak {:.1} MiB)",
            mib(self.rss_before),
            mib(self.rss_end),
            mib(self.rss_peak)
        );
        println!(
            "  {what}: {:.1} KiB per idle connection, still open after {:.0} s: {}",
            self.per_connection() / 1024.0,
            self.hold.as_secs_f64(),
            self.open
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "relay_rss_before_bytes": self.rss_before,
            "relay_rss_end_bytes": self.rss_end,
            "relay_rss_peak_bytes": self.rss_peak,
            "relay_bytes_per_connection": self.per_connection(),
            "still_open": self.open,
        })
    }
}
