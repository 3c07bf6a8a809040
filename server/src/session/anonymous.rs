//! The anonymous phase: a connection that said `Hello` and has not authenticated. It may
//! register, authenticate, send sealed envelopes, retract them, open a provisioning
//! address, and fetch prekeys or list devices of an account that admits it (with the
//! account's delivery token, or one that admits anyone); any other request ends it.

use hush_protocol::{AccountId, ErrorCode, RequestBody};
use rand_core::{OsRng, RngCore};

use super::charge::{self, Budget};
use super::context::Rules;
use super::decision::{
    rate_limited, retract_write, sealed_copies, sealed_write, Admitted, Decision, Read,
};
use super::handshake::Binding;
use crate::config::RegistrationPolicy;
use crate::quota::Requester;
use crate::store::Write;

/// What an anonymous connection holds.
pub(super) struct Anonymous {
    /// What its authentication must sign.
    pub binding: Binding,
    /// The provisioning address it opened, if any (at most one, ever).
    pub provisioning: Option<[u8; 16]>,
}

impl Anonymous {
    pub(super) fn new(binding: Binding) -> Self {
        Anonymous {
            binding,
            provisioning: None,
        }
    }
}

/// What a request on an anonymous connection comes to.
pub(super) fn decide(
    state: &Anonymous,
    budget: &mut Budget,
    rules: &Rules<'_>,
    body: RequestBody,
) -> Decision {
    match body {
        RequestBody::Register(register) => {
            // Charged before the signature is checked, which costs more than the charge.
            if let Err(wait) = budget.registration(rules) {
                return rate_limited(wait);
            }
            if let Err(code) = state.binding.registration_holds(&register) {
                return Decision::Close(code);
            }
            let mut account = AccountId([0; 16]);
            OsRng.fill_bytes(&mut account.0);
            Decision::Register {
                account,
                write: Write::Register {
                    account,
                    identity_key: register.identity_key,
                    device_key: register.device_key,
                    invite: register.invite,
                    require_invite: rules.config.registration == RegistrationPolicy::Invite,
                },
            }
        }
        // The signature is checked once the store has said which key the device has.
        RequestBody::Authenticate(auth) => match state.binding.exporter() {
            Ok(_) => Decision::Read(Read::DeviceKey(auth)),
            Err(code) => Decision::Close(code),
        },
        RequestBody::SealedSend(send) => {
            if let Err(wait) = budget.envelopes(rules, None, sealed_copies(&send)) {
                return rate_limited(wait);
            }
            Decision::Submit(sealed_write(rules, send))
        }
        RequestBody::Retract(retract) => Decision::Submit(retract_write(&retract)),
        // A sealed sender sets up sessions without saying who it is: with the recipient's
        // delivery token (or where the recipient admits anyone).
        RequestBody::FetchPrekeys(fetch) => {
            if let Err(wait) = charge::prekey_fetch(rules, Requester::Address(budget.peer())) {
                return rate_limited(wait);
            }
            Decision::Read(Read::Admission {
                account: fetch.account,
                token: fetch.access,
                then: Admitted::Submit(Write::TakePrekeys {
                    account: fetch.account,
                    device: fetch.device,
                    low_threshold: rules.config.low_prekey_threshold,
                }),
            })
        }
        RequestBody::ListDevices(list) => Decision::Read(Read::Admission {
            account: list.account,
            token: list.access,
            then: Admitted::Devices(list.account),
        }),
        RequestBody::OpenProvisioning => {
            if state.provisioning.is_some() {
                Decision::Respond(Err(ErrorCode::NotPermitted))
            } else {
                Decision::OpenProvisioning
            }
        }
        RequestBody::AddDevice(_)
        | RequestBody::RemoveDevice(_)
        | RequestBody::UploadPrekeys(_)
        | RequestBody::Send(_)
        | RequestBody::Ack(_)
        | RequestBody::GetSenderCertificate
        | RequestBody::SetDeliveryAccess(_)
        | RequestBody::Provision(_)
        | RequestBody::AllocateCall(_)
        | RequestBody::JoinCall(_)
        | RequestBody::EndCall(_) => Decision::Close(ErrorCode::NotAuthenticated),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::IpAddr;

    use hush_protocol::auth::EXPORTER_LEN;
    use hush_protocol::sealed::SealedEnvelope;
    use hush_protocol::{
        Ack, AddDevice, AllocateCall, Authenticate, CallOutcome, CallToken, DeviceId, EndCall,
        FetchPrekeys, JoinCall, ListDevices, OutgoingEnvelope, Provision, RemoveDevice, Retract,
        SealedSend, Send, SetDeliveryAccess, Signature,
    };

    use super::super::fixtures::{
        alice, auth_signature, device_key, register, Fixture, CHALLENGE, EXPORTER,
    };
    use super::*;
    use crate::metrics::Metrics;
    use crate::rate::Rate;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const THERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    fn anonymous() -> Anonymous {
        Anonymous::new(Binding::with_challenge(CHALLENGE, Some(EXPORTER)))
    }

    fn sealed_send(devices: u32) -> RequestBody {
        RequestBody::SealedSend(SealedSend {
            envelopes: vec![SealedEnvelope {
                account: AccountId([2; 16]),
                devices: (1..=devices).map(DeviceId).collect(),
                access: None,
                retract_tag: None,
                payload: vec![1; 16],
            }],
        })
    }

    fn fetch(account: AccountId) -> RequestBody {
        RequestBody::FetchPrekeys(FetchPrekeys {
            account,
            device: None,
            access: Some([4; 16]),
        })
    }

    #[test]
    fn a_send_before_authentication_closes_the_connection() {
        let fixture = Fixture::new();
        let mut budget = Budget::new(HERE, &fixture.rules());
        let send = RequestBody::Send(Send {
            envelopes: vec![OutgoingEnvelope {
                recipients: vec![alice()],
                payload: vec![1],
                retract_tag: None,
            }],
        });
        let others = [
            send,
            RequestBody::Ack(Ack { ids: Vec::new() }),
            RequestBody::AddDevice(AddDevice {
                device_key: [1; 32],
            }),
            RequestBody::RemoveDevice(RemoveDevice {
                device: DeviceId(2),
            }),
            RequestBody::GetSenderCertificate,
            RequestBody::SetDeliveryAccess(SetDeliveryAccess {
                token: None,
                allow_unknown_senders: true,
            }),
            RequestBody::Provision(Provision {
                address: [1; 16],
                payload: vec![1],
            }),
            RequestBody::AllocateCall(AllocateCall {
                callee: alice().account,
            }),
            RequestBody::JoinCall(JoinCall {
                allocation: 1,
                token: CallToken([1; 16]),
            }),
            RequestBody::EndCall(EndCall {
                allocation: 1,
                outcome: CallOutcome::Missed,
            }),
        ];
        for body in others {
            assert!(matches!(
                decide(&anonymous(), &mut budget, &fixture.rules(), body),
                Decision::Close(ErrorCode::NotAuthenticated)
            ));
        }
    }

    #[test]
    fn an_anonymous_connection_may_send_sealed_retract_and_open_one_provisioning_address() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let mut state = anonymous();
        assert!(matches!(
            decide(&state, &mut budget, &rules, sealed_send(2)),
            Decision::Submit(Write::SealedEnqueue { .. })
        ));
        let retract = RequestBody::Retract(Retract {
            secrets: vec![[1; 32]],
        });
        assert!(matches!(
            decide(&state, &mut budget, &rules, retract),
            Decision::Submit(Write::Retract { tags }) if tags.len() == 1 && tags[0] != [1; 32]
        ));
        assert!(matches!(
            decide(&state, &mut budget, &rules, RequestBody::OpenProvisioning),
            Decision::OpenProvisioning
        ));
        state.provisioning = Some([8; 16]);
        assert!(matches!(
            decide(&state, &mut budget, &rules, RequestBody::OpenProvisioning),
            Decision::Respond(Err(ErrorCode::NotPermitted))
        ));
    }

    #[test]
    fn a_registration_signed_over_this_connection_registers_a_fresh_account() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let body = RequestBody::Register(register(&EXPORTER, &CHALLENGE));
        let Decision::Register { account, write } = decide(&anonymous(), &mut budget, &rules, body)
        else {
            panic!("not registered");
        };
        assert!(matches!(
            write,
            Write::Register { account: written, require_invite: false, .. } if written == account
        ));
    }

    #[test]
    fn a_registration_signed_for_another_connection_closes_this_one() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let replayed = RequestBody::Register(register(&[4; EXPORTER_LEN], &CHALLENGE));
        assert!(matches!(
            decide(&anonymous(), &mut budget, &rules, replayed),
            Decision::Close(ErrorCode::AuthenticationFailed)
        ));
    }

    #[test]
    fn an_authentication_reads_the_device_key_before_its_signature_is_checked() {
        let fixture = Fixture::new();
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let signature = auth_signature(&device_key(), &EXPORTER, &CHALLENGE, &alice());
        let auth = || {
            RequestBody::Authenticate(Authenticate {
                address: alice(),
                signature: Signature(signature),
            })
        };
        assert!(matches!(
            decide(&anonymous(), &mut budget, &rules, auth()),
            Decision::Read(Read::DeviceKey(read)) if read.address == alice()
        ));
        // A connection whose TLS session gave no exporter cannot check one.
        let blind = Anonymous::new(Binding::with_challenge(CHALLENGE, None));
        assert!(matches!(
            decide(&blind, &mut budget, &rules, auth()),
            Decision::Close(ErrorCode::Internal)
        ));
    }

    #[test]
    fn registrations_from_one_address_are_rate_limited_until_the_clock_refills_them() {
        let fixture = Fixture::with_limits(|limits| limits.registrations = Rate::per_hour(1, 1));
        let rules = fixture.rules();
        let mut here = Budget::new(HERE, &rules);
        let mut there = Budget::new(THERE, &rules);
        let body = || RequestBody::Register(register(&EXPORTER, &CHALLENGE));
        assert!(matches!(
            decide(&anonymous(), &mut here, &rules, body()),
            Decision::Register { .. }
        ));
        // Another connection from the same address shares the limit; another address does not.
        let mut again = Budget::new(HERE, &rules);
        assert!(matches!(
            decide(&anonymous(), &mut again, &rules, body()),
            Decision::RateLimited {
                retry_after_ms: 3_600_000
            }
        ));
        assert!(matches!(
            decide(&anonymous(), &mut there, &rules, body()),
            Decision::Register { .. }
        ));
        assert_eq!(Metrics::get(&fixture.metrics.rate_limited_registrations), 1);
        fixture.clock.advance(3_599);
        assert!(matches!(
            decide(&anonymous(), &mut here, &rules, body()),
            Decision::RateLimited {
                retry_after_ms: 1_000
            }
        ));
        fixture.clock.advance(1);
        assert!(matches!(
            decide(&anonymous(), &mut here, &rules, body()),
            Decision::Register { .. }
        ));
    }

    #[test]
    fn sealed_sends_are_charged_to_the_source_address_and_a_refusal_refunds_the_connection() {
        let fixture = Fixture::with_limits(|limits| {
            limits.connection_envelopes = Rate::per_hour(4, 1);
            limits.address_sealed_sends = Rate::per_second(3, 1);
        });
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let state = anonymous();
        assert!(matches!(
            decide(&state, &mut budget, &rules, sealed_send(3)),
            Decision::Submit(_)
        ));
        assert!(matches!(
            decide(&state, &mut budget, &rules, sealed_send(1)),
            Decision::RateLimited {
                retry_after_ms: 1_000
            }
        ));
        assert_eq!(
            Metrics::get(&fixture.metrics.rate_limited_address_sealed_sends),
            1
        );
        // The address's refusal gave back the connection's token: after a second the
        // address has one, and the connection still has its fourth.
        fixture.clock.advance(1);
        assert!(matches!(
            decide(&state, &mut budget, &rules, sealed_send(1)),
            Decision::Submit(_)
        ));
        assert_eq!(
            Metrics::get(&fixture.metrics.rate_limited_connection_envelopes),
            0
        );
    }

    #[test]
    fn anonymous_prekey_fetches_are_charged_to_the_address_and_wait_for_admission() {
        let fixture = Fixture::with_limits(|limits| limits.prekey_fetches = Rate::per_hour(1, 1));
        let rules = fixture.rules();
        let mut budget = Budget::new(HERE, &rules);
        let bob = AccountId([2; 16]);
        assert!(matches!(
            decide(&anonymous(), &mut budget, &rules, fetch(bob)),
            Decision::Read(Read::Admission {
                account,
                token: Some(token),
                then: Admitted::Submit(Write::TakePrekeys { .. }),
            }) if account == bob && token == [4; 16]
        ));
        assert!(matches!(
            decide(&anonymous(), &mut budget, &rules, fetch(bob)),
            Decision::RateLimited { .. }
        ));
        // Listing devices consumes nothing, but needs admission as well.
        let list = RequestBody::ListDevices(ListDevices {
            account: bob,
            access: None,
        });
        assert!(matches!(
            decide(&anonymous(), &mut budget, &rules, list),
            Decision::Read(Read::Admission {
                token: None,
                then: Admitted::Devices(_),
                ..
            })
        ));
    }
}
