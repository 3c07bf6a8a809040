//! The operator interface: a Unix socket `admin.sock` in the data dir, mode 0600 (the
//! data dir itself is 0700), so only the relay's own user can reach it. Nothing of it
//! listens on the network.
//!
//! The protocol is one text line in, text lines out, then the relay closes the
//! connection:
//!
//! - `cdr-report`: the day-level call statistics, one line per day (no identities);
//! - `retention`: the retention rules in force, what is held and when it goes.
//! - `metrics`: the relay's counters (Prometheus text; counts only, nothing about anyone).
//!
//! `hush-relay admin <command>` is the client ([`query`]).

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::cdr::{day_report, format_time};
use crate::commit::CommitStats;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{read_blocking, RetentionSummary, Store, StoreError};

/// The socket's file name in the data dir.
pub const SOCKET_NAME: &str = "admin.sock";
/// The longest command line read.
const MAX_COMMAND: u64 = 256;
/// How long a client has to send its command, and a query to be answered.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The admin socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A relay is already serving this data dir.
    #[error("{0} is in use: another relay runs on this data dir")]
    InUse(PathBuf),
    /// Binding, connecting, reading or writing failed.
    #[error("admin socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the admin socket reads: the store (day statistics, what is held), the committer's
/// counters, the relay's counters and the retention rules in force. Nothing it could
/// write with.
pub(crate) struct AdminView {
    /// Read through the blocking pool, one query a command.
    pub store: Arc<dyn Store>,
    /// Commits and the writes they carried.
    pub commits: Arc<CommitStats>,
    /// The relay's counters.
    pub metrics: Arc<Metrics>,
    /// The configuration, for the retention rules.
    pub config: Config,
}

/// The listening admin socket; [`AdminSocket::stop`] closes it and removes the file.
pub(crate) struct AdminSocket {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl AdminSocket {
    /// Binds `path` (replacing a stale socket left by a relay that did not stop cleanly)
    /// and serves commands.
    pub(crate) fn start(path: &Path, view: AdminView) -> Result<Self, AdminError> {
        let io = |source| AdminError::Io {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            // A socket that answers belongs to a running relay; one that does not is stale.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        // Who may talk to the socket: the user who runs the relay (the socket's owner),
        // and root. The file mode says the same; this holds even if the data dir's or the
        // socket's mode is ever looser than intended.
        let owner = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).map_err(io)?.uid()
        };
        let task = tokio::spawn(accept_loop(listener, Arc::new(view), owner));
        Ok(AdminSocket {
            path: path.to_owned(),
            task,
        })
    }

    /// Stops serving and removes the socket file.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, view: Arc<AdminView>, owner: u32) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: do not spin on it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|peer| peer.uid() == owner || peer.uid() == 0);
        if !allowed {
            tracing::warn!("refused an admin connection from another user");
            continue;
        }
        let view = view.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(TIMEOUT, serve(stream, &view)).await;
        });
    }
}

async fn serve(stream: UnixStream, view: &AdminView) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_COMMAND))
        .read_line(&mut line)
        .await?;
    let answer = answer(line.trim(), view).await;
    write.write_all(answer.as_bytes()).await?;
    write.shutdown().await
}

async fn answer(command: &str, view: &AdminView) -> String {
    let store = view.store.clone();
    match command {
        "cdr-report" => match read_blocking(store, Store::day_stats).await {
            Ok(days) => day_report(&days),
            Err(error) => failure(&error),
        },
        "retention" => match read_blocking(store, Store::retention_summary).await {
            Ok(summary) => retention_report(&view.config, &summary),
            Err(error) => failure(&error),
        },
        "metrics" => {
            let stats = &view.commits;
            format!(
                "{}hush_store_commits_total {}\nhush_store_commit_writes_total {}\n",
                view.metrics.render(),
                Metrics::get(&stats.commits),
                Metrics::get(&stats.writes),
            )
        }
        _ => "error: unknown command; commands: cdr-report, retention, metrics\n".to_owned(),
    }
}

fn failure(error: &StoreError) -> String {
    tracing::error!(%error, "admin query failed");
    "error: the store could not be read\n".to_owned()
}

/// The `retention` answer: the rules in force, then what is held and when it goes.
pub fn retention_report(config: &Config, held: &RetentionSummary) -> String {
    let mut out = String::from("rules\n");
    let _ = writeln!(
        out,
        "  message_expiry_days {}: undelivered envelopes are deleted this long after \
         arrival (delivered ones when every device has acknowledged them)",
        config.message_expiry_days
    );
    let _ = writeln!(
        out,
        "  cdr_retention_days {}: call-detail records are deleted this long after the \
         call started; day counts (no identities) are kept",
        config.cdr_retention_days
    );
    out.push_str("held\n");
    let _ = writeln!(
        out,
        "  envelopes {}; the first expires {}",
        held.envelopes,
        held.oldest_envelope_expiry
            .map_or("-".to_owned(), format_time)
    );
    let _ = writeln!(
        out,
        "  call_records {}; the oldest is deleted {}",
        held.call_records,
        held.oldest_call_start
            .map_or("-".to_owned(), |start| format_time(
                start.saturating_add(config.cdr_retention_secs())
            ))
    );
    out
}

/// Sends `command` to the admin socket at `socket` and returns the relay's answer.
pub fn query(socket: &Path, command: &str) -> Result<String, AdminError> {
    let io = |source| AdminError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(io)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_report_names_rules_and_what_goes_when() {
        let config = Config {
            message_expiry_days: 7,
            cdr_retention_days: 30,
            ..Config::default()
        };
        let held = RetentionSummary {
            envelopes: 3,
            oldest_envelope_expiry: Some(86_400),
            call_records: 2,
            oldest_call_start: Some(0),
        };
        let report = retention_report(&config, &held);
        assert!(report.contains("message_expiry_days 7"), "{report}");
        assert!(report.contains("cdr_retention_days 30"), "{report}");
        assert!(report.contains("envelopes 3; the first expires 1970-01-02T00:00:00Z"));
        assert!(report.contains("call_records 2; the oldest is deleted 1970-01-31T00:00:00Z"));
        let empty = retention_report(&config, &RetentionSummary::default());
        assert!(
            empty.contains("envelopes 0; the first expires -"),
            "{empty}"
        );
    }
}
