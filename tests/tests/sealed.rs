//! Sealed sender on the relay: sender certificates, delivery tokens, sealed sends from
//! unauthenticated connections, device lists, and retraction of undelivered envelopes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hush_server::clock::Clock;

use hush_client::protocol::sealed::{retract_tag, CertificateError, SealedEnvelope};
use hush_client::protocol::{DeviceId, ErrorCode, OutgoingEnvelope};
use hush_client::{Connection, ConnectionError};
use hush_tests::{
    add_device, assert_no_envelope, drain, next_envelope, refused, Device, TestRelay,
};

const HOUR: u64 = 3600;
const TOKEN: [u8; 16] = [0x5a; 16];

fn sealed_to(device: &Device, devices: &[DeviceId], access: Option<[u8; 16]>) -> SealedEnvelope {
    SealedEnvelope {
        account: device.address.account,
        devices: devices.to_vec(),
        access,
        retract_tag: None,
        payload: b"sealed ciphertext".to_vec(),
    }
}

#[tokio::test]
async fn sender_certificates_verify_expire_and_survive_a_restart() {
    let mut relay = TestRelay::start_with(|c| c.sender_certificate_hours = 2).await;
    let alice = relay.register().await;
    let (certificate, relay_key) = alice.connection.sender_certificate().await.unwrap();
    let now = relay.clock.now();
    let body = certificate.verify(&relay_key, now).unwrap();
    assert_eq!(body.account, alice.address.account);
    assert_eq!(body.device, alice.address.device);
    assert_eq!(body.identity_key, b"identity-key");
    assert_eq!(body.expires_at, now + 2 * HOUR);

    // Expired once the relay's clock passes the validity.
    relay.clock.advance(2 * HOUR);
    assert_eq!(
        certificate.verify(&relay_key, relay.clock.now()),
        Err(CertificateError::Expired)
    );

    // Tampering with the body (another device id) breaks the signature.
    let mut tampered = certificate.clone();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_eq!(
        tampered.verify(&relay_key, now),
        Err(CertificateError::BadSignature)
    );

    // An unauthenticated connection gets none: the relay closes it, as for any request
    // that needs a device.
    let anonymous = relay.connect().await;
    match anonymous.sender_certificate().await {
        Err(ConnectionError::Closed(code)) => assert_eq!(code, Some(ErrorCode::NotAuthenticated)),
        other => panic!("expected the connection to close, got {other:?}"),
    }

    // The key is kept across restarts.
    let (address, key) = (alice.address, alice.key);
    drop(alice.connection);
    relay.restart().await;
    let alice = relay.login(address, &key).await;
    let (again, key_after) = alice.sender_certificate().await.unwrap();
    assert_eq!(key_after, relay_key);
    assert!(again.verify(&relay_key, relay.clock.now()).is_ok());
    assert!(certificate.verify(&key_after, now).is_ok());
}

