//! Starting, running and stopping a relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::admin::AdminView;
use crate::calls::{Calls, Timeouts};
use crate::cdr::{CallRecord, DayStats};
use crate::clock::Clock;
use crate::commit::{CommitError, CommitThread, Committer};
use crate::config::Config;
use crate::keyring::KeyringError;
use crate::mailbox::Hub;
use crate::media::{MediaPlane, MediaRoutes};
use crate::metrics::Metrics;
use crate::provisioning::Provisioning;
use crate::quota::Quotas;
use crate::sender_key::SenderKey;
use crate::session::SessionContext;
use crate::store::{Outcome, RetentionSummary, Store, StoreError, StoreStats, Write};
use crate::tls::TlsError;
use crate::{admin, session, tls, transport};
use hush_protocol::AccountId;

/// How long connections get to wind down on shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data dir could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sender-certificate key could not be read or made.
    #[error(transparent)]
    SenderKey(#[from] KeyringError),
    /// The admin socket could not be set up.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The UDP socket could not be bound, or a thread not started.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running relay.
pub struct Relay {
    local_addr: SocketAddr,
    fingerprint: [u8; 32],
    endpoint: quinn::Endpoint,
    shared: Arc<SessionContext>,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    call_timer: JoinHandle<()>,
    media_workers: JoinSet<()>,
    admin: admin::AdminSocket,
    commit_thread: CommitThread,
}

impl Relay {
    /// Opens the configured store, loads or makes the certificate, binds, and starts
    /// serving.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Relay, StartError> {
        config.validate()?;
        create_private_dir(&config.data_dir)?;
        let (kind, data_dir) = (config.store, config.data_dir.clone());
        let cache = config.limits.store_cache_bytes;
        let store = tokio::task::spawn_blocking(move || crate::store::open(kind, &data_dir, cache))
            .await
            .map_err(|e| StartError::Io(std::io::Error::other(e)))??;
        Self::start_with_store(config, clock, store).await
    }

    /// Starts serving on `store`, already open: the one seam between the relay and its
    /// storage backend. Call it inside the tokio runtime: it spawns the relay's tasks.
    #[allow(
        clippy::unused_async,
        reason = "async like `start`, whose callers await both the same way"
    )]
    pub async fn start_with_store(
        config: Config,
        clock: Arc<dyn Clock>,
        store: Arc<dyn Store>,
    ) -> Result<Relay, StartError> {
        config.validate()?;
        create_private_dir(&config.data_dir)?;
        let identity = tls::load_or_create(config.tls.as_ref(), &config.data_dir)?;
        let fingerprint = identity.fingerprint;
        let sender_key =
            SenderKey::open_or_create(&config.data_dir.join("sender-certificate-key"))?;
        let hub = Arc::new(Hub::default());
        let metrics = Arc::new(Metrics::default());
        let (committer, commit_thread) = {
            let (hub, metrics) = (hub.clone(), metrics.clone());
            let failed_hub = hub.clone();
            Committer::start(
                store.clone(),
                move |results| session::after_commit(&hub, &metrics, results),
                move || failed_hub.invalidate(),
            )?
        };
        let server_config = transport::server_config(&config, identity)?;
        let endpoint = transport::bind(config.listen, server_config)?;
        let local_addr = endpoint.local_addr()?;
        let media_socket = match config.media_listen(local_addr) {
            Some(address) => Some(Arc::new(transport::bind_media(address)?)),
            None => None,
        };
        let media = Arc::new(MediaPlane::new(media_socket.clone())?);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let sweep_interval = Duration::from_secs(config.sweep_interval_secs);
        let max_connections = config.limits.max_connections;
        let provisioning = Provisioning::new(config.limits.max_open_provisioning);
        let calls = Arc::new(Calls::new(
            config.limits.max_call_allocations,
            config.limits.max_calls_per_account,
        ));
        let admin_path = config.data_dir.join(admin::SOCKET_NAME);
        let quotas = Quotas::new(&config.limits);
        let shared = Arc::new(SessionContext {
            config,
            store,
            committer,
            hub,
            clock,
            metrics,
            sender_key,
            provisioning,
            calls,
            media,
            quotas,
        });
        let mut media_workers = JoinSet::new();
        if let Some(socket) = media_socket {
            let routes = MediaRoutes {
                plane: shared.media.clone(),
                calls: shared.calls.clone(),
                metrics: shared.metrics.clone(),
                clock: shared.clock.clone(),
            };
            for _ in 0..transport::media_workers() {
                media_workers.spawn(crate::media::receive_loop(routes.clone(), socket.clone()));
            }
        }
        let admin_view = AdminView {
            store: shared.store.clone(),
            commits: shared.committer.shared_stats(),
            metrics: shared.metrics.clone(),
            config: shared.config.clone(),
        };
        let admin = admin::AdminSocket::start(&admin_path, admin_view)?;
        let call_timer = tokio::spawn(call_timer_loop(shared.clone(), shutdown_rx.clone()));
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            shared.clone(),
            shutdown_rx,
            max_connections,
        ));
        let sweeper = tokio::spawn(sweep_loop(shared.clone(), sweep_interval));
        tracing::info!("relay listening");
        Ok(Relay {
            local_addr,
            fingerprint,
            endpoint,
            shared,
            shutdown,
            accept,
            sweeper,
            call_timer,
            media_workers,
            admin,
            commit_thread,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The UDP media port's address, if the relay has one.
    pub fn media_addr(&self) -> Option<SocketAddr> {
        self.shared.media.local_addr()
    }

    /// Live legs on the UDP media port.
    pub fn live_media_legs(&self) -> usize {
        self.shared.media.live_legs()
    }

    /// SHA-256 of the certificate: what clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Deletes expired envelopes and call-detail records past retention now; returns how
    /// many envelopes went.
    pub async fn sweep_now(&self) -> Result<u64, CommitError> {
        sweep(&self.shared).await
    }

    /// Ends call allocations whose ring or media-idle timeout has passed by the relay's
    /// clock now (the relay also checks every second); returns how many ended.
    pub async fn expire_calls_now(&self) -> usize {
        expire_calls(&self.shared).await
    }

    /// Call allocations live now.
    pub fn live_calls(&self) -> usize {
        self.shared.calls.live()
    }

    /// The call-detail records naming `account`.
    pub async fn call_records_of(&self, account: AccountId) -> Result<Vec<CallRecord>, StoreError> {
        self.read(move |store| store.records_of(&account)).await
    }

    /// The call-detail records of calls that started in `from..to`.
    pub async fn call_records_between(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<CallRecord>, StoreError> {
        self.read(move |store| store.records_between(from, to))
            .await
    }

    /// The day-level call statistics.
    pub async fn call_day_stats(&self) -> Result<Vec<DayStats>, StoreError> {
        self.read(Store::day_stats).await
    }

    /// What is held and when the oldest of it goes.
    pub async fn retention_summary(&self) -> Result<RetentionSummary, StoreError> {
        self.read(Store::retention_summary).await
    }

    /// Deletes every call-detail record naming `account` (for account erasure); returns
    /// how many went.
    pub async fn forget_calls(&self, account: AccountId) -> Result<u64, CommitError> {
        match self
            .shared
            .committer
            .commit(Write::ForgetCalls { account })
            .await?
        {
            Ok(Outcome::CallsDeleted { records }) => Ok(records),
            _ => Ok(0),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        crate::store::read_blocking(self.shared.store.clone(), read).await
    }

    /// What the store holds.
    pub async fn store_stats(&self) -> Result<StoreStats, StoreError> {
        self.read(Store::stats).await
    }

    /// The relay's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Durable commits so far (each one fsync) and the writes they carried.
    pub fn commit_counts(&self) -> (u64, u64) {
        let stats = self.shared.committer.stats();
        (
            stats.commits.load(std::sync::atomic::Ordering::Relaxed),
            stats.writes.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Provisioning addresses open now.
    pub fn open_provisioning_addresses(&self) -> usize {
        self.shared.provisioning.open_count()
    }

    /// What a device's mailbox holds, as its quota counts it.
    pub async fn mailbox_usage(
        &self,
        address: hush_protocol::DeviceAddress,
    ) -> Result<crate::store::MailboxUsage, StoreError> {
        self.read(move |store| store.mailbox_usage(&address)).await
    }

    /// Connections holding a slot now: handshaking, saying `Hello`, or in session.
    pub fn open_connections(&self) -> u64 {
        Metrics::get(&self.shared.metrics.connections_open)
    }

    /// Devices connected now.
    pub fn connected_devices(&self) -> usize {
        self.shared.hub.connected()
    }

    /// Graceful shutdown: stop accepting, let started requests commit and be answered,
    /// close every connection with `ShuttingDown`, flush the store, and return.
    pub async fn shutdown(self) {
        let Relay {
            endpoint,
            shared,
            shutdown,
            accept,
            sweeper,
            call_timer,
            mut media_workers,
            admin,
            commit_thread,
            ..
        } = self;
        endpoint.set_server_config(None);
        admin.stop().await;
        let _ = shutdown.send(true);
        let _ = accept.await;
        sweeper.abort();
        let _ = sweeper.await;
        let _ = call_timer.await;
        media_workers.shutdown().await;
        // Whatever is still live (sessions cut short, a timer stopped mid-round) ends now,
        // each with its record, before the committer goes.
        let now = shared.clock.now();
        for ended in shared.calls.end_all(now) {
            let _ = crate::session::record_call_end(&shared, ended).await;
        }
        drop(shared);
        // The commit thread ends once the last session's requests have dropped their
        // handles; it commits whatever is still queued first.
        let _ = tokio::time::timeout(
            SHUTDOWN_GRACE,
            tokio::task::spawn_blocking(move || commit_thread.join()),
        )
        .await;
        endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("relay stopped");
    }
}

fn create_private_dir(path: &std::path::Path) -> Result<(), StartError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|source| StartError::DataDir {
        path: path.to_owned(),
        source,
    })
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<SessionContext>,
    mut shutdown: watch::Receiver<bool>,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        while sessions.try_join_next().is_some() {}
        if shared.config.limits.require_address_validation && !incoming.remote_address_validated() {
            // A Retry makes the client prove it receives at its source address before the
            // relay spends a handshake on it: spoofed-source floods stop here.
            Metrics::inc(&shared.metrics.address_validations);
            if incoming.may_retry() {
                let _ = incoming.retry();
            } else {
                incoming.refuse();
            }
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            Metrics::inc(&shared.metrics.connections_refused);
            incoming.refuse();
            continue;
        };
        // Counted only once the address is validated (above), so that nobody can use up
        // another address's connections with spoofed packets.
        let Some(address_slot) = shared
            .quotas
            .connections
            .acquire(incoming.remote_address().ip())
        else {
            Metrics::inc(&shared.metrics.connections_refused_per_address);
            incoming.refuse();
            continue;
        };
        sessions.spawn(session::run(
            incoming,
            shared.clone(),
            shutdown.clone(),
            (slot, address_slot),
        ));
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = sessions.len(),
            "connections did not close in time; cutting them"
        );
        sessions.shutdown().await;
    }
}

async fn sweep_loop(shared: Arc<SessionContext>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = sweep(&shared).await {
            tracing::warn!(%error, "expiry sweep failed; will retry");
        }
    }
}

