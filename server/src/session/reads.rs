//! Requests answered from a store read: the device key an authentication names, an
//! account's devices, a sender certificate, an anonymous caller's admission. Reads go to
//! the blocking pool.

use hush_protocol::sealed::SenderCertificateBody;
use hush_protocol::{AccountId, DeviceAddress, ErrorCode, RequestId, ResponseBody};

use super::decision::{Admitted, Read};
use super::driver::Session;
use super::End;
use crate::metrics::Metrics;
use crate::store::AccountView;

impl Session {
    /// Reads what `read` needs, then answers (or goes on, or ends the connection).
    pub(super) async fn read(&mut self, id: RequestId, read: Read) -> Result<(), End> {
        match read {
            Read::DeviceKey(auth) => {
                let store = self.context.store.clone();
                let address = auth.address;
                let key = tokio::task::spawn_blocking(move || store.device_key(&address)).await;
                let key = match key {
                    Ok(Ok(key)) => key,
                    Ok(Err(error)) => {
                        tracing::error!(%error, "reading a device key failed");
                        self.respond(id, Err(ErrorCode::StorageFailure)).await;
                        return Ok(());
                    }
                    Err(_) => return Err(End::Close(ErrorCode::Internal)),
                };
                // Only an anonymous connection decides to read a device key.
                let verdict = self.binding().map_or(Err(ErrorCode::Internal), |binding| {
                    binding.authentication_holds(&address, key.as_ref(), &auth.signature.0)
                });
                self.authenticated(id, address, verdict).await
            }
            Read::Devices(account) => self.list_devices(id, account).await,
            Read::SenderCertificate(address) => self.sender_certificate(id, address).await,
            Read::Admission {
                account,
                token,
                then,
            } => {
                if !self.admitted(account, token).await? {
                    self.respond(id, Err(ErrorCode::DeliveryRefused)).await;
                    return Ok(());
                }
                match then {
                    Admitted::Submit(write) => self.submit(id, write).await,
                    Admitted::Devices(account) => self.list_devices(id, account).await,
                }
            }
        }
    }

    /// Reads an account's identity key and devices: `UnknownAccount` if there is none,
    /// `StorageFailure` if the read failed.
    pub(super) async fn read_account(
        &self,
        account: AccountId,
    ) -> Result<Result<AccountView, ErrorCode>, End> {
        let store = self.context.store.clone();
        match tokio::task::spawn_blocking(move || store.account(&account)).await {
            Ok(Ok(view)) => Ok(view.ok_or(ErrorCode::UnknownAccount)),
            Ok(Err(error)) => {
                tracing::error!(%error, "reading an account failed");
                Ok(Err(ErrorCode::StorageFailure))
            }
            Err(_) => Err(End::Close(ErrorCode::Internal)),
        }
    }

    /// Whether an anonymous caller with `token` may reach `account`.
    async fn admitted(&self, account: AccountId, token: Option<[u8; 16]>) -> Result<bool, End> {
        let store = self.context.store.clone();
        match tokio::task::spawn_blocking(move || store.admits(&account, token.as_ref())).await {
            Ok(Ok(admitted)) => Ok(admitted),
            Ok(Err(error)) => {
                tracing::error!(%error, "reading delivery access failed");
                Ok(false)
            }
            Err(_) => Err(End::Close(ErrorCode::Internal)),
        }
    }

    /// Issues a sender certificate for this connection's device.
    async fn sender_certificate(&self, id: RequestId, address: DeviceAddress) -> Result<(), End> {
        let context = &self.context;
        let result = self.read_account(address.account).await?.map(|view| {
            let body = SenderCertificateBody {
                account: address.account,
                device: address.device,
                identity_key: view.identity_key,
                expires_at: context
                    .clock
                    .now()
                    .saturating_add(context.config.sender_certificate_secs()),
            };
            Metrics::inc(&context.metrics.sender_certificates);
            ResponseBody::SenderCertificate {
                certificate: context.sender_key.issue(&body),
                relay_key: context.sender_key.public_key(),
            }
        });
        self.respond(id, result).await;
        Ok(())
    }

    /// Answers with an account's current devices; consumes nothing.
    async fn list_devices(&self, id: RequestId, account: AccountId) -> Result<(), End> {
        let result = self
            .read_account(account)
            .await?
            .map(|view| ResponseBody::Devices {
                devices: view.devices,
            });
        self.respond(id, result).await;
        Ok(())
    }
}
