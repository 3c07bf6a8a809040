//! The chat load through NATS JetStream, for the comparison: a child `nats-server` (Debian's
//! package) on loopback with file storage, one work-queue stream, one durable push
//! consumer with explicit acks per user, and publishes that wait for JetStream's ack.
//!
//! The client speaks the NATS text protocol directly (CONNECT, SUB, PUB with a reply
//! subject, MSG/HMSG, PING/PONG): a few lines, and no second async runtime in the bench.
//! Durability: nats-server 2.9 acknowledges a JetStream publish once it is written to the
//! OS's buffers and fsyncs on a timer (2 minutes); the `sync_interval: always` setting
//! that fsyncs every write arrived in 2.10, so this is the strongest the installed version
//! offers, and it is weaker than Hush's promise P4.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::broker::{self, Load, User, Users};
use crate::child::{self, Child};
use crate::stats::Tally;

/// What a JetStream publish acknowledgement means with the installed server.
pub const DURABILITY: &str = "after a write to OS buffers; fsync every 2 min";
const STREAM: &str = "BENCH";

/// Starts `nats-server` with JetStream on a free loopback port.
pub async fn start() -> anyhow::Result<(SocketAddr, Child)> {
    broker::start("nats-server", |port, dir| {
        Ok(format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n}}\n",
            dir.join("js").display()
        ))
    })
    .await
}

/// A message the server sent us.
struct Message {
    subject: String,
    reply: Option<String>,
    payload: Vec<u8>,
}

/// One NATS connection: a writer task fed by a channel, and a reader the owner drives.
struct Conn {
    out: mpsc::UnboundedSender<Vec<u8>>,
    reader: BufReader<OwnedReadHalf>,
}

impl Conn {
    async fn open(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let out = broker::spawn_writer(write);
        let conn = Conn {
            out,
            reader: BufReader::new(read),
        };
        conn.send(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\n"
                .to_vec(),
        );
        Ok(conn)
    }

    fn send(&self, bytes: Vec<u8>) {
        let _ = self.out.send(bytes);
    }

    fn publish(&self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let mut bytes = match reply {
            Some(reply) => format!("PUB {subject} {reply} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        }
        .into_bytes();
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(b"\r\n");
        self.send(bytes);
    }

    /// The next message, answering pings on the way; `None` when the connection ends.
    async fn next(&mut self) -> anyhow::Result<Option<Message>> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Ok(None);
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("PING") => self.send(b"PONG\r\n".to_vec()),
                Some("-ERR") => bail!("nats-server: {}", line.trim()),
                Some("MSG") => {
                    // MSG <subject> <sid> [reply] <bytes>
                    let (reply, len) = match words.len() {
                        5 => (Some(words[3].to_owned()), words[4]),
                        _ => (None, *words.last().context("short MSG")?),
                    };
                    let payload = self.body(len.parse()?).await?;
                    return Ok(Some(Message {
                        subject: words[1].to_owned(),
                        reply,
                        payload,
                    }));
                }
                Some("HMSG") => {
                    // HMSG <subject> <sid> [reply] <header bytes> <total bytes>
                    let (reply, header, total) = match words.len() {
                        6 => (Some(words[3].to_owned()), words[4], words[5]),
                        _ => (None, words[3], words[4]),
                    };
                    let body = self.body(total.parse()?).await?;
                    let header: usize = header.parse()?;
                    return Ok(Some(Message {
                        subject: words[1].to_owned(),
                        reply,
                        payload: body.get(header..).unwrap_or_default().to_vec(),
                    }));
                }
                _ => {} // INFO, PONG, +OK
            }
        }
    }

    async fn body(&mut self, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut body = vec![0; len + 2];
        self.reader.read_exact(&mut body).await?;
        body.truncate(len);
        Ok(body)
    }

    /// A request and its reply, before the connection is shared out.
    async fn request(&mut self, subject: &str, payload: &str) -> anyhow::Result<String> {
        self.send(b"SUB _INBOX.setup 99\r\n".to_vec());
        self.publish(subject, Some("_INBOX.setup"), payload.as_bytes());
        let reply = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.next().await? {
                    Some(message) if message.subject == "_INBOX.setup" => {
                        return anyhow::Ok(String::from_utf8_lossy(&message.payload).into_owned())
                    }
                    Some(_) => {}
                    None => bail!("nats-server closed the connection"),
                }
            }
        })
        .await
        .context("no reply from nats-server")??;
        self.send(b"UNSUB 99\r\n".to_vec());
        if reply.contains("\"error\"") {
            bail!("{subject}: {reply}");
        }
        Ok(reply)
    }
}

/// Runs the chat load through JetStream; counts go to `tally`.
pub async fn run(address: SocketAddr, load: &Load, tally: Arc<Tally>) -> anyhow::Result<()> {
    let mut admin = Conn::open(address).await?;
    let subjects: Vec<String> = (0..load.users).map(|u| format!("bench.u{u}")).collect();
    admin
        .request(
            &format!("$JS.API.STREAM.CREATE.{STREAM}"),
            &serde_json::json!({
                "name": STREAM, "subjects": ["bench.>"], "retention": "workqueue",
                "storage": "file", "num_replicas": 1,
            })
            .to_string(),
        )
        .await?;
    let mut users = Users::new(load);
    for user in 0..load.users {
        let mut conn = Conn::open(address).await?;
        conn.request(
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.c{user}"),
            &serde_json::json!({
                "stream_name": STREAM,
                "config": {
                    "durable_name": format!("c{user}"), "deliver_subject": format!("deliver.u{user}"),
                    "filter_subject": subjects[user], "ack_policy": "explicit",
                    "deliver_policy": "all", "max_ack_pending": 65_536,
                },
            })
            .to_string(),
        )
        .await?;
        conn.send(format!("SUB _INBOX.u{user}.* 1\r\nSUB deliver.u{user} 2\r\n").into_bytes());
        let user = users.user(user, subjects[user ^ 1].clone(), *load, tally.clone());
        users.add(user_loop(conn, user));
    }
    users.run(&tally).await?;
    drop(admin);
    Ok(())
}

/// One user: publishes to its partner's subject (closed loop with `window` in flight, or
/// open loop at `rate`), and consumes and acks its own.
async fn user_loop(mut conn: Conn, user: User) -> anyhow::Result<()> {
    let index = user.index;
    let (permits, publisher) = user.publish(conn.out.clone(), move |to, sequence, payload| {
        let mut bytes =
            format!("PUB {to} _INBOX.u{index}.{sequence} {}\r\n", payload.len()).into_bytes();
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(b"\r\n");
        bytes
    });
    let inbox = format!("_INBOX.u{index}.");
    while user.running() {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(100), conn.next()).await else {
            continue;
        };
        let Some(message) = next? else { break };
        if message.subject.starts_with(&inbox) {
            // JetStream's publish ack: {"stream":..,"seq":..} or an error.
            if message.payload.windows(7).any(|w| w == b"\"error\"") {
                user.tally.failed();
            } else {
                user.tally.sent();
            }
            permits.add_permits(1);
        } else if let Some(reply) = &message.reply {
            user.delivered(&message.payload);
            conn.publish(reply, None, b"");
        }
    }
    publisher.abort();
    Ok(())
}

/// The server's store size.
pub fn store_bytes(child: &Child) -> u64 {
    child::dir_size(&child.dir().join("js"))
}