/// How often call allocations are checked for their ring and media-idle timeouts.
const CALL_TIMER: Duration = Duration::from_secs(1);

/// Ends timed-out allocations every `CALL_TIMER`. Stops between rounds at shutdown, never
/// inside one, so no allocation it removed goes without its record.
async fn call_timer_loop(shared: Arc<SessionContext>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CALL_TIMER);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        expire_calls(&shared).await;
    }
}

/// Ends allocations past their timeouts, each with its record.
async fn expire_calls(shared: &SessionContext) -> usize {
    let timeouts = Timeouts {
        ring_secs: shared.config.call_ring_timeout_secs,
        media_idle_secs: shared.config.call_media_idle_secs,
    };
    let ended = shared.calls.expire(shared.clock.now(), timeouts);
    let count = ended.len();
    for ended in ended {
        let _ = session::record_call_end(shared, ended).await;
    }
    count
}

/// Deletes call-detail records past retention (the day counts stay), batch by batch.
async fn sweep_call_records(shared: &SessionContext) -> Result<u64, CommitError> {
    let mut total = 0;
    loop {
        let until = shared
            .clock
            .now()
            .saturating_sub(shared.config.cdr_retention_secs());
        match shared
            .committer
            .commit(Write::ExpireCalls { until })
            .await?
        {
            Ok(Outcome::CallsDeleted { records }) if records > 0 => {
                total += records;
                Metrics::add(&shared.metrics.call_records_expired, records);
            }
            _ => break,
        }
    }
    if total > 0 {
        tracing::info!(
            records = total,
            "call-detail records past retention deleted"
        );
    }
    Ok(total)
}

/// Runs expiry writes until nothing expired is left: call records first, then envelopes,
/// whose last write also drops the day keys of past days (and with them whatever sealed
/// call records of those days redb's free pages still hold).
async fn sweep(shared: &SessionContext) -> Result<u64, CommitError> {
    sweep_call_records(shared).await?;
    let mut total = 0;
    loop {
        let now = shared.clock.now();
        match shared.committer.commit(Write::Expire { now }).await? {
            Ok(Outcome::Expired { envelopes }) if envelopes > 0 => {
                total += envelopes;
                Metrics::add(&shared.metrics.envelopes_expired, envelopes);
            }
            _ => break,
        }
    }
    if total > 0 {
        tracing::info!(envelopes = total, "expired envelopes deleted");
    }
    Ok(total)
}
