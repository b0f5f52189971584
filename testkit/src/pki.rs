//! A throwaway PKI for TLS tests: certificates are made per test so no key is ever committed,
//! and they name both `localhost` and `127.0.0.1` so clients may check either.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA, a server certificate signed by it (`server.pem`, `server.key`) and a client
/// certificate whose subject CN is a VIN (`client.pem`, `client.key`), in a temporary folder
/// removed on drop; the CA is `ca.pem`.
#[derive(Debug)]
pub struct Pki {
    /// The folder holding the PEM files.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes the files; `client_vin` becomes the client certificate's subject CN.
    ///
    /// # Panics
    /// If the folder cannot be written (a test cannot go on without it).
    pub fn new(client_vin: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("pki"));
        std::fs::create_dir_all(&dir).expect("temporary folder for the PKI");
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("PEM file written");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "iotgw test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");
        write("ca.pem", ca.pem());

        let server_key = KeyPair::generate().expect("server key");
        let server_params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server certificate parameters");
        write("server.pem", server_params.signed_by(&server_key, &ca).expect("server certificate").pem());
        write("server.key", server_key.serialize_pem());

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client certificate parameters");
        client_params.distinguished_name.push(DnType::CommonName, client_vin);
        write("client.pem", client_params.signed_by(&client_key, &ca).expect("client certificate").pem());
        write("client.key", client_key.serialize_pem());
        Self { dir }
    }

    /// The path of one of the files, as the configuration strings want it.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
