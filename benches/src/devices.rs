//! Many bare devices at once: registering, reconnecting, sending and draining opaque
//! envelopes. The scenarios that are about the relay's connections and mailboxes
//! (backlog, reconnect-storm, idle) use these rather than full clients.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hush_client::protocol::{DeviceAddress, EnvelopeId};
use hush_client::{ConnectOptions, Connection, Connector, DeviceKey, Event};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Handshakes in flight at once while setting up.
const SETUP_CONCURRENCY: usize = 64;
/// Connections that share one client UDP socket. The relay's handshake flights to all of
/// a socket's connections land in that one socket's receive buffer (the kernel's default,
/// about 208 KiB, about 50 flights): more sharing loses packets in a storm on the bench's
/// side and shows up as the relay's latency.
const CONNECTIONS_PER_SOCKET: usize = 32;

/// A registered device the bench can connect again.
pub struct Device {
    pub address: DeviceAddress,
    pub key: DeviceKey,
}

/// A pool of client sockets that connections share, as many phones behind few NATs would
/// not, but as one bench process must (a socket per connection runs out of ports).
pub struct Sockets {
    connectors: Vec<Connector>,
}

impl Sockets {
    pub fn new(options: &ConnectOptions, connections: usize) -> anyhow::Result<Arc<Self>> {
        let count = connections.div_ceil(CONNECTIONS_PER_SOCKET).max(1);
        let connectors = (0..count)
            .map(|_| Connector::new(options.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(Sockets { connectors }))
    }

    pub async fn connect(&self, index: usize) -> anyhow::Result<Connection> {
        Ok(self.connectors[index % self.connectors.len()]
            .connect()
            .await?)
    }
}

/// Registers `count` devices (one account each); returns them with their open
/// connections, in order.
pub async fn register(
    sockets: &Arc<Sockets>,
    count: usize,
) -> anyhow::Result<Vec<(Device, Connection)>> {
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let (sockets, gate) = (sockets.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await?;
            let connection = sockets.connect(index).await?;
            let key = DeviceKey::generate();
            let address = connection.register(b"bench", &key, None).await?;
            anyhow::Ok((index, Device { address, key }, connection))
        });
    }
    collect_in_order(tasks, "registering a device").await
}

/// Connects and authenticates as `device`.
pub async fn reconnect(
    sockets: &Sockets,
    index: usize,
    device: &Device,
) -> anyhow::Result<Connection> {
    let connection = sockets.connect(index).await?;
    connection
        .authenticate(device.address, &device.key)
        .await
        .context("authenticating")?;
    Ok(connection)
}

/// Connects and authenticates every one of `devices` (device `i` on socket `i`), a few
/// handshakes at a time; returns the connections in the same order.
pub async fn reconnect_all(
    sockets: &Arc<Sockets>,
    devices: Vec<Device>,
) -> anyhow::Result<Vec<(Device, Connection)>> {
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for (index, device) in devices.into_iter().enumerate() {
        let (sockets, gate) = (sockets.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await?;
            let connection = reconnect(&sockets, index, &device).await?;
            anyhow::Ok((index, device, connection))
        });
    }
    collect_in_order(tasks, "reconnecting a device").await
}

/// Waits for every set-up task; the first failure (named `what`) fails the whole set.
async fn collect_in_order(
    mut tasks: JoinSet<anyhow::Result<(usize, Device, Connection)>>,
    what: &'static str,
) -> anyhow::Result<Vec<(Device, Connection)>> {
    let mut devices = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        devices.push(done?.context(what)?);
    }
    devices.sort_by_key(|(index, _, _)| *index);
    Ok(devices
        .into_iter()
        .map(|(_, device, connection)| (device, connection))
        .collect())
}

/// Reads envelopes until `expected` distinct ones have arrived (or `limit` passes),
/// acknowledging them in batches; returns how many arrived and how many came twice.
pub async fn drain(connection: &Connection, expected: u64, limit: Duration) -> (u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = 0;
    let mut pending: Vec<EnvelopeId> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while (seen.len() as u64) < expected {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, connection.next_event()).await
        else {
            break;
        };
        match event {
            Event::Envelope(envelope) => {
                if !seen.insert(envelope.payload.get(..8).map(<[u8]>::to_vec)) {
                    duplicates += 1;
                }
                pending.push(envelope.id);
                if pending.len() >= 256 {
                    let _ = connection.ack(&std::mem::take(&mut pending)).await;
                }
            }
            Event::Closed(_) => break,
            _ => {}
        }
    }
    if !pending.is_empty() {
        let _ = connection.ack(&pending).await;
    }
    (seen.len() as u64, duplicates)
}

/// An envelope payload of `size` bytes whose first 8 bytes are `key`.
pub fn payload(key: u64, size: usize) -> Vec<u8> {
    let mut bytes = key.to_be_bytes().to_vec();
    bytes.resize(size.max(8), 0x5A);
    bytes
}
