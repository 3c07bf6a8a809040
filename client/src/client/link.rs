//! Linking a new device to an account: the new device's side ([`LinkRequest`]) and the
//! existing device's ([`Client::link_device`]). The crypto of the bundle is
//! [`crate::link`]'s.

use rand_core::OsRng;

use super::state::{encode, AccountRecord, Contact, ACCOUNT_KEY, SETTINGS_KEY};
use super::{Client, ClientConfig, ClientError, Settings};
use crate::connection::{Connection, Event};
use crate::error::ConnectionError;
use crate::keys::{DeviceKey, EcKeyPair};
use crate::link::{self, LinkCode, LinkedContact, ProvisionBundle};
use crate::store::{LocalStore, Table};
use hush_protocol::DeviceId;

impl Client {
    /// Links a new device from the code it shows: adds its key to the account and sends it
    /// the account's keys, profile key and contacts through its provisioning mailbox.
    pub async fn link_device(&self, code: &str) -> Result<DeviceId, ClientError> {
        let inner = self.inner();
        let code = LinkCode::decode(code).ok_or(ClientError::InvalidCode("link code"))?;
        let device = inner.connection.add_device(code.device_key).await?;
        let payload = {
            let state = inner.lock();
            let bundle = ProvisionBundle {
                identity: state.identity.to_secret_bytes().to_vec(),
                account: state.address.account.0,
                device: device.0,
                profile_key: *state.profile_key,
                contacts: state
                    .contacts
                    .values()
                    .map(|c| LinkedContact {
                        account: c.account,
                        identity: c.identity.clone(),
                        profile_key: c.profile_key,
                    })
                    .collect(),
            };
            link::seal_bundle(&bundle, &code.ephemeral, &mut OsRng)?
        };
        inner.connection.provision(code.mailbox, payload).await?;
        inner
            .lock()
            .own_devices
            .get_or_insert_with(Vec::new)
            .push(device);
        Ok(device)
    }
}

/// A device waiting to be linked to an account: show [`LinkRequest::code`] to a device of
/// the account (as a QR code), then [`LinkRequest::finish`].
pub struct LinkRequest {
    connection: Connection,
    mailbox: [u8; 16],
    ephemeral: EcKeyPair,
    device_key: DeviceKey,
    config: ClientConfig,
}

impl LinkRequest {
    /// Opens a provisioning mailbox on the relay.
    pub async fn start(config: ClientConfig) -> Result<LinkRequest, ClientError> {
        let connection = Connection::connect(&config.relay).await?;
        let mailbox = connection.open_provisioning().await?;
        Ok(LinkRequest {
            connection,
            mailbox,
            ephemeral: EcKeyPair::generate(&mut OsRng),
            device_key: DeviceKey::generate(),
            config,
        })
    }

    /// The code to show.
    pub fn code(&self) -> String {
        LinkCode {
            mailbox: self.mailbox,
            ephemeral: *self.ephemeral.public(),
            device_key: self.device_key.public_key(),
        }
        .encode()
    }

    /// Waits for the account's keys, stores them, and opens the client as the new device.
    pub async fn finish(self) -> Result<Client, ClientError> {
        let payload = loop {
            match self.connection.next_event().await {
                Some(Event::Provisioning(payload)) => break payload,
                Some(Event::Closed(code)) => return Err(ConnectionError::Closed(code).into()),
                None => return Err(ConnectionError::Closed(None).into()),
                Some(_) => {}
            }
        };
        self.connection.close();
        let bundle = link::open_bundle(&self.ephemeral, &payload)?;
        let store = LocalStore::open(&self.config.data_dir, &self.config.storage_key)?;
        let record = AccountRecord {
            identity: bundle.identity.clone(),
            device_key: *self.device_key.to_secret_bytes(),
            account: bundle.account,
            device: bundle.device,
            profile_key: bundle.profile_key,
        };
        let mut changes = vec![
            store.put(Table::State, ACCOUNT_KEY, encode(&record)?),
            store.put(Table::State, SETTINGS_KEY, encode(&Settings::default())?),
        ];
        for linked in &bundle.contacts {
            let contact = Contact {
                account: linked.account,
                identity: linked.identity.clone(),
                profile_key: linked.profile_key,
                devices: Vec::new(),
                expires_in: None,
            };
            changes.push(store.put(Table::Contacts, &linked.account, encode(&contact)?));
        }
        store.commit(changes)?;
        drop(store);
        Client::open(self.config).await
    }
}
