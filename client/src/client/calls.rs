//! Calls: signaling as end-to-end messages ([`CallSignal`]), media through a relay
//! allocation as QUIC datagrams, sealed per direction ([`crate::media`]).
//!
//! The caller allocates (the relay learns caller and callee accounts for the call-detail
//! record, P8, and nothing else), sends an `Offer` with a fresh call key, the allocation and
//! its token to every device of the callee, and rings until an answer or the ring timeout.
//! The callee's devices all ring; the one that answers joins the allocation and tells the
//! caller and its own other devices, which stop ringing.

use std::collections::HashMap;
use std::sync::Arc;

use hush_protocol::{AccountId, CallEndCause, CallOutcome, CallToken, DeviceId, ErrorCode};
use tokio::sync::mpsc;

use super::state::{Inner, State, Work};
use super::{ClientError, ClientEvent};
use crate::content::{Body, CallId, CallSignal, Content};
use crate::error::ConnectionError;
use crate::media::{CallKey, Direction, MediaReceiver, MediaSender, MEDIA_OVERHEAD};

/// Media frames buffered for the app per call; beyond that, frames are dropped (late
/// audio is worthless).
const MEDIA_BUFFER: usize = 64;
/// A callee never rings for less than this, whatever its own setting (the caller's
/// setting may be longer).
const RING_FLOOR_SECS: u64 = 60;
/// Allowance for clocks that disagree between caller and callee.
const CLOCK_SKEW_SECS: u64 = 30;

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEndReason {
    /// The other side hung up.
    HungUp,
    /// The callee declined.
    Rejected,
    /// The callee was in another call.
    Busy,
    /// Nobody answered before the ring timeout (caller side).
    NoAnswer,
    /// The caller gave up before we answered (a missed call, callee side).
    Cancelled,
    /// Another of our devices answered.
    AnsweredElsewhere,
    /// Another of our devices declined.
    RejectedElsewhere,
    /// The relay ended the allocation (media went idle, a connection dropped).
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Caller,
    Callee,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Ringing,
    Connected,
}

/// A call this device takes part in (or rings for).
#[derive(Clone)]
pub(crate) struct ActiveCall {
    pub(crate) peer: AccountId,
    pub(crate) role: Role,
    pub(crate) allocation: u32,
    pub(crate) token: [u8; 16],
    pub(crate) key: CallKey,
    pub(crate) phase: Phase,
}

/// Media state of connected calls, by allocation: kept apart from the client state so
/// that 50 frames a second do not contend with messaging.
#[derive(Default)]
pub(crate) struct MediaTable {
    slots: HashMap<u32, MediaSlot>,
    waiting: HashMap<CallId, CallMedia>,
}

struct MediaSlot {
    receiver: MediaReceiver,
    frames: mpsc::Sender<Vec<u8>>,
}

/// The media of one connected call: send encoded frames, receive the peer's. Codecs are
/// the app's business; frames are opaque bytes here.
pub struct CallMedia {
    inner: Arc<Inner>,
    allocation: u32,
    sender: MediaSender,
    frames: mpsc::Receiver<Vec<u8>>,
}

impl CallMedia {
    /// Seals and sends one frame (unreliable, like the network under it).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), ClientError> {
        let sealed = self
            .sender
            .seal(frame)
            .map_err(|_| ClientError::CallMedia)?;
        self.inner
            .connection
            .send_media(self.allocation, &sealed)
            .map_err(Into::into)
    }

    /// The next frame from the peer; `None` once the call is over.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.frames.recv().await
    }

    /// A frame from the peer if one is waiting (for apps that pull audio on a timer).
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        self.frames.try_recv().ok()
    }

    /// Whether our frames go over the relay's UDP media port (it answered our binding
    /// there) rather than QUIC datagrams. Either way they are end-to-end sealed the same.
    pub fn on_udp_port(&self) -> bool {
        self.inner.connection.media_on_udp(self.allocation)
    }

    /// Moves our sending direction to a fresh key epoch.
    pub fn rotate_key(&mut self) {
        self.sender.rotate();
    }

    /// The largest frame that fits one datagram.
    pub fn max_frame(&self) -> usize {
        hush_protocol::media::MAX_MEDIA_PAYLOAD - MEDIA_OVERHEAD
    }
}

