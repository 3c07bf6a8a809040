//! `compare`: the same raw chat load (users in pairs, opaque messages of one size, acked
//! sends, exact delivery counts) through Hush, through NATS JetStream and through
//! mosquitto, side by side in one run, each with the durability it offers named.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::broker::Load;
use crate::chat::{self, ChatArgs};
use crate::child::{self, which, Child};
use crate::monitor::Monitor;
use crate::parse_duration;
use crate::report::{self, RelayFigures, Report};
use crate::stats::Tally;
use crate::{mqtt, nats};

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
    for broker in [Broker::NatsJetStream, Broker::Mosquitto] {
        if which(broker.binary()).is_some() {
            reports.push(run_broker(broker, &args, users).await?);
        } else {
            eprintln!(
                "!!! {} is not installed (apt-get install {}): SKIPPING {} !!!",
                broker.binary(),
                broker.package(),
                broker.name()
            );
        }
    }
    report::print_table(&reports);
    if let Some((hush, others)) = reports.split_first() {
        for other in others {
            println!(
                "hush delivers {:.2}x the rate of {}",
                hush.counts.delivered_per_s / other.counts.delivered_per_s.max(1.0),
                other.system
            );
        }
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

/// The brokers Hush is compared with.
#[derive(Clone, Copy)]
enum Broker {
    NatsJetStream,
    Mosquitto,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::NatsJetStream => "NATS JetStream",
            Broker::Mosquitto => "mosquitto",
        }
    }

    fn system(self) -> &'static str {
        match self {
            Broker::NatsJetStream => "nats-jetstream",
            Broker::Mosquitto => "mosquitto",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Broker::NatsJetStream => "nats-server",
            Broker::Mosquitto => "mosquitto",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Broker::NatsJetStream => "nats-server",
            Broker::Mosquitto => "mosquitto",
        }
    }

    fn durability(self) -> &'static str {
        match self {
            Broker::NatsJetStream => nats::DURABILITY,
            Broker::Mosquitto => mqtt::DURABILITY,
        }
    }

    fn setup(self) -> &'static str {
        match self {
            Broker::NatsJetStream => {
                "nats-server 2.9 (Debian), file storage, work-queue stream, R1, durable push \
                 consumers, explicit acks"
            }
            Broker::Mosquitto => {
                "mosquitto 2.0 (Debian), MQTT 3.1.1, QoS 1 both ways, persistent sessions, \
                 persistence on, no queue limits"
            }
        }
    }

    async fn start(self) -> anyhow::Result<(SocketAddr, Child)> {
        match self {
            Broker::NatsJetStream => nats::start().await,
            Broker::Mosquitto => mqtt::start().await,
        }
    }

    async fn drive(
        self,
        address: SocketAddr,
        load: &Load,
        tally: Arc<Tally>,
    ) -> anyhow::Result<()> {
        match self {
            Broker::NatsJetStream => nats::run(address, load, tally).await,
            Broker::Mosquitto => mqtt::run(address, load, tally).await,
        }
    }

    fn store_bytes(self, server: &Child) -> u64 {
        match self {
            Broker::NatsJetStream => nats::store_bytes(server),
            Broker::Mosquitto => mqtt::store_bytes(server),
        }
    }
}

async fn run_broker(broker: Broker, args: &CompareArgs, users: usize) -> anyhow::Result<Report> {
    let (address, server) = broker.start().await?;
    let pid = server
        .pid()
        .with_context(|| format!("{} exited", broker.binary()))?;
    let tally = Arc::new(Tally::new()?);
    let label = format!("chat through {}", broker.name());
    println!(
        "{label}: {users} users, {} B messages, {}",
        args.size,
        args.rate.map_or(
            format!("closed loop, {} in flight per user", args.window),
            |r| format!("open loop, {r} msgs/s per user")
        )
    );
    let monitor = Monitor::start(tally.clone(), Some(pid), args.duration, &label);
    let cpu_before = child::process_cpu_s(pid)?;
    let bench_before = child::process_cpu_s(std::process::id())?;
    let load = Load {
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
    broker.drive(address, &load, tally.clone()).await?;
    let timeline = monitor.finish().await;
    let seconds = args.duration.as_secs_f64();
    let (cpu_after, bench_after) = cpu_at_deadline.await?;
    let delivered_in_window = delivered_at_deadline.await?;
    let report = Report {
        scenario: "chat --raw-envelopes".to_owned(),
        system: broker.system().to_owned(),
        durability: broker.durability().to_owned(),
        config: serde_json::json!({
            "users": users, "size": args.size, "rate_per_user": args.rate,
            "window": args.window, "duration_s": seconds, "server": broker.setup(),
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
            store_bytes: broker.store_bytes(&server),
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