#[tokio::test]
async fn sealed_sends_from_an_anonymous_connection_need_the_token_and_the_device_list() {
    let relay = TestRelay::start().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;
    let both = [bob.address.device, bob2.address.device];
    assert_eq!(
        bob.connection
            .list_devices(bob.address.account)
            .await
            .unwrap(),
        both.to_vec()
    );
    let ghost = relay.register().await;
    let ghost_account = ghost.address.account;
    drop(ghost);
    let anonymous = relay.connect().await;

    // A new account accepts no sealed envelopes at all.
    refused(
        anonymous
            .sealed_send(vec![sealed_to(&bob, &both, Some(TOKEN))])
            .await,
        ErrorCode::DeliveryRefused,
    );
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();

    // Wrong token, no token, and an account nobody can reach give the same answer.
    refused(
        anonymous
            .sealed_send(vec![sealed_to(&bob, &both, Some([1; 16]))])
            .await,
        ErrorCode::DeliveryRefused,
    );
    refused(
        anonymous
            .sealed_send(vec![sealed_to(&bob, &both, None)])
            .await,
        ErrorCode::DeliveryRefused,
    );
    let mut unknown = sealed_to(&bob, &both, Some(TOKEN));
    unknown.account = hush_client::protocol::AccountId([0x77; 16]);
    refused(
        anonymous.sealed_send(vec![unknown]).await,
        ErrorCode::DeliveryRefused,
    );
    let mut no_access = sealed_to(&bob, &[DeviceId::PRIMARY], Some(TOKEN));
    no_access.account = ghost_account;
    refused(
        anonymous.sealed_send(vec![no_access]).await,
        ErrorCode::DeliveryRefused,
    );

    // A stale device list: one missing, one extra, one twice.
    for devices in [
        vec![bob.address.device],
        vec![bob.address.device, bob2.address.device, DeviceId(9)],
        vec![bob.address.device, bob.address.device, bob2.address.device],
    ] {
        refused(
            anonymous
                .sealed_send(vec![sealed_to(&bob, &devices, Some(TOKEN))])
                .await,
            ErrorCode::DeviceListChanged,
        );
    }
    // One bad envelope refuses the whole request.
    refused(
        anonymous
            .sealed_send(vec![
                sealed_to(&bob, &both, Some(TOKEN)),
                sealed_to(&bob, &both, None),
            ])
            .await,
        ErrorCode::DeliveryRefused,
    );
    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!(stats.envelopes, 0, "nothing is stored for refused sends");

    // The same connection, still open, delivers with the token to every device.
    anonymous
        .sealed_send(vec![sealed_to(&bob, &both, Some(TOKEN))])
        .await
        .unwrap();
    for device in [&bob, &bob2] {
        let envelope = next_envelope(&device.connection).await;
        assert_eq!(envelope.payload, b"sealed ciphertext");
        device.connection.ack(&[envelope.id]).await.unwrap();
    }

    // Allowing unknown senders admits envelopes without a token.
    bob.connection
        .set_delivery_access(None, true)
        .await
        .unwrap();
    anonymous
        .sealed_send(vec![sealed_to(&bob, &both, None)])
        .await
        .unwrap();
    assert_eq!(
        next_envelope(&bob.connection).await.payload,
        b"sealed ciphertext"
    );
    // ...and the old token no longer means anything special.
    bob.connection
        .set_delivery_access(None, false)
        .await
        .unwrap();
    refused(
        anonymous
            .sealed_send(vec![sealed_to(&bob, &both, Some(TOKEN))])
            .await,
        ErrorCode::DeliveryRefused,
    );
}

#[tokio::test]
async fn an_authenticated_connection_may_send_sealed_too_and_list_devices() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();
    let devices = alice
        .connection
        .list_devices(bob.address.account)
        .await
        .unwrap();
    assert_eq!(devices, vec![DeviceId::PRIMARY]);
    alice
        .connection
        .sealed_send(vec![sealed_to(&bob, &devices, Some(TOKEN))])
        .await
        .unwrap();
    assert_eq!(
        next_envelope(&bob.connection).await.payload,
        b"sealed ciphertext"
    );
    refused(
        alice
            .connection
            .list_devices(hush_client::protocol::AccountId([3; 16]))
            .await,
        ErrorCode::UnknownAccount,
    );
}

