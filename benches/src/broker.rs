//! What the comparison's brokers share: the load's shape, a publisher that stamps
//! messages and paces them (open loop on a schedule, or closed loop with a window of
//! unacknowledged publishes), a coalescing TCP writer, and the users' start and stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::child::{which, Child};
use crate::stats::{read_stamp, stamped, Tally};

/// One run's load through a broker.
#[derive(Clone, Copy)]
pub struct Load {
    pub users: usize,
    pub window: usize,
    pub rate: Option<f64>,
    pub size: usize,
    pub duration: Duration,
}

impl Load {
    /// Publish permits: `window` for a closed loop, unbounded for an open one. The user
    /// adds a permit back for every publish acknowledgement.
    pub fn permits(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(if self.rate.is_some() {
            Semaphore::MAX_PERMITS
        } else {
            self.window
        }))
    }
}

/// Publishes `user`'s stamped messages until `deadline`, each through `publish(sequence,
/// payload)`, which returns false once the connection is gone.
pub async fn publish_until(
    load: Load,
    user: u32,
    epoch: Instant,
    deadline: Instant,
    permits: Arc<Semaphore>,
    mut publish: impl FnMut(u32, Vec<u8>) -> bool,
) {
    let interval = load.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let start = Instant::now();
    let mut sequence = 0u32;
    loop {
        let due = match interval {
            Some(interval) => {
                let due = start + interval * sequence;
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        if due >= deadline {
            break;
        }
        let Ok(permit) = permits.acquire().await else {
            break;
        };
        permit.forget();
        let nanos = u64::try_from(due.duration_since(epoch).as_nanos()).unwrap_or(0);
        if !publish(sequence, stamped(user, sequence, nanos, load.size)) {
            break;
        }
        sequence += 1;
    }
}

/// A TCP connection's writer: a task that writes what the channel brings, coalescing
/// queued writes so that a busy publisher makes few syscalls.
pub fn spawn_writer(mut write: OwnedWriteHalf) -> mpsc::UnboundedSender<Vec<u8>> {
    let (out, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(mut buffer) = queue.recv().await {
            while let Ok(more) = queue.try_recv() {
                buffer.extend_from_slice(&more);
                if buffer.len() > 64 * 1024 {
                    break;
                }
            }
            if write.write_all(&buffer).await.is_err() {
                break;
            }
        }
    });
    out
}

/// The users of one run: they start together once all are connected, and stop once
/// everything sent was delivered (or 30 s after the deadline).
pub struct Users {
    pub epoch: Instant,
    pub deadline: Instant,
    pub stop: Arc<AtomicBool>,
    tasks: JoinSet<anyhow::Result<()>>,
    ready: Vec<oneshot::Sender<()>>,
}

impl Users {
    pub fn new(load: &Load) -> Self {
        let epoch = Instant::now();
        Users {
            epoch,
            deadline: epoch + load.duration,
            stop: Arc::new(AtomicBool::new(false)),
            tasks: JoinSet::new(),
            ready: Vec::new(),
        }
    }

    /// User `index` of this run, writing to `to`.
    pub fn user(&self, index: usize, to: String, load: Load, tally: Arc<Tally>) -> User {
        User {
            index: index as u32,
            to,
            load,
            epoch: self.epoch,
            deadline: self.deadline,
            tally,
            stop: self.stop.clone(),
        }
    }

    /// Adds a user whose work starts when all users have been added.
    pub fn add(&mut self, user: impl Future<Output = anyhow::Result<()>> + Send + 'static) {
        let (go, wait) = oneshot::channel::<()>();
        self.ready.push(go);
        self.tasks.spawn(async move {
            let _ = wait.await;
            user.await
        });
    }

    /// Starts everyone, and returns once the run and its delivery drain are over.
    pub async fn run(mut self, tally: &Tally) -> anyhow::Result<()> {
        for go in self.ready.drain(..) {
            let _ = go.send(());
        }
        tokio::time::sleep_until(self.deadline.into()).await;
        tally
            .wait_for_delivery(Duration::from_secs(30) + Duration::from_millis(200))
            .await;
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// Starts the broker `binary` on a free loopback port, in a temporary directory: `config`
/// gets the port and the directory and returns the configuration file's text, which the
/// broker reads with `-c`; its log goes to `<binary>.log` beside it. Returns once the port
/// accepts connections.
pub async fn start(
    binary: &str,
    config: impl FnOnce(u16, &Path) -> anyhow::Result<String>,
) -> anyhow::Result<(SocketAddr, Child)> {
    let path = which(binary).with_context(|| format!("{binary} is not installed"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (dir, guard) = Child::workdir(None)?;
    let config_path = dir.join(format!("{binary}.conf"));
    std::fs::write(&config_path, config(port, &dir)?)?;
    let log = std::fs::File::create(dir.join(format!("{binary}.log")))?;
    let process = tokio::process::Command::new(&path)
        .arg("-c")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    let child = Child::new(process, guard);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect(address).await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{binary} did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((address, child))
}

/// One user of a broker run: who it is, whom it writes to, and the run's shared state.
pub struct User {
    pub index: u32,
    pub to: String,
    pub load: Load,
    epoch: Instant,
    deadline: Instant,
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
}

impl User {
    /// Starts publishing to `to` until the deadline: `encode(to, sequence, payload)` makes
    /// a publish's bytes, written through `out`. Returns the permits (the user adds one
    /// back per acknowledgement) and the publisher's task.
    pub fn publish(
        &self,
        out: mpsc::UnboundedSender<Vec<u8>>,
        encode: impl Fn(&str, u32, &[u8]) -> Vec<u8> + Send + 'static,
    ) -> (Arc<Semaphore>, JoinHandle<()>) {
        let permits = self.load.permits();
        let to = self.to.clone();
        let task = tokio::spawn(publish_until(
            self.load,
            self.index,
            self.epoch,
            self.deadline,
            permits.clone(),
            move |sequence, payload| out.send(encode(&to, sequence, &payload)).is_ok(),
        ));
        (permits, task)
    }

    /// Counts a delivered message by its stamp.
    pub fn delivered(&self, payload: &[u8]) {
        if let Some((key, due)) = read_stamp(payload) {
            let due = self.epoch + Duration::from_nanos(due);
            self.tally.delivered(key, due.elapsed());
        }
    }

    /// Whether the run is still on.
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}
