//! The seed corpora: real encodings of every frame kind, sealed envelopes, ratchet
//! messages, media frames and configs, written by `cargo run --example write_seeds` into
//! `seeds/<target>/` and checked in.

use std::io;
use std::path::Path;

use hush_client::message::CiphertextMessage;
use hush_client::test_support::{pairwise_sessions, text_content};
use hush_protocol::media_udp::{HopKey, MediaLeg};
use hush_protocol::sealed::SealedEnvelope;
use hush_protocol::{
    encode_frame, AccountId, Ack, AddDevice, AllocateCall, Authenticate, CallEndCause, CallEnded,
    CallOutcome, CallToken, ClientFrame, Deliver, DeviceAddress, DeviceBundle, DeviceId, EndCall,
    EnvelopeId, ErrorCode, Fatal, FetchPrekeys, Hello, HelloOk, JoinCall, ListDevices, LowPrekeys,
    OutgoingEnvelope, Prekey, PrekeyBundles, Provision, ProvisioningMessage, RateLimited, Register,
    RemoveDevice, Request, RequestBody, RequestId, Response, ResponseBody, Retract, SealedSend,
    Send, ServerFrame, SetDeliveryAccess, Signature, UploadPrekeys, HEADER_LEN, SUPPORTED_VERSIONS,
};

use crate::{
    genuine_media_frame, genuine_media_packet, genuine_sealed_content, genuine_sealed_envelope,
    keys, rng_from, ALLOCATION,
};

fn address(n: u8) -> DeviceAddress {
    DeviceAddress {
        account: AccountId([n; 16]),
        device: DeviceId(u32::from(n)),
    }
}

fn prekey(id: u32, len: usize) -> Prekey {
    Prekey {
        id,
        public_key: vec![0x05; len],
        signature: vec![0x5e; 64],
    }
}

fn sealed_envelope() -> SealedEnvelope {
    SealedEnvelope {
        account: AccountId([4; 16]),
        devices: vec![DeviceId(1), DeviceId(2)],
        access: Some([6; 16]),
        retract_tag: Some([7; 32]),
        payload: b"sealed payload".to_vec(),
    }
}

/// One client frame of every kind.
pub fn client_frames() -> Vec<ClientFrame> {
    let bodies = vec![
        RequestBody::Register(Register {
            identity_key: vec![1; 65],
            device_key: [2; 32],
            invite: Some(b"invite".to_vec()),
            signature: Signature([3; 64]),
        }),
        RequestBody::Authenticate(Authenticate {
            address: address(1),
            signature: Signature([4; 64]),
        }),
        RequestBody::AddDevice(AddDevice {
            device_key: [5; 32],
        }),
        RequestBody::RemoveDevice(RemoveDevice {
            device: DeviceId(2),
        }),
        RequestBody::UploadPrekeys(UploadPrekeys {
            signed_prekey: Some(prekey(1, 33)),
            one_time: vec![prekey(2, 33), prekey(3, 33)],
            kem_one_time: vec![prekey(4, 40)],
            kem_last_resort: Some(prekey(5, 40)),
        }),
        RequestBody::FetchPrekeys(FetchPrekeys {
            account: AccountId([6; 16]),
            device: Some(DeviceId(1)),
            access: Some([7; 16]),
        }),
        RequestBody::Send(Send {
            envelopes: vec![OutgoingEnvelope {
                recipients: vec![address(1), address(2)],
                payload: b"ciphertext".to_vec(),
                retract_tag: Some([8; 32]),
            }],
        }),
        RequestBody::Ack(Ack {
            ids: vec![EnvelopeId(1), EnvelopeId(300)],
        }),
        RequestBody::GetSenderCertificate,
        RequestBody::SetDeliveryAccess(SetDeliveryAccess {
            token: Some([9; 16]),
            allow_unknown_senders: true,
        }),
        RequestBody::SealedSend(SealedSend {
            envelopes: vec![sealed_envelope()],
        }),
        RequestBody::ListDevices(ListDevices {
            account: AccountId([10; 16]),
            access: None,
        }),
        RequestBody::Retract(Retract {
            secrets: vec![[11; 32]],
        }),
        RequestBody::OpenProvisioning,
        RequestBody::Provision(Provision {
            address: [12; 16],
            payload: b"provisioning".to_vec(),
        }),
        RequestBody::AllocateCall(AllocateCall {
            callee: AccountId([13; 16]),
        }),
        RequestBody::JoinCall(JoinCall {
            allocation: 14,
            token: CallToken([15; 16]),
        }),
        RequestBody::EndCall(EndCall {
            allocation: 16,
            outcome: CallOutcome::Rejected,
        }),
    ];
    let mut frames = vec![ClientFrame::Hello(Hello::current())];
    frames.extend(bodies.into_iter().zip(1u32..).map(|(body, id)| {
        ClientFrame::Request(Request {
            id: RequestId(id),
            body,
        })
    }));
    frames
}