fn directions(role: Role) -> (Direction, Direction) {
    match role {
        Role::Caller => (Direction::FromCaller, Direction::FromCallee),
        Role::Callee => (Direction::FromCallee, Direction::FromCaller),
    }
}

impl Inner {
    /// Sets up the media of a call that just connected.
    pub(crate) fn connect_media(self: &Arc<Self>, call_id: CallId, call: &ActiveCall) {
        let (ours, theirs) = directions(call.role);
        let (frames_tx, frames) = mpsc::channel(MEDIA_BUFFER);
        let media = CallMedia {
            inner: self.clone(),
            allocation: call.allocation,
            sender: MediaSender::new(&call.key, call_id, ours, call.allocation),
            frames,
        };
        if let Ok(mut table) = self.media.lock() {
            table.slots.insert(
                call.allocation,
                MediaSlot {
                    receiver: MediaReceiver::new(&call.key, call_id, theirs, call.allocation),
                    frames: frames_tx,
                },
            );
            table.waiting.insert(call_id, media);
        }
    }

    pub(crate) fn drop_media(&self, allocation: u32, call_id: &CallId) {
        if let Ok(mut table) = self.media.lock() {
            table.slots.remove(&allocation);
            table.waiting.remove(call_id);
        }
    }

    /// One datagram from the relay: opened and handed to the call's media, or dropped.
    pub(crate) fn media_arrived(&self, allocation: u32, sealed: &[u8]) {
        let Ok(mut table) = self.media.lock() else {
            return;
        };
        let Some(slot) = table.slots.get_mut(&allocation) else {
            return;
        };
        // Replayed, too old or forged frames are simply dropped, as a codec drops loss.
        if let Ok(frame) = slot.receiver.open(sealed) {
            let _ = slot.frames.try_send(frame);
        }
    }

    /// A call signal from `from`: updates the call table and says what to tell the app.
    /// Runs under the state lock; relay requests it needs go to the worker.
    pub(crate) fn call_signal(
        self: &Arc<Self>,
        state: &mut State,
        from: AccountId,
        device: DeviceId,
        sent_at: u64,
        signal: CallSignal,
    ) -> Option<ClientEvent> {
        match signal {
            CallSignal::Offer {
                call_id,
                key,
                allocation,
                token,
                video,
            } => {
                // An offer that waited in the mailbox longer than any caller rings is a
                // missed call already: it must not ring now.
                let ring = u64::from(state.settings.ring_timeout_secs).max(RING_FLOOR_SECS);
                if self.now().saturating_sub(sent_at) > ring + CLOCK_SKEW_SECS {
                    return None;
                }
                if state.in_call() {
                    let _ = self
                        .work
                        .send(Work::CallSignal(from, CallSignal::Busy { call_id }));
                    return None;
                }
                state.calls.insert(
                    call_id,
                    ActiveCall {
                        peer: from,
                        role: Role::Callee,
                        allocation,
                        token,
                        key,
                        phase: Phase::Ringing,
                    },
                );
                self.ring_out_after(
                    call_id,
                    std::time::Duration::from_secs(ring + CLOCK_SKEW_SECS),
                );
                Some(ClientEvent::IncomingCall {
                    from,
                    device,
                    call_id,
                    video,
                })
            }
            CallSignal::Answer { call_id } => {
                let call = state.calls.get_mut(&call_id)?;
                if call.role != Role::Caller || call.peer != from || call.phase != Phase::Ringing {
                    return None;
                }
                call.phase = Phase::Connected;
                self.connect_media(call_id, call);
                Some(ClientEvent::CallAnswered { call_id })
            }
            CallSignal::Reject { call_id } | CallSignal::Busy { call_id } => {
                let reason = if matches!(signal, CallSignal::Busy { .. }) {
                    (CallEndReason::Busy, CallOutcome::Busy)
                } else {
                    (CallEndReason::Rejected, CallOutcome::Rejected)
                };
                let call = state.calls.get(&call_id)?;
                if call.role != Role::Caller || call.peer != from || call.phase != Phase::Ringing {
                    return None;
                }
                let allocation = call.allocation;
                state.calls.remove(&call_id);
                let _ = self.work.send(Work::EndCall(allocation, reason.1));
                Some(ClientEvent::CallEnded {
                    call_id,
                    reason: reason.0,
                })
            }
            CallSignal::HangUp { call_id } => {
                let call = state.calls.get(&call_id)?;
                if call.peer != from || call.phase != Phase::Connected {
                    return None;
                }
                let allocation = call.allocation;
                state.calls.remove(&call_id);
                self.drop_media(allocation, &call_id);
                // Our side of the allocation ends too (harmless if the peer's end got there
                // first), so the record's end time is the hang-up's.
                let _ = self
                    .work
                    .send(Work::EndCall(allocation, CallOutcome::Answered));
                Some(ClientEvent::CallEnded {
                    call_id,
                    reason: CallEndReason::HungUp,
                })
            }
            CallSignal::Cancel { call_id } => {
                // Only the caller cancels, and only a call that rings here.
                let call = state.calls.get(&call_id)?;
                if call.peer != from || call.role != Role::Callee || call.phase != Phase::Ringing {
                    return None;
                }
                state.calls.remove(&call_id);
                Some(ClientEvent::CallEnded {
                    call_id,
                    reason: CallEndReason::Cancelled,
                })
            }
        }
    }

