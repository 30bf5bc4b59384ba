//! TLS to the remote, over rustls (ring).
//!
//! `sslmode` as libpq understands it: `disable` (never), `prefer` (TLS if
//! the server offers it, else plain), `require` (TLS, the certificate is not
//! checked, as libpq does without a root certificate), `verify-full` (TLS,
//! certificate checked against `sslrootcert` and the host name). Unix
//! sockets never use TLS. `verify-ca` and client certificates are not
//! supported yet.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::error::ReplicationError;

/// How to use TLS with the remote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// Never.
    Disable,
    /// If the server offers it (no certificate check).
    #[default]
    Prefer,
    /// Always, without checking the certificate.
    Require,
    /// Always, checking the certificate against this root and the host name.
    VerifyFull(PathBuf),
}

impl TlsMode {
    /// Whether to ask the server for TLS at all.
    pub fn wanted(&self) -> bool {
        *self != TlsMode::Disable
    }

    /// Whether a server that refuses TLS is an error.
    pub fn required(&self) -> bool {
        matches!(self, TlsMode::Require | TlsMode::VerifyFull(_))
    }

    /// The rustls client configuration for this mode.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, ReplicationError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ReplicationError::fatal(format!("TLS setup: {e}")))?;
        let config = match self {
            TlsMode::VerifyFull(root) => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(root).map_err(|e| bad_root(root, &e.to_string()))?;
                for cert in certs {
                    let cert = cert.map_err(|e| bad_root(root, &e.to_string()))?;
                    roots.add(cert).map_err(|e| bad_root(root, &e.to_string()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn bad_root(path: &std::path::Path, why: &str) -> ReplicationError {
    ReplicationError::needs_operator(
        format!("cannot read sslrootcert {}: {why}", path.display()),
        "give sslrootcert as a PEM file with the CA certificate(s) that signed the server's certificate",
    )
}

/// Accepts any certificate (`prefer`/`require`: encryption without
/// authentication, as libpq does without a root certificate). Signatures
/// are still checked, so the handshake is sound.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
