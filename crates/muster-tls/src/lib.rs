//! Muster's cluster PKI and the TLS of its internal ports.
//!
//! Every control node and agent holds a certificate issued by the cluster's own CA. The
//! certificate says what its holder is — a [`Role`]: control node `N` or agent `NAME` — in a
//! URI subject alternative name (`muster://control/N`, `muster://agent/NAME`), and every RPC
//! is authorised by that role ([`peer_role`]). Hostname checks use a name per role, as Consul
//! does with `server.<dc>.consul`: a control node's certificate carries the DNS name
//! [`CONTROL_SERVER_NAME`] and an agent's [`AGENT_SERVER_NAME`], so a client dialling a control
//! node accepts only a control node of this cluster, whatever address it dialled.
//!
//! - [`pki`]: the CA, issuing role certificates, signing an agent's CSR, fingerprints;
//! - [`Identity`]: a holder's CA, certificate and key as read from the files a config names;
//! - [`transport`]: tonic-ready server listeners (handshakes off the accept loop, each
//!   refusal logged with its reason) and client configurations.

mod client;
mod identity;
pub mod join;
pub mod pki;
pub mod renew;
mod role;
pub mod transport;

pub use client::{ClientTls, DEFAULT_CONNECT_TIMEOUT};
pub use identity::{
    ApiTlsFiles, ClientCertificates, Identity, IdentityError, ServedCertificate, TlsFiles,
    api_server_config,
};
pub use role::{
    AGENT_SERVER_NAME, CONTROL_SERVER_NAME, Role, peer_issued_at, peer_role, role_of_certificate,
};

/// Installs *ring* as rustls' process-wide crypto provider, once. rustls refuses to pick one
/// itself when more than one could be linked in; Muster links only *ring*.
/// rustls' server configuration, as [`api_server_config`] and [`Identity::server_config`] make it.
pub use rustls::ServerConfig as ServerTlsConfig;

pub fn install_crypto_provider() {
    let _ = crypto_provider().install_default();
}

/// rustls on *ring*. rustls deprecates *ring*'s provider in favour of aws-lc, whose build needs
/// cmake and a long C compile (see deps-notes); its key exchanges lack only the post-quantum
/// hybrids, which a cluster's internal ports can do without for now.
#[allow(deprecated)]
pub(crate) fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
