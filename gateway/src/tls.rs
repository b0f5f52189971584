//! TLS for both listeners: the server configuration comes from `service_kit::tls` (shared with
//! the device service's API); here, the VIN a vehicle's client certificate names.

use protocol::Vin;
pub use service_kit::tls::{TlsError, acceptor};

/// The VIN of a verified client certificate: its subject common name, if that is a VIN.
pub fn client_vin(tls: &rustls::ServerConnection) -> Option<Vin> {
    let leaf = tls.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Vin::new(cn).ok()
}
