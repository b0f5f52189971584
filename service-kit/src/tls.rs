//! TLS server configuration (rustls with the `ring` provider) from PEM files, for every
//! listener of both binaries: the gateway's device listeners and the device service's API. A
//! client CA makes clients present certificates verified against it (the gateway's MQTT
//! listener).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("failed to load {what} from {path}: {detail}")]
    Load {
        /// Certificate, key or CA.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// rustls refused the combination.
    #[error("failed to build the TLS configuration: {0}")]
    Config(String),
}

fn load_certs(what: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Load { what, path: path.into(), detail: e.to_string() })?
        .collect();
    let certs = certs.map_err(|e| TlsError::Load { what, path: path.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Load { what, path: path.into(), detail: "no certificate in the file".into() });
    }
    Ok(certs)
}

/// Builds an acceptor from a certificate chain and key, and (for MQTT) a CA for client
/// certificates: with `client_ca`, clients may present a certificate (required if
/// `require_client_cert`), verified against that CA.
///
/// # Errors
/// [`TlsError`] naming the file or the setting at fault.
pub fn acceptor(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
    require_client_cert: bool,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_certs("certificate", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Load {
        what: "private key",
        path: key.into(),
        detail: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs("client CA", ca)? {
                roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Config(e.to_string()))?)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
