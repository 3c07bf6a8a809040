//! `compare`: the same raw chat load (users in pairs, opaque messages of one size, acked
//! sends, exact delivery counts) through Hush and through NATS JetStream, side by side in
//! one run, each with the durability it offers named.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::chat::{self, ChatArgs};
use crate::child::{self, which};
use crate::monitor::Monitor;
use crate::nats;
use crate::parse_duration;
use crate::report::{self, RelayFigures, Report};
use crate::stats::Tally;

#[derive(clap::Args, Clone)]
pub struct CompareArgs {
    /// Users, in pairs.
    #[arg(long, default_value_t = 32)]
    users: usize,
    /// Closed loop: messages in flight per user.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Open loop instead: messages per second per user.
    #[arg(long)]
    rate: Option<f64>,
    /// Message size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// How long each system is driven.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw both systems' throughput over time to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let users = args.users.max(2).div_ceil(2) * 2;
    let hush = chat::run(&ChatArgs::raw(
        users,
        args.window,
        args.rate,
        args.size,
        args.duration,
    ))
    .await?;
    let mut reports = vec![hush];
    if which("nats-server").is_some() {
        reports.push(run_nats(&args, users).await?);
    } else {
        eprintln!(
            "!!! nats-server is not installed (apt-get install nats-server): SKIPPING \
             NATS JetStream !!!"
        );
    }
    report::print_table(&reports);
    if let [hush, nats] = &reports[..] {
        println!(
            "\nhush delivers {:.2}x the rate of NATS JetStream",
            hush.counts.delivered_per_s / nats.counts.delivered_per_s.max(1.0)
        );
    }
    if let Some(path) = &args.json {
        report::write_json(path, &reports)?;
    }
    if let Some(path) = &args.plot {
        report::plot(path, &reports)?;
    }
    for report in &reports {
        report.verdict()?;
    }
    Ok(())
}

async fn run_nats(args: &CompareArgs, users: usize) -> anyhow::Result<Report> {
    let (address, server) = nats::start().await?;
    let pid = server.pid().context("nats-server exited")?;
    let tally = Arc::new(Tally::new()?);
    let label = "chat through NATS JetStream";
    println!(
        "{label}: {users} users, {} B messages, {}",
        args.size,
        args.rate.map_or(
            format!("closed loop, {} in flight per user", args.window),
            |r| format!("open loop, {r} msgs/s per user")
        )
    );
    let monitor = Monitor::start(tally.clone(), Some(pid), args.duration, label);
    let cpu_before = child::process_cpu_s(pid)?;
    let bench_before = child::process_cpu_s(std::process::id())?;
    let load = nats::Load {
        users,
        window: args.window,
        rate: args.rate,
        size: args.size,
        duration: args.duration,
    };
    let delivered_at_deadline = {
        let tally = tally.clone();
        let deadline = tokio::time::Instant::now() + args.duration;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            Tally::count(&tally.delivered)
        })
    };
    let cpu_at_deadline = {
        let deadline = tokio::time::Instant::now() + args.duration;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            (
                child::process_cpu_s(pid).unwrap_or_default(),
                child::process_cpu_s(std::process::id()).unwrap_or_default(),
            )
        })
    };
    nats::run(address, &load, tally.clone()).await?;
    let timeline = monitor.finish().await;
    let seconds = args.duration.as_secs_f64();
    let (cpu_after, bench_after) = cpu_at_deadline.await?;
    let delivered_in_window = delivered_at_deadline.await?;
    let report = Report {
        scenario: "chat --raw-envelopes".to_owned(),
        system: "nats-jetstream".to_owned(),
        durability: nats::DURABILITY.to_owned(),
        config: serde_json::json!({
            "users": users, "size": args.size, "rate_per_user": args.rate,
            "window": args.window, "duration_s": seconds,
            "server": "nats-server 2.9 (Debian), file storage, work-queue stream, R1, \
                       durable push consumers, explicit acks",
        }),
        duration_s: seconds,
        counts: tally.counts(seconds, delivered_in_window),
        relay: Some(RelayFigures {
            cpu_cores: (cpu_after - cpu_before) / seconds,
            rss_peak_bytes: timeline
                .iter()
                .filter_map(|s| s.relay_rss_bytes)
                .max()
                .unwrap_or_default(),
            rss_end_bytes: server.rss_bytes().unwrap_or_default(),
            store_bytes: nats::store_bytes(&server),
            fsyncs_per_s: None,
            writes_per_fsync: None,
        }),
        bench_cpu_cores: (bench_after - bench_before) / seconds,
        timeline,
        canary_found: None,
    };
    report.print();
    server.stop().await;
    Ok(report)
}
