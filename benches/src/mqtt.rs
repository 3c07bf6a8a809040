//! The chat load through mosquitto, for the comparison: a child `mosquitto` (Debian's
//! package) on loopback with persistence on, and per user one MQTT 3.1.1 connection with a
//! persistent session (clean session off, a fixed client id), a QoS 1 subscription to its
//! own topic, and QoS 1 publishes to its partner's that wait for the broker's PUBACK.
//!
//! The client speaks the handful of MQTT packets it needs directly (CONNECT, SUBSCRIBE,
//! PUBLISH, PUBACK): no second async runtime in the bench.
//! Durability: mosquitto answers a QoS 1 publish with PUBACK once the message is in its
//! memory; persistence saves the whole in-memory state to one file every
//! `autosave_interval` seconds (and on shutdown), so an acknowledged message is lost by a
//! crash before the next save. One second is the shortest interval short of a save per
//! change, which rewrites the whole database for every message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::broker::{self, Load, User, Users};
use crate::child::{self, Child};
use crate::stats::Tally;

/// How often the broker saves its state, in seconds.
const AUTOSAVE_SECS: u32 = 1;

/// What a QoS 1 PUBACK means with this configuration.
pub const DURABILITY: &str = "in memory; whole state saved to disk every 1 s";

const CONNECT: u8 = 0x10;
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const PUBACK: u8 = 0x40;
const SUBSCRIBE: u8 = 0x82;
const SUBACK: u8 = 0x90;
const QOS_1: u8 = 0x02;
/// The biggest remaining length MQTT can encode (four 7-bit digits).
const MAX_REMAINING: usize = 268_435_455;

/// Starts `mosquitto` on a free loopback port, with persistence and no queue limits (the
/// defaults drop QoS 1 messages beyond 1,000 queued per client).
pub async fn start() -> anyhow::Result<(SocketAddr, Child)> {
    broker::start("mosquitto", |port, dir| {
        let store = dir.join("store");
        std::fs::create_dir_all(&store)?;
        Ok(format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval {AUTOSAVE_SECS}\n\
             max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\n",
            store.display()
        ))
    })
    .await
}

/// One MQTT packet: the fixed header's first byte and the rest.
struct Packet {
    kind: u8,
    body: Vec<u8>,
}

/// One MQTT connection: a writer task fed by a channel, and a reader the owner drives.
struct Conn {
    out: mpsc::UnboundedSender<Vec<u8>>,
    reader: BufReader<OwnedReadHalf>,
}

impl Conn {
    /// Connects with a persistent session under `client_id`.
    async fn open(address: SocketAddr, client_id: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut conn = Conn {
            out: broker::spawn_writer(write),
            reader: BufReader::new(read),
        };
        let mut body = Vec::new();
        put_string(&mut body, "MQTT");
        // Level 4 (3.1.1); flags 0: clean session off, so the session persists; keep-alive
        // 0: the run is short and the broker must not drop a busy reader.
        body.extend_from_slice(&[4, 0, 0, 0]);
        put_string(&mut body, client_id);
        conn.send(packet(CONNECT, &body));
        let ack = conn.expect(CONNACK).await?;
        if ack.body.get(1) != Some(&0) {
            bail!("mosquitto refused the connection: {:?}", ack.body);
        }
        Ok(conn)
    }

    fn send(&self, bytes: Vec<u8>) {
        let _ = self.out.send(bytes);
    }

    async fn subscribe(&mut self, topic: &str) -> anyhow::Result<()> {
        let mut body = 1u16.to_be_bytes().to_vec();
        put_string(&mut body, topic);
        body.push(1);
        self.send(packet(SUBSCRIBE, &body));
        let ack = self.expect(SUBACK).await?;
        if ack.body.get(2) != Some(&1) {
            bail!("mosquitto did not grant QoS 1 on {topic}: {:?}", ack.body);
        }
        Ok(())
    }

