//! Typed access to the store's secret state, in the shape of libsignal's `SessionStore`
//! and `PreKeyStore`: the ratchet code asks for a session, not for a row. Writes return a
//! [`Change`] rather than committing, so that a session update joins the commit of the
//! message it decrypted (the store's one-commit rule).
//!
//! The row names are the client's: sessions by the device address's 20-byte form in
//! [`Table::Sessions`], the prekeys under [`PREKEYS_ROW`] in [`Table::State`].

use hush_protocol::DeviceAddress;

use super::{Change, LocalStore, StoreError, Table};
use crate::pickle;
use crate::prekeys::PrekeySet;
use crate::session::SessionSet;

/// The name of the prekeys' row in [`Table::State`].
pub(crate) const PREKEYS_ROW: &[u8] = b"prekeys";

/// The sessions with each peer device.
pub(crate) trait SessionStore {
    /// The sessions with `address`, if there are any.
    fn load_sessions(&self, address: &DeviceAddress) -> Result<Option<SessionSet>, StoreError>;

    /// The change that stores `sessions` as those with `address`.
    fn store_sessions(
        &self,
        address: &DeviceAddress,
        sessions: &SessionSet,
    ) -> Result<Change, StoreError>;

    /// The change that forgets the sessions with `address`.
    fn delete_sessions(&self, address: &DeviceAddress) -> Change;
}

/// This device's prekeys.
pub(crate) trait PrekeyStore {
    /// The prekeys, if any were stored.
    fn load_prekeys(&self) -> Result<Option<PrekeySet>, StoreError>;

    /// The change that stores `prekeys`.
    fn store_prekeys(&self, prekeys: &PrekeySet) -> Result<Change, StoreError>;
}

impl SessionStore for LocalStore {
    fn load_sessions(&self, address: &DeviceAddress) -> Result<Option<SessionSet>, StoreError> {
        self.get(Table::Sessions, &address.to_bytes())?
            .map(|bytes| pickle::unpickle_session_set(&bytes).map_err(StoreError::from))
            .transpose()
    }

    fn store_sessions(
        &self,
        address: &DeviceAddress,
        sessions: &SessionSet,
    ) -> Result<Change, StoreError> {
        let pickle = pickle::pickle_session_set(sessions)?;
        Ok(self.put(Table::Sessions, &address.to_bytes(), pickle))
    }

    fn delete_sessions(&self, address: &DeviceAddress) -> Change {
        self.delete(Table::Sessions, &address.to_bytes())
    }
}

impl PrekeyStore for LocalStore {
    fn load_prekeys(&self) -> Result<Option<PrekeySet>, StoreError> {
        self.get(Table::State, PREKEYS_ROW)?
            .map(|bytes| pickle::unpickle_prekeys(&bytes).map_err(StoreError::from))
            .transpose()
    }

    fn store_prekeys(&self, prekeys: &PrekeySet) -> Result<Change, StoreError> {
        let pickle = pickle::pickle_prekeys(prekeys)?;
        Ok(self.put(Table::State, PREKEYS_ROW, pickle))
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use zeroize::Zeroizing;

    use super::*;
    use crate::keys::IdentityKeyPair;
    use crate::pqxdh::PeerBundle;
    use crate::session::Session;
    use crate::store::StorageKey;

    fn bob_device() -> DeviceAddress {
        DeviceAddress {
            account: hush_protocol::AccountId([2; 16]),
            device: hush_protocol::DeviceId(1),
        }
    }

    #[test]
    fn sessions_and_prekeys_come_back_as_they_were_stored_and_go_when_deleted() {
        let mut rng = ChaCha20Rng::seed_from_u64(41);
        let alice = IdentityKeyPair::generate_with(&mut rng);
        let bob = IdentityKeyPair::generate_with(&mut rng);
        let mut prekeys = PrekeySet::default();
        let upload = prekeys.rotate(&bob, 0, &mut rng);
        let bundle = hush_protocol::DeviceBundle {
            device: hush_protocol::DeviceId(1),
            device_key: [0; 32],
            signed_prekey: upload.signed_prekey,
            one_time: None,
            kem: upload.kem_last_resort,
            kem_is_last_resort: true,
        };
        let peer = PeerBundle::verify(&bob.public().to_bytes(), &bundle).unwrap();
        let session = Session::initiate(&alice, &peer, &mut rng).unwrap();
        let sessions = SessionSet::new(session);

        let store = LocalStore::in_memory(&StorageKey::from_bytes([12; 32]));
        assert!(store.load_sessions(&bob_device()).unwrap().is_none());
        assert!(store.load_prekeys().unwrap().is_none());
        store
            .commit(vec![
                store.store_sessions(&bob_device(), &sessions).unwrap(),
                store.store_prekeys(&prekeys).unwrap(),
            ])
            .unwrap();
        let loaded = store.load_sessions(&bob_device()).unwrap().unwrap();
        assert_eq!(loaded.remote_identity(), sessions.remote_identity());
        assert_eq!(
            pickle::pickle_session_set(&loaded).unwrap(),
            pickle::pickle_session_set(&sessions).unwrap()
        );
        let loaded = store.load_prekeys().unwrap().unwrap();
        assert_eq!(
            pickle::pickle_prekeys(&loaded).unwrap(),
            pickle::pickle_prekeys(&prekeys).unwrap()
        );

        store
            .commit(vec![store.delete_sessions(&bob_device())])
            .unwrap();
        assert!(store.load_sessions(&bob_device()).unwrap().is_none());
    }

    #[test]
    fn a_damaged_session_row_is_a_typed_store_error() {
        let store = LocalStore::in_memory(&StorageKey::from_bytes([13; 32]));
        store
            .commit(vec![store.put(
                Table::Sessions,
                &bob_device().to_bytes(),
                Zeroizing::new(vec![0xee, 1, 2]),
            )])
            .unwrap();
        assert!(matches!(
            store.load_sessions(&bob_device()),
            Err(StoreError::Pickle(pickle::PickleError::UnknownVersion(
                0xee
            )))
        ));
    }
}