    /// Ends a call that still rings after `after`. Ours (caller): the callee's devices are
    /// told to stop and the relay records it missed. Theirs (callee): it stops here
    /// whatever the caller does, so a caller that crashed or never cancels cannot leave
    /// this device busy for good.
    pub(crate) fn ring_out_after(self: &Arc<Self>, call_id: CallId, after: std::time::Duration) {
        // A weak handle: a pending timer must not keep a closed client's store open.
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let _operation = inner.call_operations.lock().await;
            let call = {
                let mut state = inner.lock();
                match state.calls.get(&call_id) {
                    Some(call) if call.phase == Phase::Ringing => state.calls.remove(&call_id),
                    _ => None,
                }
            };
            let Some(call) = call else {
                return;
            };
            let reason = match call.role {
                Role::Caller => {
                    let _ = inner
                        .send_signal(call.peer, CallSignal::Cancel { call_id })
                        .await;
                    let _ = inner
                        .connection
                        .end_call(call.allocation, CallOutcome::Missed)
                        .await;
                    CallEndReason::NoAnswer
                }
                Role::Callee => CallEndReason::Cancelled,
            };
            let events = {
                let mut state = inner.lock();
                state
                    .pending_events
                    .push(ClientEvent::CallEnded { call_id, reason });
                std::mem::take(&mut state.pending_events)
            };
            inner.emit_soon(events);
        });
    }

    /// The relay ended an allocation (the peer's end, idle media, a dropped connection).
    /// Whichever comes first of this and the peer's end-to-end signal decides the event;
    /// both name the same reason.
    pub(crate) fn allocation_ended(
        &self,
        state: &mut State,
        allocation: u32,
        cause: CallEndCause,
    ) -> Option<ClientEvent> {
        let call_id = state
            .calls
            .iter()
            .find(|(_, call)| call.allocation == allocation)
            .map(|(id, _)| *id)?;
        let call = state.calls.remove(&call_id)?;
        self.drop_media(allocation, &call_id);
        if cause == CallEndCause::RingTimeout && call.role == Role::Caller {
            // The relay gave up ringing: stop the callee's devices too.
            let _ = self
                .work
                .send(Work::CallSignal(call.peer, CallSignal::Cancel { call_id }));
        }
        let reason = match (cause, call.phase, call.role) {
            // The caller gave up before an answer (we were ringing).
            (CallEndCause::EndedByPeer, Phase::Ringing, Role::Callee)
            | (CallEndCause::RingTimeout, _, Role::Callee) => CallEndReason::Cancelled,
            (CallEndCause::EndedByPeer, _, _) => CallEndReason::HungUp,
            (CallEndCause::RingTimeout, _, Role::Caller) => CallEndReason::NoAnswer,
            (CallEndCause::MediaIdle | CallEndCause::PeerGone, _, _) => CallEndReason::Ended,
        };
        Some(ClientEvent::CallEnded { call_id, reason })
    }

    /// Sends a call signal to `to` (not kept, not copied: signals are ephemeral).
    pub(crate) async fn send_signal(
        &self,
        to: AccountId,
        signal: CallSignal,
    ) -> Result<(), ClientError> {
        let profile_key = *self.lock().profile_key;
        let content = Content::control(Body::Call(signal), Some(profile_key), None, self.now());
        self.send_to_contact(to, &content, None, &mut None).await
    }

    /// Sends an answer or rejection to the caller, then copies it to our other devices.
    async fn tell_caller_and_own_devices(
        &self,
        caller: AccountId,
        signal: CallSignal,
    ) -> Result<(), ClientError> {
        self.send_signal(caller, signal.clone()).await?;
        // Best effort: the caller has its answer; a device that keeps ringing stops when
        // the caller's side ends the offer.
        let _ = self.signal_own_devices(caller, signal).await;
        Ok(())
    }

    /// Copies an answer or rejection to our other devices so they stop ringing (at once:
    /// ringing does not wait for the privacy jitter of other copies).
    pub(crate) async fn signal_own_devices(
        &self,
        peer: AccountId,
        signal: CallSignal,
    ) -> Result<(), ClientError> {
        let content = Content::control(Body::Call(signal), None, Some(peer.0), self.now());
        self.send_to_own_devices(&content).await
    }
}

