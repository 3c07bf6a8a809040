//! Registration policy, the `invite` command, and certificate trust.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::sync::Arc;

use hush_client::protocol::ErrorCode;
use hush_client::{ConnectOptions, Connection, ConnectionError, DeviceKey, Trust};
use hush_server::config::TlsFiles;
use hush_tests::{relay_binary, TestRelay};

#[tokio::test]
async fn invite_only_relays_take_each_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(relay_binary!())
        .args(["invite", "--count", "2", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let tokens: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), 2);

    // A relay on the data dir the tokens were written to.
    let mut config = hush_tests::test_config(dir.path());
    config.registration = hush_server::config::RegistrationPolicy::Invite;
    let relay = hush_server::Relay::start(config, Arc::new(hush_server::clock::SystemClock))
        .await
        .unwrap();
    let options = ConnectOptions::new(relay.local_addr(), Trust::Pinned(relay.fingerprint()));

    let connection = Connection::connect(&options).await.unwrap();
    let none = connection
        .register(b"id", &DeviceKey::generate(), None)
        .await;
    assert!(
        matches!(
            none,
            Err(ConnectionError::Refused(ErrorCode::InviteRequired))
        ),
        "{none:?}"
    );
    let wrong = connection
        .register(b"id", &DeviceKey::generate(), Some(b"not-a-token"))
        .await;
    assert!(
        matches!(
            wrong,
            Err(ConnectionError::Refused(ErrorCode::InvalidInvite))
        ),
        "{wrong:?}"
    );
    connection
        .register(b"id", &DeviceKey::generate(), Some(tokens[0].as_bytes()))
        .await
        .unwrap();

    let again = Connection::connect(&options).await.unwrap();
    let reused = again
        .register(b"id", &DeviceKey::generate(), Some(tokens[0].as_bytes()))
        .await;
    assert!(
        matches!(
            reused,
            Err(ConnectionError::Refused(ErrorCode::InvalidInvite))
        ),
        "{reused:?}"
    );
    again
        .register(b"id", &DeviceKey::generate(), Some(tokens[1].as_bytes()))
        .await
        .unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn a_wrong_pin_is_refused_by_the_client() {
    let relay = TestRelay::start().await;
    let options = ConnectOptions::new(relay.relay().local_addr(), Trust::Pinned([0xAB; 32]));
    let result = Connection::connect(&options).await;
    assert!(
        matches!(result, Err(ConnectionError::Connection(_))),
        "{:?}",
        result.err()
    );
}

#[tokio::test]
async fn an_operator_certificate_is_verified_through_webpki() {
    let certs = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["relay.test".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let cert_path = certs.path().join("cert.pem");
    let key_path = certs.path().join("key.pem");
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();

    let tls = TlsFiles {
        cert: cert_path,
        key: key_path,
    };
    let relay = TestRelay::start_with(|c| c.tls = Some(tls)).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let roots = Arc::new(roots);
    let options = ConnectOptions {
        address: relay.relay().local_addr(),
        server_name: "relay.test".to_owned(),
        trust: Trust::WebPki(roots.clone()),
        udp_media: true,
    };
    let connection = Connection::connect(&options).await.unwrap();
    connection
        .register(b"id", &DeviceKey::generate(), None)
        .await
        .unwrap();

    let wrong_name = ConnectOptions {
        server_name: "other.test".to_owned(),
        ..options
    };
    assert!(Connection::connect(&wrong_name).await.is_err());
}
