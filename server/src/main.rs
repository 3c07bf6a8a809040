//! `hush-relay`: run the relay, or manage it offline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hush_server::clock::SystemClock;
use hush_server::config::Config;
use hush_server::redact::RedactingWriter;
use hush_server::signals;
use hush_server::store::{self, Write};
use hush_server::Relay;
use rand_core::{OsRng, RngCore};

#[derive(Parser)]
#[command(
    name = "hush-relay",
    version,
    about = "The Hush end-to-end encrypted messaging relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (database, storage keys, self-signed certificate).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (defaults: listen 127.0.0.1:4433, data dir ./hush-data).
    Serve {
        #[command(flatten)]
        common: Common,
        /// UDP address to listen on.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Create invite tokens for `registration = "invite"` (run while the relay is stopped).
    Invite {
        #[command(flatten)]
        common: Common,
        /// How many tokens to create.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Ask the running relay, over its admin socket (operator only).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
        /// The relay's data dir; its socket is `DIR/admin.sock` (default ./hush-data).
        #[arg(long, value_name = "DIR", global = true, conflicts_with = "socket")]
        data_dir: Option<PathBuf>,
        /// The admin socket itself.
        #[arg(long, value_name = "PATH", global = true)]
        socket: Option<PathBuf>,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum AdminCommand {
    /// Call statistics per day: calls, answered, unanswered, missed, minutes.
    CdrReport,
    /// The retention rules in force, what is held and when it goes.
    Retention,
    /// The relay's counters (Prometheus text format), group commits included.
    Metrics,
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &common.data_dir {
        config.data_dir.clone_from(dir);
    }
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // P9: every line passes the redaction layer, whatever RUST_LOG asks for.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(|| RedactingWriter::new(std::io::stderr()))
        .with_ansi(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve { common, listen } => {
            let mut config = load_config(&common)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            runtime.block_on(serve(config))
        }
        Command::Invite { common, count } => invite(&load_config(&common)?, count),
        Command::Admin {
            command,
            data_dir,
            socket,
        } => admin(command, data_dir, socket),
    }
}

fn admin(
    command: AdminCommand,
    data_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
) -> anyhow::Result<()> {
    let socket = socket.unwrap_or_else(|| {
        data_dir
            .unwrap_or_else(|| Config::default().data_dir)
            .join(hush_server::admin::SOCKET_NAME)
    });
    let command = match command {
        AdminCommand::CdrReport => "cdr-report",
        AdminCommand::Retention => "retention",
        AdminCommand::Metrics => "metrics",
    };
    let answer = hush_server::admin::query(&socket, command)
        .context("asking the relay (is it running on that data dir?)")?;
    print!("{answer}");
    if answer.starts_with("error:") {
        anyhow::bail!("the relay refused the command");
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _file_size_limit = signals::survive_file_size_limit()?;
    let data_dir = config.data_dir.clone();
    let relay = Relay::start(config, Arc::new(SystemClock))
        .await
        .context("starting the relay")?;
    println!("hush-relay {}", env!("CARGO_PKG_VERSION"));
    println!("listening on {} (QUIC, ALPN hush/1)", relay.local_addr());
    println!(
        "certificate fingerprint (SHA-256): {}",
        hex::encode(relay.fingerprint())
    );
    println!("data dir: {}", data_dir.display());
    signals::shutdown().await?;
    println!("shutting down");
    relay.shutdown().await;
    Ok(())
}

fn invite(config: &Config, count: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = store::open(
        config.store,
        &config.data_dir,
        config.limits.store_cache_bytes,
    )
    .context("opening the store (is the relay running? stop it first)")?;
    let mut tokens = Vec::new();
    let mut writes = Vec::new();
    for _ in 0..count {
        let mut raw = [0u8; 16];
        OsRng.fill_bytes(&mut raw);
        let token = hex::encode(raw);
        writes.push(Write::AddInvite {
            token: token.clone().into_bytes(),
        });
        tokens.push(token);
    }
    store.apply(writes)?;
    for token in tokens {
        println!("{token}");
    }
    Ok(())
}
