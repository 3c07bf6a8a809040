//! The shared harness for Hush's end-to-end tests: real relays (in-process, or as a child
//! process for crash and signal tests) on loopback with temp data dirs, and real clients.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::missing_panics_doc
)]

pub mod flood;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use hush_client::protocol::auth::auth_transcript;
use hush_client::protocol::{
    encode_frame, Authenticate, ClientFrame, DeviceAddress, ErrorCode, Hello, Prekey, Request,
    RequestBody, RequestId, ResponseBody, ServerFrame, Signature,
};
use hush_client::{
    ConnectOptions, Connection, ConnectionError, Connector, DeviceKey, Envelope, Event, RawStream,
    Trust,
};
use hush_server::clock::ManualClock;
use hush_server::config::Config;
use hush_server::rate::Rate;
use hush_server::Relay;
use tempfile::TempDir;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// A relay running in this process on a test clock.
pub struct TestRelay {
    relay: Option<Relay>,
    /// The test clock; advance it to move the relay's time.
    pub clock: ManualClock,
    dir: TempDir,
    config: Config,
}

/// A config for tests: loopback, port 0, the given data dir, sweeps only when asked.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    config.sweep_interval_secs = 3600;
    // The test clock stands still unless a test moves it, so no bucket would ever refill,
    // and every test registers all its accounts from one loopback address: the rate limits
    // are out of reach here. `tests/limits.rs` sets small ones of its own.
    let unlimited = Rate::per_second(u32::MAX, u32::MAX);
    config.limits.connection_envelopes = unlimited;
    config.limits.account_envelopes = unlimited;
    config.limits.address_sealed_sends = unlimited;
    config.limits.prekey_fetches = unlimited;
    config.limits.registrations = unlimited;
    config
}

impl TestRelay {
    /// Starts a relay with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a relay after `adjust` has changed its config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let clock = ManualClock::starting_now();
        let relay = Relay::start(config.clone(), Arc::new(clock.clone()))
            .await
            .unwrap();
        TestRelay {
            relay: Some(relay),
            clock,
            dir,
            config,
        }
    }

    /// The running relay.
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay is running")
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Options that pin this relay's certificate.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new(
            self.relay().local_addr(),
            Trust::Pinned(self.relay().fingerprint()),
        )
    }

    /// A fresh connection, not yet registered or authenticated.
    pub async fn connect(&self) -> Connection {
        tokio::time::timeout(WAIT, Connection::connect(&self.options()))
            .await
            .unwrap()
            .unwrap()
    }

    /// Registers a new account and returns its primary device, connected.
    pub async fn register(&self) -> Device {
        let key = DeviceKey::generate();
        let connection = self.connect().await;
        let address = connection
            .register(b"identity-key", &key, None)
            .await
            .unwrap();
        Device {
            connection,
            address,
            key,
        }
    }

    /// Connects and authenticates an existing device.
    pub async fn login(&self, address: DeviceAddress, key: &DeviceKey) -> Connection {
        let connection = self.connect().await;
        connection.authenticate(address, key).await.unwrap();
        connection
    }

    /// Stops the relay gracefully and starts it again on the same data dir and clock.
    pub async fn restart(&mut self) {
        self.relay
            .take()
            .expect("relay is running")
            .shutdown()
            .await;
        let relay = Relay::start(self.config.clone(), Arc::new(self.clock.clone()))
            .await
            .unwrap();
        self.relay = Some(relay);
    }

    /// Stops the relay gracefully and keeps the data dir.
    pub async fn stop(mut self) -> TempDir {
        self.relay
            .take()
            .expect("relay is running")
            .shutdown()
            .await;
        self.dir
    }
}

/// A registered device with its live connection.
pub struct Device {
    /// The connection, authenticated as this device.
    pub connection: Connection,
    /// The device's address.
    pub address: DeviceAddress,
    /// Its signing key.
    pub key: DeviceKey,
}

/// Adds a device to `primary`'s account and logs it in.
pub async fn add_device(relay: &TestRelay, primary: &Device) -> Device {
    let key = DeviceKey::generate();
    let device = primary
        .connection
        .add_device(key.public_key())
        .await
        .unwrap();
    let address = DeviceAddress {
        account: primary.address.account,
        device,
    };
    let connection = relay.login(address, &key).await;
    Device {
        connection,
        address,
        key,
    }
}