#[tokio::test]
async fn retracting_an_undelivered_envelope_removes_it_before_anyone_sees_it() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();
    let (bob_address, bob_key) = (bob.address, bob.key);
    drop(bob.connection);

    let secret = [0x42; 32];
    let sealed_secret = [0x43; 32];
    alice
        .connection
        .send(vec![OutgoingEnvelope {
            recipients: vec![bob_address],
            payload: b"regret".to_vec(),
            retract_tag: Some(retract_tag(&secret)),
        }])
        .await
        .unwrap();
    alice
        .connection
        .send_to(&[bob_address], b"keep".to_vec())
        .await
        .unwrap();
    let anonymous = relay.connect().await;
    anonymous
        .sealed_send(vec![SealedEnvelope {
            account: bob_address.account,
            devices: vec![DeviceId::PRIMARY],
            access: Some(TOKEN),
            retract_tag: Some(retract_tag(&sealed_secret)),
            payload: b"sealed regret".to_vec(),
        }])
        .await
        .unwrap();
    assert_eq!(
        relay.relay().store_stats().await.unwrap().retract_entries,
        2
    );

    // Unknown secrets retract nothing; the right ones, from any connection, retract.
    assert_eq!(alice.connection.retract(&[[0; 32]]).await.unwrap(), 0);
    assert_eq!(alice.connection.retract(&[secret]).await.unwrap(), 1);
    assert_eq!(anonymous.retract(&[sealed_secret]).await.unwrap(), 1);
    assert_eq!(alice.connection.retract(&[secret]).await.unwrap(), 0);
    let stats = relay.relay().store_stats().await.unwrap();
    assert_eq!((stats.envelopes, stats.retract_entries), (1, 0));

    let bob = relay.login(bob_address, &bob_key).await;
    let received = drain(&bob).await;
    let payloads: Vec<&[u8]> = received.iter().map(|e| e.payload.as_slice()).collect();
    assert_eq!(payloads, vec![b"keep".as_slice()]);
    bob.ack(&[received[0].id]).await.unwrap();
    assert_no_envelope(&bob, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn retracting_after_the_ack_finds_nothing() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let bob = relay.register().await;
    let secret = [0x99; 32];
    alice
        .connection
        .send(vec![OutgoingEnvelope {
            recipients: vec![bob.address],
            payload: b"read already".to_vec(),
            retract_tag: Some(retract_tag(&secret)),
        }])
        .await
        .unwrap();
    let envelope = next_envelope(&bob.connection).await;
    bob.connection.ack(&[envelope.id]).await.unwrap();
    assert_eq!(alice.connection.retract(&[secret]).await.unwrap(), 0);
    assert_eq!(
        relay.relay().store_stats().await.unwrap().retract_entries,
        0
    );
}

#[tokio::test]
async fn too_many_retractions_are_refused_locally() {
    let relay = TestRelay::start().await;
    let connection: Connection = relay.connect().await;
    let secrets = vec![[1u8; 32]; hush_client::protocol::limits::MAX_RETRACTS_PER_FRAME + 1];
    assert!(matches!(
        connection.retract(&secrets).await,
        Err(ConnectionError::TooLarge(_))
    ));
    assert_eq!(connection.retract(&secrets[..1]).await.unwrap(), 0);
}

#[tokio::test]
async fn an_anonymous_sender_looks_up_devices_and_prekeys_with_the_token_only() {
    let relay = TestRelay::start().await;
    let bob = relay.register().await;
    bob.connection
        .set_delivery_access(Some(TOKEN), false)
        .await
        .unwrap();
    let anonymous = relay.connect().await;
    let account = bob.address.account;

    assert_eq!(
        anonymous
            .list_devices_with(account, Some(TOKEN))
            .await
            .unwrap(),
        vec![DeviceId::PRIMARY]
    );
    let bundles = anonymous
        .fetch_prekeys_with(account, None, Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(bundles.devices.len(), 1);

    // Without the token, with a wrong one, or for an unknown account: the same refusal,
    // and the connection carries on.
    for (account, token) in [
        (account, None),
        (account, Some([1; 16])),
        (hush_client::protocol::AccountId([3; 16]), Some(TOKEN)),
    ] {
        refused(
            anonymous.list_devices_with(account, token).await,
            ErrorCode::DeliveryRefused,
        );
        refused(
            anonymous.fetch_prekeys_with(account, None, token).await,
            ErrorCode::DeliveryRefused,
        );
    }
    assert!(anonymous
        .list_devices_with(bob.address.account, Some(TOKEN))
        .await
        .is_ok());
}
