//! Relay configuration: zero-config defaults, a TOML file, and checks on load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::rate::Rate;

/// P3: undelivered messages live at most this long. Configurable downward only.
pub const MAX_MESSAGE_EXPIRY_DAYS: u32 = 14;

/// The longest call-detail record retention an operator may configure (ten years).
pub const MAX_CDR_RETENTION_DAYS: u32 = 3650;

/// Who may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationPolicy {
    /// Anyone may register.
    #[default]
    Open,
    /// Registration needs an invite token (`hush-relay invite`).
    Invite,
}

/// Which storage backend holds the relay's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded store: one redb file in the data dir.
    #[default]
    Redb,
}

/// An operator certificate chain and key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Transport and abuse limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most concurrent connections.
    pub max_connections: usize,
    /// A connection silent for this long is closed (seconds).
    pub idle_timeout_secs: u64,
    /// A connection gets this long (seconds) to open its control stream and send `Hello`;
    /// after that it is closed with `HelloRequired`.
    pub hello_timeout_secs: u64,
    /// Once a frame's first byte has arrived, the rest of it must arrive within this many
    /// seconds, or the connection is closed with `FrameTimeout`. Keep-alives keep a
    /// connection from idling out, so without this deadline a half-sent frame would pin
    /// its buffer for as long as the client likes (slowloris).
    pub frame_read_timeout_secs: u64,
    /// Most requests of one connection being processed at once; further frames wait.
    pub max_in_flight_requests: usize,
    /// QUIC connection-level receive window in bytes (quinn's default is unbounded).
    pub connection_receive_window: u32,
    /// QUIC per-stream receive window in bytes; must hold the largest frame.
    pub stream_receive_window: u32,
    /// Whether new client addresses must prove they can receive (QUIC Retry) first.
    pub require_address_validation: bool,
    /// Most provisioning addresses open at once (they live in memory).
    pub max_open_provisioning: usize,
    /// Most envelopes pushed to one connection and not yet acknowledged; the relay waits
    /// for acks before it pushes more. Keeps a slow device's backlog in the store, not in
    /// buffers, and keeps the client's replies from queueing behind a flood of pushes.
    pub delivery_window: usize,
    /// Most call allocations live at once (they live in memory).
    pub max_call_allocations: usize,
    /// Most live call allocations one account may have made.
    pub max_calls_per_account: usize,
    /// Bytes of incoming media datagrams buffered per connection before the oldest are
    /// dropped.
    pub datagram_receive_buffer: usize,
    /// Bytes of outgoing media datagrams buffered per connection before the oldest are
    /// dropped (forwarding never waits).
    pub datagram_send_buffer: usize,
    /// Envelope copies (one per recipient device) one connection may submit, through
    /// `Send` or `SealedSend`. Beyond it: `RateLimited`.
    pub connection_envelopes: Rate,
    /// Envelope copies one account may submit, all its connections together
    /// (authenticated sends). Beyond it: `RateLimited`.
    pub account_envelopes: Rate,
    /// Envelope copies of sealed sends on unauthenticated connections, per source address
    /// (IPv4 address or IPv6 /64). Beyond it: `RateLimited`.
    pub address_sealed_sends: Rate,
    /// Prekey fetches per requesting account, or per source address for anonymous
    /// fetches. Beyond it: `RateLimited`.
    pub prekey_fetches: Rate,
    /// Registration attempts per source address. Beyond it: `RateLimited`.
    pub registrations: Rate,
    /// Most live connections from one source address; further ones are refused before
    /// the handshake.
    pub connections_per_address: u32,
    /// Most envelopes waiting in one device's mailbox. A send that would go beyond it is
    /// refused with `MailboxFull`.
    pub mailbox_max_envelopes: u64,
    /// Most payload bytes waiting in one device's mailbox. A send that would go beyond it
    /// is refused with `MailboxFull`.
    pub mailbox_max_bytes: u64,
    /// Most keys (accounts, addresses) each shared rate limit tracks; idle ones are
    /// forgotten first. Bounds the limiter's own memory.
    pub rate_limit_keys: usize,
    /// The store's page cache in bytes (redb's default is 1 GiB).
    pub store_cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            idle_timeout_secs: 60,
            hello_timeout_secs: 10,
            frame_read_timeout_secs: 30,
            max_in_flight_requests: 256,
            connection_receive_window: 4 * 1024 * 1024,
            stream_receive_window: 2 * 1024 * 1024,
            require_address_validation: true,
            max_open_provisioning: 10_000,
            delivery_window: 256,
            max_call_allocations: 10_000,
            max_calls_per_account: 4,
            datagram_receive_buffer: 256 * 1024,
            datagram_send_buffer: 256 * 1024,
            connection_envelopes: Rate::per_second(2_000, 1_000),
            account_envelopes: Rate::per_second(5_000, 2_000),
            address_sealed_sends: Rate::per_second(5_000, 2_000),
            prekey_fetches: Rate::per_hour(1_000, 1_000),
            registrations: Rate::per_hour(20, 20),
            connections_per_address: 1_000,
            mailbox_max_envelopes: 50_000,
            mailbox_max_bytes: 512 * 1024 * 1024,
            rate_limit_keys: 100_000,
            store_cache_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Everything the relay can be told.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Whether call media may also use the UDP media port (`crate::media`); without it,
    /// media goes as QUIC datagrams only.
    pub udp_media: bool,
    /// The UDP media port's address. Default: `listen`'s address and the next port (an
    /// ephemeral one when `listen`'s port is 0).
    pub media_listen: Option<SocketAddr>,
    /// Where the database, storage keys and self-signed certificate live.
    pub data_dir: PathBuf,
    /// Which storage backend holds the data.
    pub store: StoreKind,
    /// An operator certificate; without one, a self-signed one is made in `data_dir`.
    pub tls: Option<TlsFiles>,
    /// Who may register.
    pub registration: RegistrationPolicy,
    /// Most devices per account.
    pub max_devices_per_account: u32,
    /// Days an undelivered envelope is kept, 1 to 14.
    pub message_expiry_days: u32,
    /// A device with fewer one-time prekeys than this is told to upload more.
    pub low_prekey_threshold: u32,
    /// How often expired envelopes are swept (seconds).
    pub sweep_interval_secs: u64,
    /// How long a sender certificate is valid, in hours (1 to 168).
    pub sender_certificate_hours: u32,
    /// Days a call-detail record is kept before it is deleted (1 to 3650); the day-level
    /// counts stay.
    pub cdr_retention_days: u32,
    /// A joined call with no media for this long ends (seconds).
    pub call_media_idle_secs: u64,
    /// A call nobody joined ends as missed after this long (seconds).
    pub call_ring_timeout_secs: u64,
    /// Transport and abuse limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            udp_media: true,
            media_listen: None,
            data_dir: PathBuf::from("hush-data"),
            store: StoreKind::Redb,
            tls: None,
            registration: RegistrationPolicy::Open,
            max_devices_per_account: 5,
            message_expiry_days: MAX_MESSAGE_EXPIRY_DAYS,
            low_prekey_threshold: 10,
            sweep_interval_secs: 60,
            sender_certificate_hours: 24,
            cdr_retention_days: 90,
            call_media_idle_secs: 30,
            call_ring_timeout_secs: 90,
            limits: Limits::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// A value is out of range.
    #[error("{field} must be {expected}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// The allowed range.
        expected: &'static str,
    },
}

