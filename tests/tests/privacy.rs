//! P9 and P10, tested rather than asserted: after a run at the most verbose log level, the
//! data dir and the relay's log hold no account id, device key, identity key, invite
//! token, delivery token, retraction secret or tag, call token or call id, client address,
//! envelope or media byte in clear.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_client::protocol::sealed::{retract_tag, SealedEnvelope};
use hush_client::protocol::{CallOutcome, DeviceAddress};
use hush_client::{Connection, DeviceKey};
use hush_tests::{contains, next_envelope, read_tree, relay_binary, ChildRelay};

struct Secrets(Vec<(String, Vec<u8>)>);

impl Secrets {
    fn add(&mut self, what: &str, bytes: &[u8]) {
        self.0.push((format!("{what} (raw)"), bytes.to_vec()));
        self.0
            .push((format!("{what} (hex)"), hex::encode(bytes).into_bytes()));
    }

    fn add_address(&mut self, what: &str, address: &DeviceAddress) {
        self.add(&format!("{what} account id"), &address.account.0);
        self.add(&format!("{what} device address"), &address.to_bytes());
    }

    fn assert_absent(&self, place: &str, bytes: &[u8]) {
        for (what, needle) in &self.0 {
            assert!(!contains(bytes, needle), "{place} contains {what}");
        }
    }
}

#[tokio::test]
async fn data_dir_and_trace_logs_hold_no_identifiers_or_content() {
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("data");
    let log = work.path().join("relay.log");
    let child = ChildRelay::spawn(relay_binary!(), &data_dir, Some(&log), "trace");
    let mut secrets = Secrets(Vec::new());

    let alice_key = DeviceKey::generate();
    let bob_key = DeviceKey::generate();
    let alice_identity = b"alice identity key: 0123456789abcdef".to_vec();
    let bob_identity = b"bob identity key: fedcba9876543210".to_vec();
    let alice = Connection::connect(&child.options()).await.unwrap();
    let alice_address = alice
        .register(&alice_identity, &alice_key, None)
        .await
        .unwrap();
    let bob = Connection::connect(&child.options()).await.unwrap();
    let bob_address = bob.register(&bob_identity, &bob_key, None).await.unwrap();
    let bob2_key = DeviceKey::generate();
    let bob2_device = bob.add_device(bob2_key.public_key()).await.unwrap();
    let bob2_address = DeviceAddress {
        account: bob_address.account,
        device: bob2_device,
    };
    secrets.add_address("alice", &alice_address);
    secrets.add_address("bob", &bob_address);
    secrets.add_address("bob2", &bob2_address);
    for (name, key) in [
        ("alice", &alice_key),
        ("bob", &bob_key),
        ("bob2", &bob2_key),
    ] {
        secrets.add(&format!("{name} device key"), &key.public_key());
    }
    secrets.add("alice identity", &alice_identity);
    secrets.add("bob identity", &bob_identity);

    // Delivered-and-acked envelopes and still-queued ones (for the offline second device).
    for i in 0..20 {
        let payload = format!("PLAINTEXT-CANARY message number {i} from alice").into_bytes();
        secrets.add(&format!("payload {i}"), &payload);
        alice
            .send_to(&[bob_address, bob2_address], payload)
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(next_envelope(&bob).await.id);
    }
    bob.ack(&ids).await.unwrap();

    // Sealed sends from an anonymous connection, with a delivery token and retraction tags;
    // one of them retracted, one still queued for the offline second device.
    let token = *b"DELIVERY-TOKEN-1";
    secrets.add("delivery token", &token);
    bob.set_delivery_access(Some(token), false).await.unwrap();
    let (certificate, _) = alice.sender_certificate().await.unwrap();
    let anonymous = Connection::connect(&child.options()).await.unwrap();
    let devices = alice.list_devices(bob_address.account).await.unwrap();
    for i in 0..2u8 {
        let secret = [0xC0 + i; 32];
        secrets.add(&format!("retract secret {i}"), &secret);
        secrets.add(&format!("retract tag {i}"), &retract_tag(&secret));
        let mut payload = format!("SEALED-CANARY sealed message {i}, certificate: ").into_bytes();
        payload.extend_from_slice(&certificate.body);
        secrets.add(&format!("sealed payload {i}"), &payload);
        anonymous
            .sealed_send(vec![SealedEnvelope {
                account: bob_address.account,
                devices: devices.clone(),
                access: Some(token),
                retract_tag: Some(retract_tag(&secret)),
                payload,
            }])
            .await
            .unwrap();
    }
    assert_eq!(anonymous.retract(&[[0xC0; 32]]).await.unwrap(), 2);
    drop(anonymous);

    // A call with media both ways: the token, the call id and the media bytes must not
    // surface, nor the accounts in the call-detail record.
    let (allocation, token, call_id) = alice.allocate_call(bob_address.account).await.unwrap();
    secrets.add("call token", &token.0);
    secrets.add("call id", &call_id);
    bob.join_call(allocation, token).await.unwrap();
    let media = b"MEDIA-CANARY encrypted audio frame".to_vec();
    secrets.add("media frame", &media);
    for _ in 0..5 {
        alice.send_media(allocation, &media).unwrap();
        bob.send_media(allocation, &media).unwrap();
    }
    let heard = tokio::time::timeout(hush_tests::WAIT, bob.next_media())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(heard, (allocation, media.clone()));
    alice
        .end_call(allocation, CallOutcome::Answered)
        .await
        .unwrap();
    drop(alice);
    drop(bob);

    // Graceful stop, so that everything the relay would write is written.
    let status = tokio::task::spawn_blocking(move || child.terminate())
        .await
        .unwrap();
    assert!(status.success());

    let files = read_tree(&data_dir);
    assert!(files.iter().any(|(p, _)| p.ends_with("relay.redb")));
    for (path, bytes) in &files {
        secrets.assert_absent(&path.display().to_string(), bytes);
    }
    let log_bytes = std::fs::read(&log).unwrap();
    assert!(
        log_bytes.len() > 10_000,
        "trace logging was on ({} bytes)",
        log_bytes.len()
    );
    secrets.assert_absent("the relay log", &log_bytes);
    // Nor the sender-certificate signing key, which lives in its own file.
    let key_file = std::fs::read(data_dir.join("sender-certificate-key")).unwrap();
    let signing_key = &key_file[1..];
    assert_eq!(signing_key.len(), 32);
    assert!(!contains(&log_bytes, signing_key));
    assert!(!contains(&log_bytes, hex::encode(signing_key).as_bytes()));
    // No client address: every address in the log was redacted.
    assert!(
        !contains(&log_bytes, b"127.0.0.1"),
        "the relay log contains a loopback address"
    );
}
