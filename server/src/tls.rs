//! The relay's TLS identity: an operator certificate, or a self-signed one made on first
//! start and kept in the data dir so that its pinned fingerprint survives restarts.

use std::fs;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsFiles;

/// A certificate chain, its key, and the SHA-256 fingerprint of the leaf.
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate's DER: what clients pin.
    pub fingerprint: [u8; 32],
}

/// The certificate could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: no usable {what} in PEM file")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was missing.
        what: &'static str,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Loads the operator's certificate if configured, else the self-signed one in `data_dir`
/// (made now if absent).
pub fn load_or_create(tls: Option<&TlsFiles>, data_dir: &Path) -> Result<ServerIdentity, TlsError> {
    match tls {
        Some(files) => load_pem(files),
        None => self_signed(&data_dir.join("tls")),
    }
}

fn fingerprint(leaf: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(leaf.as_ref()).into()
}

fn load_pem(files: &TlsFiles) -> Result<ServerIdentity, TlsError> {
    let pem = |path: &Path, what| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|_| pem(&files.cert, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem(&files.cert, "certificate"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| pem(&files.cert, "certificate"))?;
    let fingerprint = fingerprint(leaf);
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|_| pem(&files.key, "private key"))?;
    Ok(ServerIdentity {
        chain,
        key,
        fingerprint,
    })
}

fn self_signed(dir: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_path = dir.join("cert.der");
    let key_path = dir.join("key.der");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    if !cert_path.exists() {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let made = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "hush-relay".to_owned(),
        ])?;
        write_private(&key_path, &made.signing_key.serialize_der()).map_err(io(&key_path))?;
        fs::write(&cert_path, made.cert.der()).map_err(io(&cert_path))?;
    }
    let cert = CertificateDer::from(fs::read(&cert_path).map_err(io(&cert_path))?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        fs::read(&key_path).map_err(io(&key_path))?,
    ));
    Ok(ServerIdentity {
        fingerprint: fingerprint(&cert),
        chain: vec![cert],
        key,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