impl Config {
    /// Reads and checks a TOML file; settings it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Where the UDP media port binds, given the QUIC endpoint's bound address; `None`
    /// when it is off.
    pub fn media_listen(&self, bound: SocketAddr) -> Option<SocketAddr> {
        if !self.udp_media {
            return None;
        }
        Some(self.media_listen.unwrap_or_else(|| {
            let port = match self.listen.port() {
                0 => 0,
                port => port.checked_add(1).unwrap_or(0),
            };
            SocketAddr::new(bound.ip(), port)
        }))
    }

    /// Checks every range rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |ok: bool, field, expected| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { field, expected })
            }
        };
        range(
            (1..=MAX_MESSAGE_EXPIRY_DAYS).contains(&self.message_expiry_days),
            "message_expiry_days",
            "between 1 and 14 (P3: never above 14 days)",
        )?;
        range(
            (1..=hush_protocol::limits::MAX_BUNDLES as u32).contains(&self.max_devices_per_account),
            "max_devices_per_account",
            "between 1 and 64",
        )?;
        range(
            (1..=168).contains(&self.sender_certificate_hours),
            "sender_certificate_hours",
            "between 1 and 168",
        )?;
        range(
            (1..=MAX_CDR_RETENTION_DAYS).contains(&self.cdr_retention_days),
            "cdr_retention_days",
            "between 1 and 3650",
        )?;
        range(
            (1..=3600).contains(&self.call_media_idle_secs),
            "call_media_idle_secs",
            "between 1 and 3600",
        )?;
        range(
            (1..=3600).contains(&self.call_ring_timeout_secs),
            "call_ring_timeout_secs",
            "between 1 and 3600",
        )?;
        range(
            self.limits.max_call_allocations >= 1 && self.limits.max_calls_per_account >= 1,
            "limits.max_call_allocations and limits.max_calls_per_account",
            "at least 1",
        )?;
        range(
            (4096..=16 * 1024 * 1024).contains(&self.limits.datagram_receive_buffer)
                && (4096..=16 * 1024 * 1024).contains(&self.limits.datagram_send_buffer),
            "limits.datagram_receive_buffer and limits.datagram_send_buffer",
            "between 4096 and 16 MiB",
        )?;
        range(
            self.limits.max_open_provisioning >= 1,
            "limits.max_open_provisioning",
            "at least 1",
        )?;
        range(
            self.sweep_interval_secs >= 1,
            "sweep_interval_secs",
            "at least 1",
        )?;
        range(
            self.limits.max_connections >= 1,
            "limits.max_connections",
            "at least 1",
        )?;
        range(
            self.limits.idle_timeout_secs >= 1,
            "limits.idle_timeout_secs",
            "at least 1",
        )?;
        range(
            (1..=3600).contains(&self.limits.hello_timeout_secs)
                && (1..=3600).contains(&self.limits.frame_read_timeout_secs),
            "limits.hello_timeout_secs and limits.frame_read_timeout_secs",
            "between 1 and 3600",
        )?;
        range(
            self.limits.max_in_flight_requests >= 1,
            "limits.max_in_flight_requests",
            "at least 1",
        )?;
        range(
            (1..=1000).contains(&self.limits.delivery_window),
            "limits.delivery_window",
            "1 to 1000 (clients buffer 1,024 pushed frames)",
        )?;
        let largest_frame =
            hush_protocol::limits::frame::UPLOAD_PREKEYS + hush_protocol::HEADER_LEN;
        range(
            self.limits.stream_receive_window as usize >= largest_frame,
            "limits.stream_receive_window",
            "at least the largest frame (786,437 bytes)",
        )?;
        range(
            self.limits.connection_receive_window >= self.limits.stream_receive_window,
            "limits.connection_receive_window",
            "at least limits.stream_receive_window",
        )?;
        for (rate, field) in [
            (
                self.limits.connection_envelopes,
                "limits.connection_envelopes",
            ),
            (self.limits.account_envelopes, "limits.account_envelopes"),
            (
                self.limits.address_sealed_sends,
                "limits.address_sealed_sends",
            ),
            (self.limits.prekey_fetches, "limits.prekey_fetches"),
            (self.limits.registrations, "limits.registrations"),
        ] {
            range(
                rate.is_valid(),
                field,
                "a rate with burst, refill and period_secs each at least 1",
            )?;
        }
        range(
            self.limits.connections_per_address >= 1,
            "limits.connections_per_address",
            "at least 1",
        )?;
        range(
            self.limits.mailbox_max_envelopes >= 1
                && self.limits.mailbox_max_bytes
                    >= hush_protocol::limits::MAX_SEND_PAYLOAD_TOTAL as u64,
            "limits.mailbox_max_envelopes and limits.mailbox_max_bytes",
            "at least 1 envelope and at least the largest send (1 MiB)",
        )?;
        range(
            self.limits.rate_limit_keys >= 1,
            "limits.rate_limit_keys",
            "at least 1",
        )?;
        range(
            self.limits.store_cache_bytes >= 1024 * 1024,
            "limits.store_cache_bytes",
            "at least 1 MiB",
        )
    }

    /// How long undelivered envelopes are kept, in seconds.
    pub fn message_expiry_secs(&self) -> u64 {
        u64::from(self.message_expiry_days) * crate::keyring::DAY
    }

    /// How long call-detail records are kept, in seconds.
    pub fn cdr_retention_secs(&self) -> u64 {
        u64::from(self.cdr_retention_days) * crate::keyring::DAY
    }

    /// How long a sender certificate is valid, in seconds.
    pub fn sender_certificate_secs(&self) -> u64 {
        u64::from(self.sender_certificate_hours) * 3600
    }

    /// The idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_secs)
    }

    /// How long a new connection has to say `Hello`.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.hello_timeout_secs)
    }

    /// How long the rest of a frame may take once its first byte has arrived.
    pub fn frame_read_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.frame_read_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_zero_config_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:4433");
        assert_eq!(config.data_dir, PathBuf::from("hush-data"));
        assert_eq!(config.message_expiry_days, 14);
    }

    #[test]
    fn expiry_is_configurable_only_downward() {
        assert_eq!(
            Config::from_toml("message_expiry_days = 3")
                .unwrap()
                .message_expiry_days,
            3
        );
        assert!(matches!(
            Config::from_toml("message_expiry_days = 15"),
            Err(ConfigError::OutOfRange {
                field: "message_expiry_days",
                ..
            })
        ));
        assert!(Config::from_toml("message_expiry_days = 0").is_err());
    }

    #[test]
    fn sender_certificate_validity_is_bounded() {
        assert_eq!(Config::default().sender_certificate_hours, 24);
        assert_eq!(
            Config::from_toml("sender_certificate_hours = 168")
                .unwrap()
                .sender_certificate_secs(),
            168 * 3600
        );
        for bad in [
            "sender_certificate_hours = 0",
            "sender_certificate_hours = 169",
        ] {
            assert!(matches!(
                Config::from_toml(bad),
                Err(ConfigError::OutOfRange {
                    field: "sender_certificate_hours",
                    ..
                })
            ));
        }
        assert!(Config::from_toml("[limits]\nmax_open_provisioning = 0").is_err());
    }

    #[test]
    fn call_settings_have_defaults_and_ranges() {
        let config = Config::default();
        assert_eq!(config.cdr_retention_days, 90);
        assert_eq!(config.call_media_idle_secs, 30);
        assert_eq!(config.call_ring_timeout_secs, 90);
        assert_eq!(config.limits.max_call_allocations, 10_000);
        assert_eq!(config.cdr_retention_secs(), 90 * 86_400);
        assert_eq!(
            Config::from_toml("cdr_retention_days = 3650")
                .unwrap()
                .cdr_retention_days,
            3650
        );
        for bad in ["cdr_retention_days = 0", "cdr_retention_days = 3651"] {
            assert!(matches!(
                Config::from_toml(bad),
                Err(ConfigError::OutOfRange {
                    field: "cdr_retention_days",
                    ..
                })
            ));
        }
        assert!(Config::from_toml("call_media_idle_secs = 0").is_err());
        assert!(Config::from_toml("[limits]\nmax_call_allocations = 0").is_err());
    }

    #[test]
    fn rate_limits_have_defaults_and_are_checked() {
        let config = Config::from_toml(
            "[limits]\nconnections_per_address = 3\n\
             [limits.registrations]\nburst = 2\nrefill = 1\nperiod_secs = 60\n",
        )
        .unwrap();
        assert_eq!(config.limits.connections_per_address, 3);
        assert_eq!(
            config.limits.registrations,
            Rate {
                burst: 2,
                refill: 1,
                period_secs: 60
            }
        );
        assert_eq!(
            config.limits.prekey_fetches,
            Limits::default().prekey_fetches
        );
        for bad in [
            "[limits.prekey_fetches]\nburst = 0\nrefill = 1\nperiod_secs = 1",
            "[limits.account_envelopes]\nburst = 1\nrefill = 0\nperiod_secs = 1",
            "[limits]\nconnections_per_address = 0",
            "[limits]\nmailbox_max_envelopes = 0",
            "[limits]\nmailbox_max_bytes = 1000",
        ] {
            assert!(
                matches!(Config::from_toml(bad), Err(ConfigError::OutOfRange { .. })),
                "{bad}"
            );
        }
        // A rate must say all three numbers.
        assert!(matches!(
            Config::from_toml("[limits.registrations]\nburst = 2"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn the_readme_config_shows_the_defaults() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|rest| rest.split("```").next())
            .find(|block| block.contains("[limits]"))
            .unwrap();
        assert_eq!(Config::from_toml(block).unwrap(), Config::default());
    }

    #[test]
    fn the_store_backend_is_redb_by_default_and_an_unknown_one_is_an_error() {
        assert_eq!(Config::default().store, StoreKind::Redb);
        assert_eq!(
            Config::from_toml("store = \"redb\"").unwrap().store,
            StoreKind::Redb
        );
        for bad in ["store = \"nats\"", "store = \"Redb\"", "store = 1"] {
            assert!(
                matches!(Config::from_toml(bad), Err(ConfigError::Parse { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_settings_are_errors_not_silently_ignored() {
        assert!(matches!(
            Config::from_toml("mesage_expiry_days = 3"),
            Err(ConfigError::Parse { .. })
        ));
        let config = Config::from_toml(
            "listen = \"0.0.0.0:443\"\nregistration = \"invite\"\n[limits]\nmax_connections = 10\n",
        )
        .unwrap();
        assert_eq!(config.registration, RegistrationPolicy::Invite);
        assert_eq!(config.limits.max_connections, 10);
        assert_eq!(config.limits.idle_timeout_secs, 60);
    }

    #[test]
    fn read_deadlines_have_defaults_and_ranges() {
        let config = Config::default();
        assert_eq!(config.hello_timeout(), Duration::from_secs(10));
        assert_eq!(config.frame_read_timeout(), Duration::from_secs(30));
        let config = Config::from_toml("[limits]\nframe_read_timeout_secs = 5").unwrap();
        assert_eq!(config.frame_read_timeout(), Duration::from_secs(5));
        for bad in [
            "[limits]\nframe_read_timeout_secs = 0",
            "[limits]\nhello_timeout_secs = 0",
            "[limits]\nhello_timeout_secs = 3601",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }
}
