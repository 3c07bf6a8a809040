//! Aggregate counters (P9): totals only, never labelled by account, device or address.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use hush_protocol::ErrorCode;

/// Codes 0..=63 have their own counter; later codes share the last slot.
const CODE_SLOTS: usize = 64;

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// QUIC handshakes that became sessions.
    pub connections_opened: AtomicU64,
    /// Connections holding a slot now, from the start of their handshake until they are
    /// closed (a gauge, not a counter).
    pub connections_open: AtomicU64,
    /// Connections refused at the connection limit.
    pub connections_refused: AtomicU64,
    /// Connections refused: their source address had as many as it may.
    pub connections_refused_per_address: AtomicU64,
    /// Requests refused: the connection's envelope rate.
    pub rate_limited_connection_envelopes: AtomicU64,
    /// Requests refused: the sending account's envelope rate.
    pub rate_limited_account_envelopes: AtomicU64,
    /// Requests refused: the source address's rate of anonymous sealed sends.
    pub rate_limited_address_sealed_sends: AtomicU64,
    /// Requests refused: the requester's prekey fetch rate.
    pub rate_limited_prekey_fetches: AtomicU64,
    /// Requests refused: the source address's registration rate.
    pub rate_limited_registrations: AtomicU64,
    /// Sends refused: a recipient device's mailbox was full.
    pub mailbox_full_refusals: AtomicU64,
    /// Retry packets sent to validate new addresses.
    pub address_validations: AtomicU64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: AtomicU64,
    /// Accounts registered.
    pub registrations: AtomicU64,
    /// Successful device authentications.
    pub authentications: AtomicU64,
    /// Envelope copies committed to mailboxes.
    pub envelopes_accepted: AtomicU64,
    /// Envelopes pushed to devices.
    pub envelopes_delivered: AtomicU64,
    /// Envelopes deleted by expiry.
    pub envelopes_expired: AtomicU64,
    /// Envelope copies deleted by retraction.
    pub envelopes_retracted: AtomicU64,
    /// Sender certificates issued.
    pub sender_certificates: AtomicU64,
    /// Provisioning messages handed over.
    pub provisioning_messages: AtomicU64,
    /// Call allocations made.
    pub calls_allocated: AtomicU64,
    /// Call allocations ended (each wrote one call-detail record).
    pub calls_ended: AtomicU64,
    /// Call-detail records deleted by retention.
    pub call_records_expired: AtomicU64,
    /// Media datagrams forwarded to the other party.
    pub media_forwarded: AtomicU64,
    /// Media datagrams dropped: no live allocation with their id.
    pub media_dropped_unknown: AtomicU64,
    /// Media datagrams dropped: the sending connection is not a party of the allocation.
    pub media_dropped_not_party: AtomicU64,
    /// Media datagrams dropped: the other party has not joined yet.
    pub media_dropped_no_peer: AtomicU64,
    /// Media datagrams dropped: larger than the media frame limit, or shorter than the header.
    pub media_dropped_malformed: AtomicU64,
    /// Media datagrams dropped: the other party's connection could not take them.
    pub media_dropped_send_failed: AtomicU64,
    /// Binding packets answered on the UDP media port.
    pub media_bindings: AtomicU64,
    /// Media packets dropped on the UDP media port: their tag did not verify.
    pub media_dropped_forged: AtomicU64,
    /// Media packets dropped on the UDP media port: replayed, or too old.
    pub media_dropped_replayed: AtomicU64,
    connections_closed_by_code: CodeCounters,
}

/// One counter per error code (arrays this long have no derived `Default`).
#[derive(Debug)]
struct CodeCounters([AtomicU64; CODE_SLOTS]);

