//! The prekey directory: one-time keys handed out once, last resort, low-prekey signal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::protocol::{AccountId, DeviceId, ErrorCode, UploadPrekeys};
use hush_client::{ConnectionError, Event};
use hush_tests::{add_device, prekey, TestRelay, WAIT};

async fn low_prekeys(connection: &hush_client::Connection) -> (u32, u32) {
    tokio::time::timeout(WAIT, async {
        loop {
            match connection.next_event().await {
                Some(Event::LowPrekeys {
                    one_time,
                    kem_one_time,
                }) => return (one_time, kem_one_time),
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn one_time_prekeys_are_handed_out_once_then_the_last_resort_kem_key() {
    let relay = TestRelay::start_with(|c| c.low_prekey_threshold = 2).await;
    let bob = relay.register().await;
    assert_eq!(
        low_prekeys(&bob.connection).await,
        (0, 0),
        "a new device is told to upload"
    );
    let counts = bob
        .connection
        .upload_prekeys(UploadPrekeys {
            signed_prekey: Some(prekey(100, 32)),
            one_time: vec![prekey(1, 32), prekey(2, 32), prekey(3, 32)],
            kem_one_time: vec![prekey(11, 1184), prekey(12, 1184)],
            kem_last_resort: Some(prekey(99, 1184)),
        })
        .await
        .unwrap();
    assert_eq!(counts, (3, 2));

    let alice = relay.register().await;
    let mut one_time = Vec::new();
    let mut kem = Vec::new();
    for _ in 0..4 {
        let bundles = alice
            .connection
            .fetch_prekeys(bob.address.account, None)
            .await
            .unwrap();
        assert_eq!(bundles.identity_key, b"identity-key");
        let bundle = &bundles.devices[0];
        assert_eq!(bundle.device, DeviceId::PRIMARY);
        assert_eq!(bundle.device_key, bob.key.public_key());
        assert_eq!(bundle.signed_prekey.as_ref().unwrap().id, 100);
        one_time.push(bundle.one_time.as_ref().map(|k| k.id));
        kem.push(
            bundle
                .kem
                .as_ref()
                .map(|k| (k.id, bundle.kem_is_last_resort)),
        );
    }
    assert_eq!(
        one_time,
        vec![Some(1), Some(2), Some(3), None],
        "each one-time key once"
    );
    assert_eq!(
        kem,
        vec![
            Some((11, false)),
            Some((12, false)),
            Some((99, true)),
            Some((99, true))
        ]
    );
    // Bob was told, while connected, that he is running low.
    let (one_time_left, kem_left) = low_prekeys(&bob.connection).await;
    assert!(
        one_time_left < 2 || kem_left < 2,
        "({one_time_left}, {kem_left})"
    );
}

#[tokio::test]
async fn bundles_cover_every_device_of_an_account() {
    let relay = TestRelay::start().await;
    let bob = relay.register().await;
    let bob2 = add_device(&relay, &bob).await;
    let alice = relay.register().await;
    let bundles = alice
        .connection
        .fetch_prekeys(bob.address.account, None)
        .await
        .unwrap();
    let devices: Vec<DeviceId> = bundles.devices.iter().map(|b| b.device).collect();
    assert_eq!(devices, vec![bob.address.device, bob2.address.device]);
    let one = alice
        .connection
        .fetch_prekeys(bob.address.account, Some(bob2.address.device))
        .await
        .unwrap();
    assert_eq!(one.devices.len(), 1);
}

#[tokio::test]
async fn fetching_prekeys_of_an_unknown_account_or_device_is_a_typed_refusal() {
    let relay = TestRelay::start().await;
    let alice = relay.register().await;
    let unknown = alice
        .connection
        .fetch_prekeys(AccountId([0x42; 16]), None)
        .await;
    assert!(
        matches!(
            unknown,
            Err(ConnectionError::Refused(ErrorCode::UnknownAccount))
        ),
        "{unknown:?}"
    );
    let no_device = alice
        .connection
        .fetch_prekeys(alice.address.account, Some(DeviceId(7)))
        .await;
    assert!(matches!(
        no_device,
        Err(ConnectionError::Refused(ErrorCode::UnknownDevice))
    ));
    // The connection carries on.
    alice
        .connection
        .fetch_prekeys(alice.address.account, None)
        .await
        .unwrap();
}