    async fn expect(&mut self, kind: u8) -> anyhow::Result<Packet> {
        let packet = tokio::time::timeout(Duration::from_secs(10), self.next())
            .await
            .context("no answer from mosquitto")??
            .context("mosquitto closed the connection")?;
        if packet.kind & 0xF0 != kind & 0xF0 {
            bail!(
                "expected packet {kind:#x} from mosquitto, got {:#x}",
                packet.kind
            );
        }
        Ok(packet)
    }

    /// The next packet; `None` when the connection ends.
    async fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        let kind = match self.reader.read_u8().await {
            Ok(kind) => kind,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut len = 0usize;
        for shift in (0..28).step_by(7) {
            let digit = self.reader.read_u8().await?;
            len |= usize::from(digit & 0x7F) << shift;
            if digit & 0x80 == 0 {
                let mut body = vec![0; len];
                self.reader.read_exact(&mut body).await?;
                return Ok(Some(Packet { kind, body }));
            }
        }
        bail!("malformed remaining length from mosquitto")
    }
}

/// A packet with its fixed header.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    debug_assert!(body.len() <= MAX_REMAINING);
    let mut bytes = Vec::with_capacity(body.len() + 5);
    bytes.push(kind);
    let mut len = body.len();
    loop {
        let digit = (len % 128) as u8;
        len /= 128;
        bytes.push(if len > 0 { digit | 0x80 } else { digit });
        if len == 0 {
            break;
        }
    }
    bytes.extend_from_slice(body);
    bytes
}

fn put_string(bytes: &mut Vec<u8>, text: &str) {
    bytes.extend_from_slice(&(text.len() as u16).to_be_bytes());
    bytes.extend_from_slice(text.as_bytes());
}

/// A QoS 1 PUBLISH; packet ids run 1..=65535 (0 is not allowed).
fn publish(topic: &str, sequence: u32, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    put_string(&mut body, topic);
    body.extend_from_slice(&packet_id(sequence).to_be_bytes());
    body.extend_from_slice(payload);
    packet(PUBLISH | QOS_1, &body)
}

fn packet_id(sequence: u32) -> u16 {
    (sequence % 65_535) as u16 + 1
}

/// Runs the chat load through mosquitto; counts go to `tally`.
pub async fn run(address: SocketAddr, load: &Load, tally: Arc<Tally>) -> anyhow::Result<()> {
    let topics: Vec<String> = (0..load.users).map(|u| format!("bench/u{u}")).collect();
    let mut users = Users::new(load);
    for user in 0..load.users {
        let mut conn = Conn::open(address, &format!("hush-bench-u{user}")).await?;
        conn.subscribe(&topics[user]).await?;
        let user = users.user(user, topics[user ^ 1].clone(), *load, tally.clone());
        users.add(user_loop(conn, user));
    }
    users.run(&tally).await
}

/// One user: publishes to its partner's topic (closed loop with `window` in flight, or
/// open loop at `rate`), and takes and acknowledges what arrives on its own.
async fn user_loop(mut conn: Conn, user: User) -> anyhow::Result<()> {
    let (permits, publisher) = user.publish(conn.out.clone(), publish);
    while user.running() {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(100), conn.next()).await else {
            continue;
        };
        let Some(incoming) = next? else { break };
        match incoming.kind & 0xF0 {
            PUBACK => {
                user.tally.sent();
                permits.add_permits(1);
            }
            PUBLISH => {
                let body = &incoming.body;
                let topic_len = usize::from(u16::from_be_bytes(
                    body.get(..2).context("short PUBLISH")?.try_into()?,
                ));
                let id = body
                    .get(2 + topic_len..4 + topic_len)
                    .context("short PUBLISH")?;
                user.delivered(body.get(4 + topic_len..).unwrap_or_default());
                conn.send(packet(PUBACK, id));
            }
            _ => {}
        }
    }
    publisher.abort();
    Ok(())
}

/// The broker's store size.
pub fn store_bytes(child: &Child) -> u64 {
    child::dir_size(&child.dir().join("store"))
}
