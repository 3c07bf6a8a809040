//! Two terminals chatting through a local relay, end-to-end encrypted.
//!
//! ```sh
//! cargo run --release -p hush-server -- serve            # prints the fingerprint
//! cargo run -p hush-client --example chat -- --fingerprint HEX --dir alice
//! cargo run -p hush-client --example chat -- --fingerprint HEX --dir bob
//! ```
//!
//! Each prints its contact card; paste one into the other as `/add CARD`, then type.
//! `/safety` shows the safety number, `/quit` leaves. The data dir holds the encrypted
//! local store and, because this is an example, its storage key (a real app keeps that in
//! the platform keystore).
#![allow(clippy::print_stdout)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;

use hush_client::protocol::AccountId;
use hush_client::{
    Body, Client, ClientConfig, ClientError, ClientEvent, ConnectOptions, StorageKey, Trust,
};

struct Args {
    relay: SocketAddr,
    fingerprint: [u8; 32],
    dir: PathBuf,
}

fn usage() -> ! {
    eprintln!("usage: chat [--relay ADDR] --fingerprint HEX --dir DIR");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut relay: SocketAddr = ([127, 0, 0, 1], 4433).into();
    let mut fingerprint = None;
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--relay" => relay = value.parse().unwrap_or_else(|_| usage()),
            "--fingerprint" => {
                let bytes = (0..value.len())
                    .step_by(2)
                    .map(|i| {
                        value
                            .get(i..i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>();
                fingerprint = bytes.and_then(|b| <[u8; 32]>::try_from(b).ok());
            }
            "--dir" => dir = Some(PathBuf::from(value)),
            _ => usage(),
        }
    }
    Args {
        relay,
        fingerprint: fingerprint.unwrap_or_else(|| usage()),
        dir: dir.unwrap_or_else(|| usage()),
    }
}

/// The example keeps its storage key beside the store; see the module docs.
fn storage_key(dir: &std::path::Path) -> std::io::Result<StorageKey> {
    let path = dir.join("example-storage.key");
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(key) = <[u8; 32]>::try_from(bytes) {
            return Ok(StorageKey::from_bytes(key));
        }
    }
    std::fs::create_dir_all(dir)?;
    let mut key = [0u8; 32];
    getrandom(&mut key);
    std::fs::write(&path, key)?;
    Ok(StorageKey::from_bytes(key))
}

fn getrandom(out: &mut [u8]) {
    use rand_core::RngCore;
    rand_core::OsRng.fill_bytes(out);
}

fn show(event: &ClientEvent, peer: Option<AccountId>) {
    let who = |account: &AccountId| {
        if Some(*account) == peer {
            "them".to_owned()
        } else {
            format!("{}…", &account.to_hex()[..8])
        }
    };
    match event {
        ClientEvent::Message { from, message, .. } => match &message.body {
            Body::Text { text } => println!("<{}> {text}", who(from)),
            other => println!("<{}> {other:?}", who(from)),
        },
        ClientEvent::SentElsewhere { message } => {
            if let Body::Text { text } = &message.body {
                println!("<me, elsewhere> {text}");
            }
        }
        ClientEvent::Receipt { kind, ids, .. } => println!("  ({kind:?} x{})", ids.len()),
        ClientEvent::Typing { from, started } => {
            println!(
                "  ({} {} typing)",
                who(from),
                if *started { "is" } else { "stopped" }
            );
        }
        ClientEvent::IdentityChanged { account } => {
            println!(
                "!! the identity key of {} changed: check /safety",
                who(account)
            );
        }
        ClientEvent::Undecryptable { error } => println!("!! dropped an envelope: {error}"),
        ClientEvent::Disconnected(code) => println!("!! disconnected ({code:?})"),
        other => println!("  {other:?}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    let config = || -> std::io::Result<ClientConfig> {
        Ok(ClientConfig::new(
            ConnectOptions::new(args.relay, Trust::Pinned(args.fingerprint)),
            args.dir.clone(),
            storage_key(&args.dir)?,
        ))
    };
    let client = match Client::open(config()?).await {
        Ok(client) => client,
        Err(ClientError::NoAccount) => Client::create(config()?, None).await?,
        Err(error) => return Err(error.into()),
    };
    println!("your contact card: {}", client.contact_card().await);
    println!("commands: /add CARD, /safety, /quit; anything else is sent");

    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if lines_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });

    let mut peer: Option<AccountId> = None;
    loop {
        tokio::select! {
            event = client.next_event() => {
                let Some(event) = event else { break };
                if let ClientEvent::Message { from, .. } = &event {
                    peer.get_or_insert(*from);
                }
                show(&event, peer);
            }
            line = lines.recv() => {
                let Some(line) = line else { break };
                let line = line.trim();
                if let Some(card) = line.strip_prefix("/add ") {
                    match client.add_contact(card.trim()).await {
                        Ok(account) => {
                            peer = Some(account);
                            println!("  talking to {}…", &account.to_hex()[..8]);
                        }
                        Err(error) => println!("!! {error}"),
                    }
                } else if line == "/safety" {
                    match peer {
                        Some(account) => match client.safety_number(account).await {
                            Ok(number) => println!("  safety number: {}", number.displayable()),
                            Err(error) => println!("!! {error}"),
                        },
                        None => println!("!! no peer yet"),
                    }
                } else if line == "/quit" {
                    break;
                } else if !line.is_empty() {
                    match peer {
                        Some(account) => {
                            if let Err(error) = client.send_text(account, line).await {
                                println!("!! not sent: {error}");
                            }
                        }
                        None => println!("!! add a contact first: /add CARD"),
                    }
                }
            }
        }
    }
    client.close();
    Ok(())
}
