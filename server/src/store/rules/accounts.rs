//! Accounts, devices and who may reach them: registration (invites), adding a device (the
//! device limit), removing one (never the primary), delivery access.

use hush_protocol::{AccountId, DeviceAddress, DeviceId};

use super::{decide, Rules};
use crate::store::backend::Transaction;
use crate::store::records::{AccountRecord, DeliveryAccess, DeviceRecord};
use crate::store::{Outcome, Refusal, StoreError, WriteResult};

impl Rules {
    pub(super) fn register<T: Transaction>(
        &self,
        t: &mut T,
        account: AccountId,
        identity_key: Vec<u8>,
        device_key: [u8; 32],
        invite: Option<&[u8]>,
        require_invite: bool,
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.account_tag(&account);
        if t.account_exists(&tag)? {
            return Ok(Err(Refusal::NotPermitted));
        }
        match decide::invite_to_consume(invite, require_invite) {
            Err(refusal) => return Ok(Err(refusal)),
            Ok(Some(hash)) => {
                if !t.take_invite(&hash)? {
                    return Ok(Err(Refusal::InvalidInvite));
                }
            }
            Ok(None) => {}
        }
        let record = AccountRecord::new(identity_key, device_key);
        self.put_account(t, &account, &tag, &record)?;
        Ok(Ok(Outcome::Registered))
    }

    /// Checked against the record read in this transaction, so the limit holds however
    /// many additions one batch carries.
    pub(super) fn add_device<T: Transaction>(
        &self,
        t: &mut T,
        account: AccountId,
        device_key: [u8; 32],
        max_devices: u32,
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.account_tag(&account);
        let Some(mut record) = self.load_account(t, &tag)? else {
            return Ok(Err(Refusal::UnknownAccount));
        };
        if let Err(refusal) = decide::device_may_join(&record, &device_key, max_devices) {
            return Ok(Err(refusal));
        }
        let id = record.next_device;
        record.next_device += 1;
        record.devices.push(DeviceRecord {
            id,
            key: device_key,
        });
        self.put_account(t, &account, &tag, &record)?;
        Ok(Ok(Outcome::DeviceAdded(DeviceId(id))))
    }

    /// Removes the device with its prekeys and mailbox.
    pub(super) fn remove_device<T: Transaction>(
        &self,
        t: &mut T,
        address: DeviceAddress,
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.account_tag(&address.account);
        let Some(mut record) = self.load_account(t, &tag)? else {
            return Ok(Err(Refusal::UnknownAccount));
        };
        if let Err(refusal) = decide::device_removable(&record, address.device) {
            return Ok(Err(refusal));
        }
        record.devices.retain(|d| d.id != address.device.0);
        self.put_account(t, &address.account, &tag, &record)?;
        let device_tag = self.at_rest.device_tag(&address);
        t.remove_prekeys(device_tag)?;
        for sequence in t.mailbox_sequences(device_tag)? {
            t.remove_envelope(device_tag, sequence)?;
        }
        Ok(Ok(Outcome::DeviceRemoved { address }))
    }

    pub(super) fn set_delivery_access<T: Transaction>(
        &self,
        t: &mut T,
        account: AccountId,
        token_hash: Option<[u8; 32]>,
        allow_unknown_senders: bool,
    ) -> Result<WriteResult, StoreError> {
        let tag = self.at_rest.account_tag(&account);
        if !t.account_exists(&tag)? {
            return Ok(Err(Refusal::UnknownAccount));
        }
        let access = DeliveryAccess {
            token_hash,
            allow_unknown_senders,
        };
        t.put_delivery_access(&tag, &self.at_rest.seal_delivery_access(&tag, &access)?)?;
        Ok(Ok(Outcome::DeliveryAccessSet))
    }
}