/// One server frame of every kind, with several response bodies.
pub fn server_frames() -> Vec<ServerFrame> {
    let response = |id, result| {
        ServerFrame::Response(Response {
            id: RequestId(id),
            result,
        })
    };
    vec![
        ServerFrame::HelloOk(HelloOk {
            version: 1,
            challenge: [1; 32],
        }),
        response(
            1,
            Ok(ResponseBody::Registered {
                address: address(2),
            }),
        ),
        response(
            2,
            Ok(ResponseBody::PrekeyBundles(PrekeyBundles {
                identity_key: vec![3; 65],
                devices: vec![DeviceBundle {
                    device: DeviceId(1),
                    device_key: [4; 32],
                    signed_prekey: Some(prekey(1, 33)),
                    one_time: Some(prekey(2, 33)),
                    kem: Some(prekey(3, 40)),
                    kem_is_last_resort: false,
                }],
            })),
        ),
        response(
            3,
            Ok(ResponseBody::SenderCertificate {
                certificate: keys().alice_certificate(2_000),
                relay_key: keys().relay_key(),
            }),
        ),
        response(
            4,
            Ok(ResponseBody::Devices {
                devices: vec![DeviceId(1), DeviceId(2)],
            }),
        ),
        response(
            5,
            Ok(ResponseBody::CallAllocated {
                allocation: 5,
                token: CallToken([6; 16]),
                call_id: [7; 16],
                media: Some(MediaLeg {
                    port: 4434,
                    leg: 8,
                    up: HopKey::from_bytes([9; 32]),
                    down: HopKey::from_bytes([10; 32]),
                }),
            }),
        ),
        response(7, Ok(ResponseBody::CallJoined { media: None })),
        response(6, Err(ErrorCode::DeviceListChanged)),
        ServerFrame::Deliver(Deliver {
            id: EnvelopeId(8),
            received_at: 1_700_000_000,
            payload: b"envelope".to_vec(),
        }),
        ServerFrame::Drained,
        ServerFrame::LowPrekeys(LowPrekeys {
            one_time: 3,
            kem_one_time: 4,
        }),
        ServerFrame::Fatal(Fatal {
            code: ErrorCode::UnsupportedVersion,
            supported_versions: SUPPORTED_VERSIONS,
        }),
        ServerFrame::ProvisioningMessage(ProvisioningMessage {
            payload: b"bundle".to_vec(),
        }),
        ServerFrame::CallEnded(CallEnded {
            allocation: 9,
            cause: CallEndCause::RingTimeout,
        }),
        ServerFrame::RateLimited(RateLimited {
            id: RequestId(11),
            retry_after_ms: 1_500,
        }),
    ]
}

/// `kind || body` of a whole frame.
fn kind_and_body(frame: &[u8]) -> Vec<u8> {
    frame[HEADER_LEN - 1..].to_vec()
}

