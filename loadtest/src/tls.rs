//! TLS for simulated devices (rustls with the `ring` provider, as the gateway): cabinets and
//! vehicles verify the gateway's certificate against a CA file and a name.
//!
//! Devices connect to listener addresses (load tests target loopback IPs), while gateway
//! certificates usually name a host (`localhost`). The verifier therefore checks the
//! certificate against the configured name whatever address the connection went to; the
//! chain, signatures and validity are checked as usual.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// What devices need to connect over TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsPlan {
    /// PEM file with the CA certificate(s) the gateway's certificate chains to.
    pub ca_file: PathBuf,
    /// The name the gateway's certificate must carry (DNS name or IP address).
    pub server_name: String,
}

/// A client configuration shared by every device of a worker.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl TlsClient {
    /// Loads the CA and checks the name.
    ///
    /// # Errors
    /// An unreadable or empty CA file, a certificate rustls refuses, or a name that is neither
    /// a DNS name nor an IP address.
    pub fn new(plan: &TlsPlan) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(load_roots(&plan.ca_file)?);
        let name = ServerName::try_from(plan.server_name.clone()).with_context(|| {
            format!("--tls-server-name {:?} is neither a DNS name nor an IP address", plan.server_name)
        })?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .context("failed to build the certificate verifier")?;
        let verifier = Arc::new(NamedVerifier { inner, name });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("no TLS protocol version available")?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self { config: Arc::new(config) })
    }

    /// The configuration, for the MQTT client.
    pub fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Runs the handshake on a connected socket.
    ///
    /// # Errors
    /// The handshake failed (certificate refused, peer not speaking TLS, connection lost).
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let peer = tcp.peer_addr()?;
        TlsConnector::from(self.config()).connect(ServerName::IpAddress(peer.ip().into()), tcp).await
    }
}

fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let shown = path.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("failed to read the CA file {shown}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("failed to parse the CA file {shown}"))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the CA file {shown}");
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).with_context(|| format!("unusable CA certificate in {shown}"))?;
    }
    Ok(roots)
}

/// Verifies as the web PKI does, against a fixed name instead of the address dialled.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
