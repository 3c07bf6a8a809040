//! A UDP forwarder between clients and a relay on loopback that can hold back one client
//! socket: a relay that is slow to answer one connection, for tests of what must not wait
//! on it. Held packets are dropped both ways; QUIC retransmits them once released.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// No source is held.
const NONE: usize = usize::MAX;

/// The forwarder. Sources are numbered in the order their first packet arrived.
pub struct UdpProxy {
    addr: SocketAddr,
    held: Arc<AtomicUsize>,
    /// Packets from the held source dropped so far.
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl UdpProxy {
    /// Forwards to `relay` from a new loopback port.
    pub async fn start(relay: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let held = Arc::new(AtomicUsize::new(NONE));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(forward(front, relay, held.clone(), dropped.clone()));
        UdpProxy {
            addr,
            held,
            dropped,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every packet from and to the `source`-th client socket until released.
    pub fn hold(&self, source: usize) {
        self.held.store(source, Ordering::SeqCst);
    }

    /// Waits (boundedly) until the held source has sent a packet that was dropped: it is
    /// then waiting on the relay.
    pub async fn wait_for_dropped(&self) {
        let start = self.dropped.load(Ordering::SeqCst);
        tokio::time::timeout(super::WAIT, async {
            while self.dropped.load(Ordering::SeqCst) == start {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the held source sends");
    }

    /// Forwards everything again.
    pub fn release(&self) {
        self.held.store(NONE, Ordering::SeqCst);
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    front: Arc<UdpSocket>,
    relay: SocketAddr,
    held: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
) {
    let mut upstreams: HashMap<SocketAddr, (usize, Arc<UdpSocket>)> = HashMap::new();
    let mut returns = Vec::new();
    let mut buffer = vec![0u8; 65_536];
    while let Ok((len, source)) = front.recv_from(&mut buffer).await {
        let next = upstreams.len();
        let (index, upstream) = if let Some(entry) = upstreams.get(&source) {
            entry.clone()
        } else {
            let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
            upstream.connect(relay).await.unwrap();
            returns.push(tokio::spawn(back(
                upstream.clone(),
                front.clone(),
                source,
                next,
                held.clone(),
            )));
            upstreams.insert(source, (next, upstream.clone()));
            (next, upstream)
        };
        if held.load(Ordering::SeqCst) == index {
            dropped.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = upstream.send(&buffer[..len]).await;
        }
    }
    for task in returns {
        task.abort();
    }
}

/// Relay to client, for one source.
async fn back(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    index: usize,
    held: Arc<AtomicUsize>,
) {
    let mut buffer = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut buffer).await {
        if held.load(Ordering::SeqCst) != index {
            let _ = front.send_to(&buffer[..len], client).await;
        }
    }
}
