//! The authenticated phase: a connection that is one device's live connection. Everything
//! but registering, authenticating again and opening a provisioning address.

use std::sync::Arc;

use hush_protocol::{DeviceAddress, ErrorCode, RequestBody};

use super::charge::{self, Budget};
use super::context::Rules;
use super::decision::{
    mailbox_quota, rate_limited, retract_write, sealed_copies, sealed_write, CallRequest, Decision,
    Read,
};
use super::delivery::DeliveryWindow;
use crate::quota::Requester;
use crate::store::rules::decide;
use crate::store::Write;

/// What an authenticated connection's decisions read.
pub(super) struct Authenticated {
    /// The device this connection is.
    pub address: DeviceAddress,
    /// The envelopes pushed here and not yet acknowledged.
    pub window: Arc<DeliveryWindow>,
}

/// What a request on an authenticated connection comes to.
pub(super) fn decide(
    state: &Authenticated,
    budget: &mut Budget,
    rules: &Rules<'_>,
    body: RequestBody,
) -> Decision {
    let address = state.address;
    let config = rules.config;
    let write = match body {
        RequestBody::AddDevice(add) => Write::AddDevice {
            account: address.account,
            device_key: add.device_key,
            max_devices: config.max_devices_per_account,
        },
        RequestBody::RemoveDevice(remove) => Write::RemoveDevice {
            address: DeviceAddress {
                account: address.account,
                device: remove.device,
            },
        },
        RequestBody::UploadPrekeys(upload) => Write::UploadPrekeys { address, upload },
        RequestBody::FetchPrekeys(fetch) => {
            if let Err(wait) = charge::prekey_fetch(rules, Requester::Account(address.account)) {
                return rate_limited(wait);
            }
            Write::TakePrekeys {
                account: fetch.account,
                device: fetch.device,
                low_threshold: config.low_prekey_threshold,
            }
        }
        RequestBody::Send(send) => {
            let copies = send.envelopes.iter().map(|e| e.recipients.len()).sum();
            if let Err(wait) = budget.envelopes(rules, Some(address.account), copies) {
                return rate_limited(wait);
            }
            let now = rules.clock.now();
            Write::Enqueue {
                envelopes: send.envelopes,
                quota: mailbox_quota(rules),
                received_at: now,
                expires_at: now.saturating_add(config.message_expiry_secs()),
            }
        }
        RequestBody::Ack(ack) => {
            state.window.acked(&ack.ids);
            Write::Ack {
                address,
                ids: ack.ids,
            }
        }
        RequestBody::SealedSend(send) => {
            if let Err(wait) = budget.envelopes(rules, Some(address.account), sealed_copies(&send))
            {
                return rate_limited(wait);
            }
            sealed_write(rules, send)
        }
        RequestBody::Retract(retract) => retract_write(&retract),
        RequestBody::SetDeliveryAccess(set) => Write::SetDeliveryAccess {
            account: address.account,
            // Only the hash is kept: a stolen database does not hand out tokens.
            token_hash: set.token.map(|token| decide::token_hash(&token)),
            allow_unknown_senders: set.allow_unknown_senders,
        },
        RequestBody::GetSenderCertificate => {
            return Decision::Read(Read::SenderCertificate(address))
        }
        RequestBody::ListDevices(list) => return Decision::Read(Read::Devices(list.account)),
        RequestBody::Provision(provision) => return Decision::Provision(provision),
        RequestBody::AllocateCall(allocate) => {
            return Decision::Call(CallRequest::Allocate {
                caller: address,
                callee: allocate.callee,
            })
        }
        RequestBody::JoinCall(join) => {
            return Decision::Call(CallRequest::Join {
                account: address.account,
                allocation: join.allocation,
                token: join.token,
            })
        }
        RequestBody::EndCall(end) => {
            return Decision::Call(CallRequest::End {
                allocation: end.allocation,
                hint: end.outcome,
            })
        }
        RequestBody::Register(_) | RequestBody::Authenticate(_) | RequestBody::OpenProvisioning => {
            return Decision::Respond(Err(ErrorCode::AlreadyAuthenticated))
        }
    };
    Decision::Submit(write)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{IpAddr, Ipv4Addr};

    use hush_protocol::{
        AccountId, Ack, AllocateCall, CallOutcome, CallToken, EndCall, EnvelopeId, JoinCall,
        OutgoingEnvelope, Send,
    };

    use super::super::fixtures::{alice, register, Fixture, CHALLENGE, EXPORTER};
    use super::*;
    use crate::metrics::Metrics;
    use crate::rate::Rate;

    const HERE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const BOB: AccountId = AccountId([2; 16]);

    fn authenticated() -> Authenticated {
        Authenticated {
            address: alice(),
            window: Arc::new(DeliveryWindow::new(4)),
        }
    }

    fn send(recipients: usize) -> RequestBody {
        let recipient = DeviceAddress {
            account: BOB,
            device: hush_protocol::DeviceId(1),
        };
        RequestBody::Send(Send {
            envelopes: vec![OutgoingEnvelope {
                recipients: vec![recipient; recipients],
                payload: vec![1; 64],
                retract_tag: None,
            }],
        })
    }

    #[test]
    fn a_send_is_charged_per_copy_and_refused_with_the_retry_time_until_the_clock_refills() {
        let fixture = Fixture::with_limits(|limits| {
            limits.connection_envelopes = Rate::per_second(3, 1);
        });
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let state = authenticated();
        assert!(matches!(
            decide(&state, &mut budget, &rules, send(2)),
            Decision::Submit(Write::Enqueue { .. })
        ));
        // One token left, two copies asked for: one more second of refill.
        assert!(matches!(
            decide(&state, &mut budget, &rules, send(2)),
            Decision::RateLimited {
                retry_after_ms: 1_000
            }
        ));
        assert_eq!(
            Metrics::get(&fixture.metrics.rate_limited_connection_envelopes),
            1
        );
        fixture.clock.advance_millis(999);
        assert!(matches!(
            decide(&state, &mut budget, &rules, send(2)),
            Decision::RateLimited { retry_after_ms: 1 }
        ));
        fixture.clock.advance_millis(1);
        assert!(matches!(
            decide(&state, &mut budget, &rules, send(2)),
            Decision::Submit(_)
        ));
    }

    #[test]
    fn an_account_limit_holds_across_its_connections() {
        let fixture = Fixture::with_limits(|limits| {
            limits.account_envelopes = Rate::per_hour(2, 1);
        });
        let rules = fixture.rules();
        let state = authenticated();
        let mut first = Budget::new(HERE, &rules);
        let mut second = Budget::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), &rules);
        assert!(matches!(
            decide(&state, &mut first, &rules, send(2)),
            Decision::Submit(_)
        ));
        assert!(matches!(
            decide(&state, &mut second, &rules, send(1)),
            Decision::RateLimited {
                retry_after_ms: 3_600_000
            }
        ));
        assert_eq!(
            Metrics::get(&fixture.metrics.rate_limited_account_envelopes),
            1
        );
    }

    #[test]
    fn a_send_moves_its_payload_into_the_write_stamped_by_the_clock() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let body = send(1);
        let RequestBody::Send(sent) = &body else {
            unreachable!()
        };
        let payload = sent.envelopes[0].payload.as_ptr();
        let Decision::Submit(Write::Enqueue {
            envelopes,
            received_at,
            expires_at,
            ..
        }) = decide(&authenticated(), &mut budget, &rules, body)
        else {
            panic!("not an enqueue");
        };
        assert_eq!(
            envelopes[0].payload.as_ptr(),
            payload,
            "the payload was copied"
        );
        assert_eq!(received_at, 1_000_000);
        assert_eq!(expires_at, 1_000_000 + fixture.config.message_expiry_secs());
    }

    #[tokio::test]
    async fn an_ack_frees_the_window_and_acks_the_connections_own_device() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let state = authenticated();
        state.window.push(EnvelopeId(7)).await.unwrap();
        assert_eq!(state.window.room(), 3);
        let ack = RequestBody::Ack(Ack {
            ids: vec![EnvelopeId(7), EnvelopeId(8)],
        });
        assert!(matches!(
            decide(&state, &mut budget, &rules, ack),
            Decision::Submit(Write::Ack { address, ids }) if address == alice() && ids.len() == 2
        ));
        assert_eq!(state.window.room(), 4, "an id not in flight freed room");
    }

    #[test]
    fn registering_authenticating_or_provisioning_again_is_refused_once_authenticated() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let again = [
            RequestBody::Register(register(&EXPORTER, &CHALLENGE)),
            RequestBody::OpenProvisioning,
        ];
        for body in again {
            assert!(matches!(
                decide(&authenticated(), &mut budget, &rules, body),
                Decision::Respond(Err(ErrorCode::AlreadyAuthenticated))
            ));
        }
    }

    #[test]
    fn call_requests_carry_the_connections_own_device_and_account() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let state = authenticated();
        let allocate = RequestBody::AllocateCall(AllocateCall { callee: BOB });
        assert!(matches!(
            decide(&state, &mut budget, &rules, allocate),
            Decision::Call(CallRequest::Allocate { caller, callee })
                if caller == alice() && callee == BOB
        ));
        let join = RequestBody::JoinCall(JoinCall {
            allocation: 9,
            token: CallToken([1; 16]),
        });
        assert!(matches!(
            decide(&state, &mut budget, &rules, join),
            Decision::Call(CallRequest::Join { account, allocation: 9, .. })
                if account == alice().account
        ));
        let end = RequestBody::EndCall(EndCall {
            allocation: 9,
            outcome: CallOutcome::Rejected,
        });
        assert!(matches!(
            decide(&state, &mut budget, &rules, end),
            Decision::Call(CallRequest::End {
                allocation: 9,
                hint: CallOutcome::Rejected
            })
        ));
    }
}