/// The next envelope pushed to `connection`, skipping other events.
pub async fn next_envelope(connection: &Connection) -> Envelope {
    tokio::time::timeout(WAIT, async {
        loop {
            match connection.next_event().await {
                Some(Event::Envelope(envelope)) => return envelope,
                Some(Event::Drained | Event::LowPrekeys { .. }) => {}
                other => panic!("connection ended while waiting for an envelope: {other:?}"),
            }
        }
    })
    .await
    .expect("an envelope within the wait")
}

/// Collects envelopes until the relay says the backlog is drained.
pub async fn drain(connection: &Connection) -> Vec<Envelope> {
    tokio::time::timeout(WAIT, async {
        let mut envelopes = Vec::new();
        loop {
            match connection.next_event().await {
                Some(Event::Envelope(envelope)) => envelopes.push(envelope),
                Some(Event::Drained) => return envelopes,
                Some(Event::LowPrekeys { .. }) => {}
                other => panic!("connection ended while draining: {other:?}"),
            }
        }
    })
    .await
    .expect("Drained within the wait")
}

/// Collects and acknowledges envelopes until the relay says the backlog is drained; unlike
/// [`drain`], any backlog fits, since the relay pushes only its delivery window ahead of
/// the acks. Each wait for the next envelope is bounded by [`WAIT`].
pub async fn drain_acking(connection: &Connection) -> Vec<Envelope> {
    let mut envelopes = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, connection.next_event())
            .await
            .expect("the backlog keeps coming");
        match event {
            Some(Event::Envelope(envelope)) => {
                connection.ack(&[envelope.id]).await.unwrap();
                envelopes.push(envelope);
            }
            Some(Event::Drained) => return envelopes,
            Some(Event::LowPrekeys { .. }) => {}
            other => panic!("connection ended while draining: {other:?}"),
        }
    }
}