/// A signal one of our other devices sent: an answer or rejection there stops ours
/// ringing.
pub(crate) fn own_call_signal(state: &mut State, signal: &CallSignal) -> Option<ClientEvent> {
    let (call_id, reason) = match signal {
        CallSignal::Answer { call_id } => (*call_id, CallEndReason::AnsweredElsewhere),
        CallSignal::Reject { call_id } => (*call_id, CallEndReason::RejectedElsewhere),
        _ => return None,
    };
    let call = state.calls.get(&call_id)?;
    if call.role != Role::Callee || call.phase != Phase::Ringing {
        return None;
    }
    state.calls.remove(&call_id);
    Some(ClientEvent::CallEnded { call_id, reason })
}

impl super::Client {
    /// Calls a contact: every device of theirs rings until one answers, all decline, or
    /// the ring timeout (`Settings::ring_timeout_secs`) passes.
    pub async fn start_call(&self, to: AccountId, video: bool) -> Result<CallId, ClientError> {
        let inner = self.inner();
        let _operation = inner.call_operations.lock().await;
        {
            let mut state = inner.lock();
            if state.in_call() {
                return Err(ClientError::CallInProgress);
            }
            state.call_starting = true;
        }
        let allocated = inner.connection.allocate_call(to).await;
        inner.lock().call_starting = false;
        let (allocation, token, call_id) = allocated?;
        let key = CallKey::generate();
        let offer = CallSignal::Offer {
            call_id,
            key: key.clone(),
            allocation,
            token: token.0,
            video,
        };
        // In the table before the offer leaves: the callee's answer (or busy) may come
        // back before `send_signal` returns.
        let timeout = {
            let mut state = inner.lock();
            state.calls.insert(
                call_id,
                ActiveCall {
                    peer: to,
                    role: Role::Caller,
                    allocation,
                    token: token.0,
                    key,
                    phase: Phase::Ringing,
                },
            );
            std::time::Duration::from_secs(u64::from(state.settings.ring_timeout_secs))
        };
        if let Err(error) = inner.send_signal(to, offer).await {
            inner.lock().calls.remove(&call_id);
            let _ = inner
                .connection
                .end_call(allocation, CallOutcome::Failed)
                .await;
            return Err(error);
        }
        inner.ring_out_after(call_id, timeout);
        Ok(call_id)
    }

