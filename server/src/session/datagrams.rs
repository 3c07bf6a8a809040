//! An authenticated connection's media datagrams (QUIC), forwarded to the other party of
//! their call.

use std::sync::Arc;

use hush_protocol::media::{media_allocation, MediaError, MEDIA_HEADER_LEN};

use super::SessionContext;
use crate::calls::Route;
use crate::media;
use crate::metrics::Metrics;

/// Reads this connection's media datagrams and forwards each, as it is, to the other
/// party of its allocation. Nothing here waits on anything but the next datagram: a
/// datagram that cannot go on at once is dropped and counted, and the forwarded bytes are
/// the received buffer itself (no copy).
pub(super) async fn media_loop(
    context: Arc<SessionContext>,
    number: u64,
    connection: quinn::Connection,
) {
    let metrics = &context.metrics;
    let mut out = Vec::new();
    while let Ok(datagram) = connection.read_datagram().await {
        let allocation = match media_allocation(&datagram) {
            Ok(allocation) => allocation,
            Err(MediaError::TooLarge(_) | MediaError::TooShort(_)) => {
                Metrics::inc(&metrics.media_dropped_malformed);
                continue;
            }
        };
        match context.calls.route(allocation, number, context.clock.now()) {
            Route::Forward(peer) => {
                let payload = datagram.slice(MEDIA_HEADER_LEN..);
                media::forward(
                    &context.media,
                    metrics,
                    allocation,
                    &peer,
                    &payload,
                    Some(datagram),
                    &mut out,
                );
            }
            Route::Unknown => Metrics::inc(&metrics.media_dropped_unknown),
            Route::NotParty => Metrics::inc(&metrics.media_dropped_not_party),
            Route::NoPeer => Metrics::inc(&metrics.media_dropped_no_peer),
        }
    }
}
