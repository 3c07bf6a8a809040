//! Servers the bench runs as child processes (hush-relay, coturn, nats-server, mosquitto),
//! and what it samples of them from `/proc`: a child's CPU time and memory are its own,
//! not the bench's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use hush_client::{ConnectOptions, Trust};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Where a child keeps its files: a temporary directory, or one the user asked to keep.
enum Workdir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

/// A server running as a child of the bench; killed when dropped.
pub struct Child {
    child: tokio::process::Child,
    dir: Workdir,
}

impl Child {
    /// A fresh working directory: `keep` if given (created, and left behind), else a
    /// temporary one.
    pub fn workdir(keep: Option<&Path>) -> anyhow::Result<(PathBuf, WorkdirGuard)> {
        if let Some(path) = keep {
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating {}", path.display()))?;
            return Ok((
                path.to_owned(),
                WorkdirGuard(Workdir::Kept(path.to_owned())),
            ));
        }
        let dir = tempfile::tempdir()?;
        Ok((dir.path().to_owned(), WorkdirGuard(Workdir::Temporary(dir))))
    }

    /// Adopts a spawned process and the directory it works in.
    pub fn new(child: tokio::process::Child, dir: WorkdirGuard) -> Self {
        Child { child, dir: dir.0 }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Workdir::Temporary(dir) => dir.path(),
            Workdir::Kept(path) => path,
        }
    }

    /// Resident memory now, in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        process_rss_bytes(self.pid().context("the child has exited")?)
    }

    /// Stops the child and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks the child to shut down gracefully (SIGTERM), waits up to `limit` before
    /// killing it, and hands back its working directory.
    pub async fn terminate(mut self, limit: Duration) -> WorkdirGuard {
        if let Some(pid) = self.pid() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(limit, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        WorkdirGuard(self.dir)
    }
}

/// Keeps a working directory alive (or marks it as kept) until a child owns it.
pub struct WorkdirGuard(Workdir);

impl WorkdirGuard {
    pub fn path(&self) -> &Path {
        match &self.0 {
            Workdir::Temporary(dir) => dir.path(),
            Workdir::Kept(path) => path,
        }
    }
}

/// Starts `hush-relay serve` (the binary next to this one) on a free loopback port, with
/// its data in `<workdir>/data`, its log in `<workdir>/relay.log` and `config` (TOML) as
/// its configuration, and reads its address and fingerprint from what it prints.
pub async fn start_hush_relay(
    config: &str,
    keep: Option<&Path>,
) -> anyhow::Result<(ConnectOptions, Child)> {
    let (_, guard) = Child::workdir(keep)?;
    start_hush_relay_in(guard, config).await
}

/// Starts `hush-relay serve` in an existing working directory (a restart keeps its data).
pub async fn start_hush_relay_in(
    guard: WorkdirGuard,
    config: &str,
) -> anyhow::Result<(ConnectOptions, Child)> {
    let dir = guard.path().to_owned();
    let binary = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("hush-relay"))
        .filter(|path| path.exists())
        .context("hush-relay not found next to hush-bench: cargo build --release -p hush-server")?;
    let config_path = dir.join("relay.toml");
    std::fs::write(&config_path, with_bench_limits(config))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("relay.log"))?;
    let mut child = tokio::process::Command::new(&binary)
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("relay stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut address = None;
    let mut fingerprint = None;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("listening on ") {
                let text = rest.split_whitespace().next().unwrap_or_default();
                address = Some(text.parse::<SocketAddr>()?);
            } else if let Some(rest) = line.strip_prefix("certificate fingerprint (SHA-256): ") {
                fingerprint = Some(rest.trim().to_owned());
            }
            if address.is_some() && fingerprint.is_some() {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .context("the relay did not start within 60 s")??;
    let (Some(address), Some(fingerprint)) = (address, fingerprint) else {
        bail!(
            "the relay exited before printing its address (log: {})",
            dir.join("relay.log").display()
        );
    };
    // Keep reading so that the relay never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((
        ConnectOptions::new(address, Trust::Pinned(parse_fingerprint(&fingerprint)?)),
        Child::new(child, guard),
    ))
}

/// A certificate fingerprint given as hex.
pub fn parse_fingerprint(hex_text: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(hex_text.trim())?
        .try_into()
        .map_err(|_| anyhow!("a fingerprint is 32 bytes of hex"))
}

/// The process's user + system CPU time in seconds, all threads, from /proc.
pub fn process_cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3, "state";
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_s())
}

/// The process's resident set size in bytes (`VmRSS` in /proc/<pid>/status).
pub fn process_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS in /proc status")?
        .parse::<u64>()?;
    Ok(kib * 1024)
}

/// USER_HZ; 100 on every Linux this runs on, asked of getconf in case.
fn clock_ticks_per_s() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Bytes of every file under `path`.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A program on PATH (or in /usr/sbin, where Debian puts some servers).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([
            Path::new("/usr/sbin").to_owned(),
            Path::new("/usr/bin").to_owned(),
        ])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The bench plays a whole population of users from one loopback address, so the limits
/// that guard a relay against one address or one account doing that are lifted.
const BENCH_RATES: &str = "
[limits.connection_envelopes]
burst = 1000000000
refill = 1000000000
period_secs = 1
[limits.account_envelopes]
burst = 1000000000
refill = 1000000000
period_secs = 1
[limits.address_sealed_sends]
burst = 1000000000
refill = 1000000000
period_secs = 1
[limits.prekey_fetches]
burst = 1000000000
refill = 1000000000
period_secs = 1
[limits.registrations]
burst = 1000000000
refill = 1000000000
period_secs = 1
";

/// `config` with the per-address, per-account and per-device limits lifted (see
/// [`BENCH_RATES`]); the scenario's own `[limits]` settings stay.
fn with_bench_limits(config: &str) -> String {
    let scalars = "connections_per_address = 1000000000\n\
                   mailbox_max_envelopes = 1000000000000\n\
                   mailbox_max_bytes = 1000000000000000\n";
    let base = match config.split_once("[limits]\n") {
        Some((before, after)) => format!("{before}[limits]\n{scalars}{after}"),
        None => format!("{config}\n[limits]\n{scalars}"),
    };
    format!("{base}{BENCH_RATES}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_limits_merge_into_every_scenario_config() {
        for config in [
            "",
            "[limits]\nmax_connections = 5\nrequire_address_validation = false\n",
        ] {
            let merged = with_bench_limits(config);
            let parsed = hush_server::config::Config::from_toml(&merged)
                .unwrap_or_else(|e| panic!("{merged}: {e}"));
            assert_eq!(parsed.limits.connections_per_address, 1_000_000_000);
            assert_eq!(parsed.limits.registrations.burst, 1_000_000_000);
        }
    }
}