/// Asserts that no envelope arrives within `quiet`.
pub async fn assert_no_envelope(connection: &Connection, quiet: Duration) {
    let arrived = tokio::time::timeout(quiet, async {
        loop {
            match connection.next_event().await {
                Some(Event::Envelope(envelope)) => return envelope,
                Some(_) => {}
                None => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(
        arrived.is_err(),
        "unexpected envelope {:?}",
        arrived.map(|e| e.id)
    );
}

/// A prekey with id `id` and a public key of `size` bytes (the relay treats both as
/// opaque; 32 for X25519, 1,184 for ML-KEM-768).
pub fn prekey(id: u32, size: usize) -> Prekey {
    Prekey {
        id,
        public_key: vec![id as u8; size],
        signature: vec![0xEE; 64],
    }
}

/// Asserts that the relay refused a request with `code` (the connection carries on).
pub fn refused<T: std::fmt::Debug>(result: Result<T, ConnectionError>, code: ErrorCode) {
    match result {
        Err(ConnectionError::Refused(got)) => assert_eq!(got, code),
        other => panic!("expected a {code:?} refusal, got {other:?}"),
    }
}

/// A `hush-relay` child process, for tests that kill or signal it.
pub struct ChildRelay {
    child: Child,
    /// Where it listens.
    pub address: SocketAddr,
    /// Its certificate's SHA-256.
    pub fingerprint: [u8; 32],
}

impl ChildRelay {
    /// Starts the relay binary on `data_dir` (port 0), with stderr (its log) appended to
    /// `log` if given, and waits until it prints its address and fingerprint.
    /// `binary` is [`relay_binary!`]`()`.
    pub fn spawn(binary: &Path, data_dir: &Path, log: Option<&Path>, rust_log: &str) -> Self {
        Self::spawn_configured(binary, None, data_dir, log, rust_log)
    }

    /// Like [`ChildRelay::spawn`], reading the TOML `config` file first if given.
    pub fn spawn_configured(
        binary: &Path,
        config: Option<&Path>,
        data_dir: &Path,
        log: Option<&Path>,
        rust_log: &str,
    ) -> Self {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the relay binary");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut address = None;
        let mut fingerprint = None;
        while address.is_none() || fingerprint.is_none() {
            let line = lines
                .next()
                .expect("relay printed its address and fingerprint")
                .unwrap();
            if let Some(rest) = line.strip_prefix("listening on ") {
                address = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
            if let Some(hex) = line.strip_prefix("certificate fingerprint (SHA-256): ") {
                fingerprint = Some(hex::decode(hex.trim()).unwrap().try_into().unwrap());
            }
        }
        // Keep draining stdout so that the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ChildRelay {
            child,
            address: address.unwrap(),
            fingerprint: fingerprint.unwrap(),
        }
    }

    /// Options that pin this relay.
    pub fn options(&self) -> ConnectOptions {
        ConnectOptions::new(self.address, Trust::Pinned(self.fingerprint))
    }

    /// The child's process id, for reading its state under /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The relay's resident memory now and at its peak so far, in bytes (Linux `/proc`).
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} in /proc status"));
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("a number in {line}"));
            kib * 1024
        };
        Memory {
            resident: field("VmRSS:"),
            peak: field("VmHWM:"),
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "relay did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A process's resident memory, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident now.
    pub resident: u64,
    /// The most it has been resident at once (the high-water mark).
    pub peak: u64,
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The relay binary built from `server/src/main.rs` for this crate. A macro because
/// Cargo tells only integration tests, not this library, where the binary is.
#[macro_export]
macro_rules! relay_binary {
    () => {
        std::path::Path::new(env!("CARGO_BIN_EXE_relay-under-test"))
    };
}

/// Every byte of every regular file under `dir`, with its path (a running relay's admin
/// socket holds no bytes and is skipped).
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Full clients for end-to-end tests.
pub mod users {
    use std::path::Path;

    use hush_client::{
        Body, Client, ClientConfig, ClientEvent, LinkRequest, MessageId, StorageKey,
    };
    use tempfile::TempDir;

    use super::{contains, read_tree, TestRelay, WAIT};

    /// A user's device: a data dir and a storage key.
    pub struct User {
        /// The local store's directory.
        pub dir: TempDir,
        key: [u8; 32],
    }

    impl User {
        /// A new device directory with a storage key made from `seed`.
        pub fn new(seed: u8) -> Self {
            User {
                dir: tempfile::tempdir().unwrap(),
                key: [seed; 32],
            }
        }

        /// The client config for `relay`.
        pub fn config(&self, relay: &TestRelay) -> ClientConfig {
            ClientConfig::new(
                relay.options(),
                self.dir.path().to_owned(),
                StorageKey::from_bytes(self.key),
            )
        }

        /// The client config for a relay reached through `options` (a proxy, say).
        pub fn config_with(&self, options: hush_client::ConnectOptions) -> ClientConfig {
            ClientConfig::new(
                options,
                self.dir.path().to_owned(),
                StorageKey::from_bytes(self.key),
            )
        }

        /// Creates an account.
        pub async fn create(&self, relay: &TestRelay) -> Client {
            Client::create(self.config(relay), None).await.unwrap()
        }

        /// Opens the account kept here.
        pub async fn open(&self, relay: &TestRelay) -> Client {
            Client::open(self.config(relay)).await.unwrap()
        }
    }

    /// The next event, within [`WAIT`].
    pub async fn next(client: &Client) -> ClientEvent {
        tokio::time::timeout(WAIT, client.next_event())
            .await
            .expect("an event in time")
            .expect("client open")
    }

    /// The next event that is not a receipt or typing indicator.
    pub async fn next_message(client: &Client) -> ClientEvent {
        loop {
            match next(client).await {
                ClientEvent::Receipt { .. } | ClientEvent::Typing { .. } => {}
                other => return other,
            }
        }
    }

    /// The text and id of a message event.
    pub fn text(event: &ClientEvent) -> (&str, MessageId) {
        match event {
            ClientEvent::Message { message, .. } => match &message.body {
                Body::Text { text } => (text, message.id),
                other => panic!("expected text, got {other:?}"),
            },
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Asserts that no file under `dir` contains any of `needles`.
    pub fn scan(dir: &Path, needles: &[(&str, Vec<u8>)]) {
        for (path, bytes) in read_tree(dir) {
            for (what, needle) in needles {
                assert!(
                    !contains(&bytes, needle),
                    "{what} found in {}",
                    path.display()
                );
            }
        }
    }

    /// Links a new device (kept in `user`) to the account of `primary`.
    pub async fn link(relay: &TestRelay, primary: &Client, user: &User) -> Client {
        let request = LinkRequest::start(user.config(relay)).await.unwrap();
        let code = request.code();
        let (linked, device) = tokio::join!(
            tokio::time::timeout(WAIT, request.finish()),
            primary.link_device(&code)
        );
        let linked = linked.expect("linked in time").unwrap();
        assert_eq!(linked.address().await.device, device.unwrap());
        linked
    }
}

/// The next `CallEnded` pushed to `connection`, skipping other events.
pub async fn next_call_ended(connection: &Connection) -> u32 {
    tokio::time::timeout(WAIT, async {
        loop {
            match connection.next_event().await {
                Some(Event::CallEnded { allocation, .. }) => return allocation,
                Some(Event::Closed(code)) => {
                    panic!("connection ended while waiting for CallEnded: {code:?}")
                }
                None => panic!("connection ended while waiting for CallEnded"),
                Some(_) => {}
            }
        }
    })
    .await
    .expect("CallEnded within the wait")
}

/// Asserts that no `CallEnded` is pushed to `connection` within `quiet`.
pub async fn assert_no_call_ended(connection: &Connection, quiet: Duration) {
    let ended = tokio::time::timeout(quiet, async {
        loop {
            match connection.next_event().await {
                Some(Event::CallEnded { allocation, .. }) => return allocation,
                Some(_) => {}
                None => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(ended.is_err(), "unexpected CallEnded");
}

/// Media datagrams that reach `connection` within `quiet` of each other (at most `WAIT`
/// in all).
pub async fn collect_media(connection: &Connection, quiet: Duration) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(quiet, connection.next_media()).await {
            Ok(Some(media)) => out.push(media),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// A raw control stream past `Hello`, with the relay's challenge.
pub async fn raw_after_hello(connector: &Connector) -> (RawStream, [u8; 32]) {
    let mut raw = tokio::time::timeout(WAIT, connector.connect_raw())
        .await
        .unwrap()
        .unwrap();
    raw.write(&encode_frame(&ClientFrame::Hello(Hello::current())))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, raw.read_frame()).await.unwrap() {
        Ok(Some(ServerFrame::HelloOk(ok))) => (raw, ok.challenge),
        other => panic!("expected HelloOk, got {other:?}"),
    }
}

/// Reads until the relay's `Fatal` frame, checks that the connection closes with the same
/// code, and returns it.
pub async fn fatal(raw: &mut RawStream) -> ErrorCode {
    let code = tokio::time::timeout(WAIT, async {
        loop {
            match raw.read_frame().await {
                Ok(Some(ServerFrame::Fatal(fatal))) => return fatal.code,
                Ok(Some(_)) => {}
                other => panic!("expected a Fatal frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a Fatal frame within the wait");
    let closed = tokio::time::timeout(WAIT, raw.closed())
        .await
        .expect("the relay closes the connection");
    assert_eq!(closed, Some(code), "close code matches the Fatal frame");
    code
}

/// Waits (bounded) until `read()` reaches `at_least`; returns the value.
pub async fn wait_for_count(read: impl Fn() -> u64, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let value = read();
        if value >= at_least || std::time::Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `n` numbered frames, paced so that loopback buffers never overflow.
pub async fn send_numbered(connection: &Connection, allocation: u32, tag: u8, n: u32) {
    for i in 0..n {
        let mut frame = vec![tag; 160];
        frame[..4].copy_from_slice(&i.to_be_bytes());
        connection.send_media(allocation, &frame).unwrap();
        if i % 25 == 24 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Checks numbered frames from `send_numbered`: right allocation and sender, in order,
/// and at most 1 % lost.
pub fn check_numbered(received: &[(u32, Vec<u8>)], allocation: u32, tag: u8, n: u32) {
    let mut last = None;
    for (got, frame) in received {
        assert_eq!(*got, allocation);
        assert_eq!(frame.len(), 160);
        assert!(
            frame[4..].iter().all(|b| *b == tag),
            "a frame of the other side"
        );
        let number = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert!(last < Some(number), "frames out of order");
        last = Some(number);
    }
    assert!(
        received.len() as u32 >= n - n / 100,
        "{} of {n} frames arrived",
        received.len()
    );
}

/// Connects a raw stream and authenticates it as `address` (request id 1), for tests that
/// write frames themselves and read only when they choose. `secret` is the device key's
/// signing half (`DeviceKey::from_secret_bytes` of the same bytes).
pub async fn authenticated_raw_stream(
    options: ConnectOptions,
    address: DeviceAddress,
    secret: &SigningKey,
) -> RawStream {
    let (mut raw, challenge) = raw_after_hello(&Connector::new(options).unwrap()).await;
    let transcript = auth_transcript(&raw.exporter().unwrap(), &challenge, &address);
    let authenticate = ClientFrame::Request(Request {
        id: RequestId(1),
        body: RequestBody::Authenticate(Authenticate {
            address,
            signature: Signature(secret.sign(&transcript).to_bytes()),
        }),
    });
    raw.write(&encode_frame(&authenticate)).await.unwrap();
    loop {
        match raw.read_frame().await.unwrap() {
            Some(ServerFrame::Response(response)) => {
                assert_eq!(response.result, Ok(ResponseBody::Authenticated));
                return raw;
            }
            Some(_) => {}
            None => panic!("closed while authenticating"),
        }
    }
}
