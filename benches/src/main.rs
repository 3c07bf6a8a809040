//! `hush-bench`: drives a relay with simulated users over loopback QUIC and reports what
//! it delivered, how fast, with what latency, and at what cost to the relay.
//!
//! Scenarios: `chat` (users in pairs, full E2E clients or `--raw-envelopes`), `backlog`
//! (offline receivers, a restart, then a drain), `reconnect-storm`, `idle` (memory per
//! connection), `calls` (concurrent 1:1 call media, beside coturn) and `abuse` (a
//! well-behaved load beside connection attacks); one module each.

mod abuse;
mod backlog;
mod broker;
mod calls;
mod chat;
mod child;
mod compare;
mod devices;
mod idle;
mod monitor;
mod mqtt;
mod nats;
mod report;
mod soak;
mod stats;
mod storm;
mod turn;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hush-bench",
    about = "Load-testing bench client for the Hush relay"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Users in pairs writing to each other: full E2E clients, or opaque envelopes.
    Chat(chat::ChatArgs),
    /// Receivers offline while envelopes queue; a relay restart; then all drain at once.
    Backlog(backlog::BacklogArgs),
    /// Every device reconnects at the same moment and fetches what waited for it.
    ReconnectStorm(storm::StormArgs),
    /// Connected, quiet devices: the relay's memory per connection.
    Idle(idle::IdleArgs),
    /// Concurrent 1:1 calls (50 frames/s each way, 160 B), optionally beside coturn.
    Calls(calls::CallArgs),
    /// The same raw chat load through Hush, NATS JetStream and mosquitto, side by side.
    Compare(compare::CompareArgs),
    /// Steady load with periodic reconnects for a long time: memory, descriptors, errors.
    Soak(soak::SoakArgs),
    /// A well-behaved raw chat load, alone and beside each connection attack in turn.
    Abuse(abuse::AbuseArgs),
}

/// Which relay a run uses: by default one the bench starts (a child `hush-relay` with a
/// temporary data dir), or a running one.
#[derive(clap::Args, Clone, Default)]
pub struct RelayArgs {
    /// A running relay to use instead of starting one (needs --fingerprint).
    #[arg(long, requires = "fingerprint")]
    relay: Option<SocketAddr>,
    /// The running relay's certificate fingerprint (hex).
    #[arg(long)]
    fingerprint: Option<String>,
    /// The running relay's process id, to sample its CPU time and memory.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// When the bench starts the relay: keep its data dir and log in this directory.
    #[arg(long, conflicts_with = "relay")]
    keep_data: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {text:?} (use ms, s or m)")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.scenario {
        Scenario::Chat(args) => runtime.block_on(chat::chat(args)),
        Scenario::Backlog(args) => runtime.block_on(backlog::backlog(args)),
        Scenario::ReconnectStorm(args) => runtime.block_on(storm::storm(args)),
        Scenario::Idle(args) => runtime.block_on(idle::idle(args)),
        Scenario::Calls(args) => runtime.block_on(calls::calls(args)),
        Scenario::Compare(args) => runtime.block_on(compare::compare(args)),
        Scenario::Soak(args) => runtime.block_on(soak::soak(args)),
        Scenario::Abuse(args) => runtime.block_on(abuse::abuse(args)),
    }
}
