//! A holder's CA, certificate and key, read from the files its config names and checked
//! before anything listens or dials.

use crate::{Role, role_of_certificate};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files of a `[tls]` section: the cluster CA's certificate, this holder's certificate
/// and its private key, all PEM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA's own key, on control nodes only: with it a node signs the certificates of
    /// agents that join with a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_file: Option<PathBuf>,
}

/// Why a `[tls]` section cannot be used; every message names the setting and its file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{setting} ({path}): cannot read it: {source}")]
    Read {
        setting: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{setting} ({path}): {problem}")]
    Invalid {
        setting: String,
        path: String,
        problem: String,
    },
    #[error("{0}")]
    Other(String),
}

/// What a control node or agent presents and trusts.
#[derive(Clone)]
pub struct Identity {
    role: Role,
    ca_pem: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Whether a server asks its clients for certificates, or requires them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Refused at the handshake without one (the Raft port, an agent's log port).
    Required,
    /// Accepted without one, so that an agent can join; every RPC but the join then checks
    /// the caller's role and answers `UNAUTHENTICATED` to a caller without a certificate.
    Optional,
}

impl Identity {
    /// Reads and checks the files of `section` (its name appears in every error): the
    /// certificate must chain to the CA, be valid now, name a role, and match the key.
    pub fn load(section: &str, files: &TlsFiles) -> Result<Self, IdentityError> {
        let read = |setting: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
                setting: format!("{section}.{setting}"),
                path: path.display().to_string(),
                source,
            })
        };
        let ca_pem = read("ca_file", &files.ca_file)?;
        let cert_pem = read("cert_file", &files.cert_file)?;
        let key_pem = read("key_file", &files.key_file)?;
        Self::from_pem(&ca_pem, &cert_pem, &key_pem).map_err(|(setting, problem)| {
            let path = match setting {
                "ca_file" => &files.ca_file,
                "cert_file" => &files.cert_file,
                _ => &files.key_file,
            };
            IdentityError::Invalid {
                setting: format!("{section}.{setting}"),
                path: path.display().to_string(),
                problem,
            }
        })
    }

    /// As [`Identity::load`], from PEM text; an error names the setting at fault.
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, (&'static str, String)> {
        crate::install_crypto_provider();
        let ca = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or(("ca_file", "holds no PEM certificate".to_owned()))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let leaf = chain
            .first()
            .ok_or(("cert_file", "holds no PEM certificate".to_owned()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| ("key_file", format!("holds no PEM private key ({e})")))?;
        let role = role_of_certificate(leaf).map_err(|e| ("cert_file", e))?;

        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| ("ca_file", format!("is not a usable CA certificate: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| ("ca_file", e.to_string()))?;
        let name = ServerName::try_from(role.server_name()).expect("a valid DNS name");
        verifier
            .verify_server_cert(leaf, &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| {
                (
                    "cert_file",
                    format!("is not a valid certificate of this CA for {role}: {e}"),
                )
            })?;
        let provider = crate::crypto_provider();
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| ("key_file", format!("is not a usable private key: {e}")))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|_| {
                (
                    "key_file",
                    "is not the key of cert_file's certificate".into(),
                )
            })?;
        Ok(Self {
            role,
            ca_pem: ca_pem.to_owned(),
            ca,
            chain,
            key: Arc::new(key),
        })
    }

    /// What this holder's certificate says it is.
    pub fn role(&self) -> &Role {
        &self.role
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The rustls configuration of a server that presents this identity and trusts clients
    /// of the same CA. Speaks HTTP/2 only (gRPC).
    pub fn server_config(
        &self,
        clients: ClientCertificates,
    ) -> Result<Arc<ServerConfig>, IdentityError> {
        crate::install_crypto_provider();
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| IdentityError::Other(e.to_string()))?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
        let verifier = match clients {
            ClientCertificates::Required => verifier,
            ClientCertificates::Optional => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| IdentityError::Other(e.to_string()))?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServedCertificate::new(self)?));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// As [`Identity::server_config`], with a handle that replaces the certificate it
    /// presents (a renewed one) for the handshakes to come.
    pub fn renewable_server_config(
        &self,
        clients: ClientCertificates,
    ) -> Result<(Arc<ServerConfig>, ServedCertificate), IdentityError> {
        let served = ServedCertificate::new(self)?;
        let mut config = self.server_config(clients)?;
        Arc::get_mut(&mut config).expect("just made").cert_resolver = Arc::new(served.clone());
        Ok((config, served))
    }

    fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, IdentityError> {
        let signing = crate::crypto_provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| IdentityError::Other(e.to_string()))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signing,
        )))
    }

    /// When this holder's certificate stops being valid.
    pub fn not_after(&self) -> std::time::SystemTime {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.chain[0])
            .expect("parsed once already, when loaded");
        let secs = cert.validity().not_after.timestamp().max(0) as u64;
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    /// When this holder's certificate became valid.
    pub fn not_before(&self) -> std::time::SystemTime {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.chain[0])
            .expect("parsed once already, when loaded");
        let secs = cert.validity().not_before.timestamp().max(0) as u64;
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    /// How to dial servers of role `server_name` ([`crate::CONTROL_SERVER_NAME`] or
    /// [`crate::AGENT_SERVER_NAME`]) with this identity: only a server whose certificate this
    /// CA issued for that role is accepted.
    pub fn client_tls(&self, server_name: &str) -> crate::ClientTls {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .expect("the CA was added once already, when the identity was loaded");
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(crate::crypto_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
                .expect("the key matches the certificate: checked when loaded");
        crate::ClientTls::new(config, server_name)
    }
}

/// The files of an `[api_tls]` section: the API's certificate (chain) and key, PEM. The
/// certificate may be the cluster CA's (`muster cluster init --api-tls`) or an operator's.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The rustls configuration of the HTTPS API: no client certificates (SigV4 authenticates
/// callers), HTTP/2 and HTTP/1.1. An error names the setting and the file.
pub fn api_server_config(files: &ApiTlsFiles) -> Result<Arc<ServerConfig>, IdentityError> {
    crate::install_crypto_provider();
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).map_err(|source| IdentityError::Read {
            setting: format!("api_tls.{setting}"),
            path: path.display().to_string(),
            source,
        })
    };
    let invalid = |setting: &str, path: &Path, problem: String| IdentityError::Invalid {
        setting: format!("api_tls.{setting}"),
        path: path.display().to_string(),
        problem,
    };
    let cert = read("cert_file", &files.cert_file)?;
    let key = read("key_file", &files.key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(invalid(
            "cert_file",
            &files.cert_file,
            "holds no PEM certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        invalid(
            "key_file",
            &files.key_file,
            format!("holds no PEM private key ({e})"),
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(crate::crypto_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            invalid(
                "key_file",
                &files.key_file,
                format!("does not fit the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate a server presents, replaceable while it serves.
#[derive(Clone, Debug)]
pub struct ServedCertificate(Arc<std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>>);

impl ServedCertificate {
    fn new(identity: &Identity) -> Result<Self, IdentityError> {
        Ok(Self(Arc::new(std::sync::RwLock::new(
            identity.certified_key()?,
        ))))
    }

    /// Handshakes from now on present `identity`'s certificate.
    pub fn replace(&self, identity: &Identity) -> Result<(), IdentityError> {
        let key = identity.certified_key()?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServedCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
