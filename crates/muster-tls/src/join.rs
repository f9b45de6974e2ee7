//! What an agent trusts before it holds a certificate: a control node whose chain includes a
//! CA with the fingerprint it was given (with its join token), and whose certificate that CA
//! issued to a control node. The token is sent only over such a connection.

use crate::CONTROL_SERVER_NAME;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::pki::fingerprint_of_der(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the control node's chain holds no CA with fingerprint {}",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A channel to the control node at `addr` (`host:port`) that trusts it only if its chain
/// holds the CA of `ca_fingerprint` (`sha256:<hex>`) and presents no client certificate: for
/// the join call alone.
pub async fn join_channel(
    addr: &str,
    ca_fingerprint: &str,
) -> Result<Channel, tonic::transport::Error> {
    let provider = Arc::new(crate::crypto_provider());
    let verifier = Arc::new(PinnedCa {
        fingerprint: ca_fingerprint.to_owned(),
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let endpoint = crate::ClientTls::endpoint(addr)?.timeout(Duration::from_secs(15));
    crate::ClientTls::new(config, CONTROL_SERVER_NAME)
        .connect(endpoint)
        .await
}

/// A new join token, `<id>.<secret>`: 8 and 32 lower-case hex digits, from the system's
/// random source.
pub fn new_token() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let secret = uuid::Uuid::new_v4().simple().to_string();
    (id, secret)
}