impl Default for CodeCounters {
    fn default() -> Self {
        CodeCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Metrics {
    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn open_connection(&self) -> OpenConnection<'_> {
        Self::inc(&self.connections_open);
        OpenConnection(&self.connections_open)
    }

    /// Counts a connection closed by the relay with `code`.
    pub fn closed_with(&self, code: ErrorCode) {
        let slot = usize::from(code.as_u16()).min(CODE_SLOTS - 1);
        Self::inc(&self.connections_closed_by_code.0[slot]);
    }

    /// Connections the relay closed with `code`.
    pub fn closed_count(&self, code: ErrorCode) -> u64 {
        let slot = usize::from(code.as_u16()).min(CODE_SLOTS - 1);
        self.connections_closed_by_code.0[slot].load(Ordering::Relaxed)
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            ("hush_connections_opened_total", &self.connections_opened),
            ("hush_connections_refused_total", &self.connections_refused),
            (
                "hush_connections_refused_per_address_total",
                &self.connections_refused_per_address,
            ),
            (
                "hush_rate_limited_connection_envelopes_total",
                &self.rate_limited_connection_envelopes,
            ),
            (
                "hush_rate_limited_account_envelopes_total",
                &self.rate_limited_account_envelopes,
            ),
            (
                "hush_rate_limited_address_sealed_sends_total",
                &self.rate_limited_address_sealed_sends,
            ),
            (
                "hush_rate_limited_prekey_fetches_total",
                &self.rate_limited_prekey_fetches,
            ),
            (
                "hush_rate_limited_registrations_total",
                &self.rate_limited_registrations,
            ),
            (
                "hush_mailbox_full_refusals_total",
                &self.mailbox_full_refusals,
            ),
            ("hush_address_validations_total", &self.address_validations),
            ("hush_handshake_failures_total", &self.handshake_failures),
            ("hush_registrations_total", &self.registrations),
            ("hush_authentications_total", &self.authentications),
            ("hush_envelopes_accepted_total", &self.envelopes_accepted),
            ("hush_envelopes_delivered_total", &self.envelopes_delivered),
            ("hush_envelopes_expired_total", &self.envelopes_expired),
            ("hush_envelopes_retracted_total", &self.envelopes_retracted),
            ("hush_sender_certificates_total", &self.sender_certificates),
            (
                "hush_provisioning_messages_total",
                &self.provisioning_messages,
            ),
            ("hush_calls_allocated_total", &self.calls_allocated),
            ("hush_calls_ended_total", &self.calls_ended),
            (
                "hush_call_records_expired_total",
                &self.call_records_expired,
            ),
            ("hush_media_forwarded_total", &self.media_forwarded),
            (
                "hush_media_dropped_unknown_total",
                &self.media_dropped_unknown,
            ),
            (
                "hush_media_dropped_not_party_total",
                &self.media_dropped_not_party,
            ),
            (
                "hush_media_dropped_no_peer_total",
                &self.media_dropped_no_peer,
            ),
            (
                "hush_media_dropped_malformed_total",
                &self.media_dropped_malformed,
            ),
            (
                "hush_media_dropped_send_failed_total",
                &self.media_dropped_send_failed,
            ),
            ("hush_media_bindings_total", &self.media_bindings),
            (
                "hush_media_dropped_forged_total",
                &self.media_dropped_forged,
            ),
            (
                "hush_media_dropped_replayed_total",
                &self.media_dropped_replayed,
            ),
        ];
        for (name, value) in counters {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE hush_connections_open gauge\nhush_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE hush_connections_closed_total counter");
        for (slot, value) in self.connections_closed_by_code.0.iter().enumerate() {
            let count = value.load(Ordering::Relaxed);
            if count > 0 {
                let code = ErrorCode::from_u16(slot as u16);
                let _ = writeln!(
                    out,
                    "hush_connections_closed_total{{code=\"{code:?}\"}} {count}"
                );
            }
        }
        out
    }
}

/// A connection counted in `connections_open`; dropping it counts the connection closed,
/// however its task ends (return, panic, abort at shutdown).
pub struct OpenConnection<'a>(&'a AtomicU64);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