/// Every corpus, as (target, file name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let client: Vec<Vec<u8>> = client_frames().iter().map(encode_frame).collect();
    let server: Vec<Vec<u8>> = server_frames().iter().map(encode_frame).collect();
    for (i, frame) in client.iter().enumerate() {
        seeds.push(("frame_body", format!("client-{i:02}"), kind_and_body(frame)));
    }
    for (i, frame) in server.iter().enumerate() {
        seeds.push(("frame_body", format!("server-{i:02}"), kind_and_body(frame)));
    }
    for (name, frames, chunk) in [
        ("client-stream", &client, 7u8),
        ("server-stream", &server, 13),
    ] {
        let mut stream = vec![chunk];
        stream.extend(frames.iter().flatten());
        seeds.push(("frame_decoder", name.to_owned(), stream));
    }

    let mode = |m: u8, bytes: &[u8]| [&[m], bytes].concat();
    let envelope = postcard::to_allocvec(&sealed_envelope()).unwrap_or_default();
    let certificate = keys().alice_certificate(2_000);
    seeds.push(("sealed_envelope", "envelope".into(), mode(0, &envelope)));
    let encoded_certificate = postcard::to_allocvec(&certificate).unwrap_or_default();
    seeds.push((
        "sealed_envelope",
        "certificate".into(),
        mode(1, &encoded_certificate),
    ));
    seeds.push(("sealed_envelope", "body".into(), mode(2, &certificate.body)));

    seeds.push((
        "sealed_open",
        "outer".into(),
        mode(0, genuine_sealed_envelope()),
    ));
    seeds.push((
        "sealed_open",
        "inner".into(),
        mode(1, &genuine_sealed_content()),
    ));
    seeds.push((
        "sealed_open",
        "content".into(),
        mode(2, &text_content("hello")),
    ));

    let mut rng = rng_from(b"seeds");
    if let Ok(mut parties) = pairwise_sessions(2, &mut rng) {
        if let Some(alice) = parties[0].sessions[1].as_mut() {
            if let Ok(first) = alice.encrypt(b"prekey message") {
                seeds.push(("ratchet_message", "prekey".into(), first.to_bytes()));
                if let CiphertextMessage::Prekey(prekey) = first {
                    let ratchet = CiphertextMessage::Ratchet(prekey.message);
                    seeds.push(("ratchet_message", "ratchet".into(), ratchet.to_bytes()));
                }
            }
        }
    }

    let frame = genuine_media_frame();
    let datagram = hush_protocol::media::encode_media(ALLOCATION, &frame).unwrap_or_default();
    seeds.push(("media_frame", "datagram".into(), mode(0, &datagram)));
    seeds.push(("media_frame", "sealed".into(), mode(1, &frame)));
    let packet = genuine_media_packet();
    seeds.push(("media_packet", "header".into(), mode(0, &packet)));
    seeds.push(("media_packet", "sealed".into(), mode(1, &packet)));
    // Seal three, deliver out of order, replay, tamper.
    seeds.push((
        "media_packet",
        "script".into(),
        vec![2, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 1, 2, 1, 0, 2, 1, 9],
    ));
    // Seal three, deliver them out of order, replay, tamper, rotate, seal, deliver.
    seeds.push((
        "media_frame",
        "script".into(),
        vec![
            2, 0, 0, 0, 0, 0, 0, 1, 2, 1, 0, 1, 2, 2, 1, 9, 3, 0, 0, 0, 1, 3,
        ],
    ));

    seeds.push(("relay_config", "empty".into(), Vec::new()));
    seeds.push((
        "relay_config",
        "full".into(),
        SAMPLE_CONFIG.as_bytes().to_vec(),
    ));

    // Input for `interaction` is `arbitrary`-decoded: any bytes make a script.
    seeds.push(("interaction", "ping-pong".into(), (0u8..=255).collect()));
    seeds
}

/// A config with every setting, as the README documents it.
const SAMPLE_CONFIG: &str = r#"listen = "127.0.0.1:4433"
data_dir = "./hush-data"
registration = "invite"
max_devices_per_account = 5
message_expiry_days = 14
low_prekey_threshold = 20
sweep_interval_secs = 60
sender_certificate_hours = 24
cdr_retention_days = 90
call_media_idle_secs = 30
call_ring_timeout_secs = 90

[tls]
cert = "cert.pem"
key = "key.pem"

[limits]
max_connections = 10000
idle_timeout_secs = 60
max_in_flight_requests = 256
connection_receive_window = 2097152
stream_receive_window = 1048576
require_address_validation = false
max_open_provisioning = 10000
delivery_window = 256
max_call_allocations = 10000
max_calls_per_account = 4
datagram_receive_buffer = 262144
datagram_send_buffer = 262144
"#;

/// Writes every corpus under `dir`.
pub fn write_all(dir: &Path) -> io::Result<usize> {
    let seeds = all();
    for (target, name, bytes) in &seeds {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        std::fs::write(target_dir.join(name), bytes)?;
    }
    Ok(seeds.len())
}