    /// Answers a ringing call on this device.
    pub async fn answer_call(&self, call_id: CallId) -> Result<(), ClientError> {
        let inner = self.inner();
        let _operation = inner.call_operations.lock().await;
        let (peer, allocation, token) = {
            let state = inner.lock();
            let call = state.calls.get(&call_id).ok_or(ClientError::NoSuchCall)?;
            if call.role != Role::Callee || call.phase != Phase::Ringing {
                return Err(ClientError::NoSuchCall);
            }
            (call.peer, call.allocation, call.token)
        };
        if let Err(error) = inner
            .connection
            .join_call(allocation, CallToken(token))
            .await
        {
            // Answered elsewhere first, or the caller already gave up.
            inner.lock().calls.remove(&call_id);
            return Err(error.into());
        }
        if let Err(error) = inner
            .tell_caller_and_own_devices(peer, CallSignal::Answer { call_id })
            .await
        {
            // Joined at the relay but the caller cannot know: end it rather than leave a
            // half-answered call (and a record of a conversation nobody had).
            inner.lock().calls.remove(&call_id);
            let _ = inner
                .connection
                .end_call(allocation, CallOutcome::Failed)
                .await;
            return Err(error);
        }
        let mut state = inner.lock();
        if let Some(call) = state.calls.get_mut(&call_id) {
            call.phase = Phase::Connected;
            inner.connect_media(call_id, call);
        }
        Ok(())
    }

    /// Declines a ringing call (on all our devices).
    pub async fn reject_call(&self, call_id: CallId) -> Result<(), ClientError> {
        let inner = self.inner();
        let _operation = inner.call_operations.lock().await;
        self.reject_locked(call_id).await
    }

    async fn reject_locked(&self, call_id: CallId) -> Result<(), ClientError> {
        let inner = self.inner();
        let call = inner
            .lock()
            .calls
            .remove(&call_id)
            .ok_or(ClientError::NoSuchCall)?;
        inner
            .tell_caller_and_own_devices(call.peer, CallSignal::Reject { call_id })
            .await
    }

    /// Ends a call: hangs up a connected one, cancels one still ringing at the peer, or
    /// declines one ringing here.
    pub async fn hang_up(&self, call_id: CallId) -> Result<(), ClientError> {
        let inner = self.inner();
        let _operation = inner.call_operations.lock().await;
        let call = {
            let mut state = inner.lock();
            let ringing_here = state
                .calls
                .get(&call_id)
                .is_some_and(|call| call.role == Role::Callee && call.phase == Phase::Ringing);
            if ringing_here {
                None
            } else {
                Some(
                    state
                        .calls
                        .remove(&call_id)
                        .ok_or(ClientError::NoSuchCall)?,
                )
            }
        };
        let Some(call) = call else {
            // Hanging up a call that rings here declines it.
            return self.reject_locked(call_id).await;
        };
        inner.drop_media(call.allocation, &call_id);
        let (signal, outcome) = match call.phase {
            Phase::Connected => (CallSignal::HangUp { call_id }, CallOutcome::Answered),
            Phase::Ringing => (CallSignal::Cancel { call_id }, CallOutcome::Missed),
        };
        let _ = inner.send_signal(call.peer, signal).await;
        match inner.connection.end_call(call.allocation, outcome).await {
            // The peer's side ended the allocation first: the call is over either way.
            Ok(()) | Err(ConnectionError::Refused(ErrorCode::UnknownCall)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The media of a connected call, once (after `CallAnswered`, or after our
    /// `answer_call`).
    pub fn take_media(&self, call_id: CallId) -> Option<CallMedia> {
        self.inner()
            .media
            .lock()
            .ok()
            .and_then(|mut table| table.waiting.remove(&call_id))
    }
}
