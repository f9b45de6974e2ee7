//! Channels to TLS servers with the handshake under a deadline.
//!
//! tonic's own TLS bounds only the TCP connect (`Endpoint::connect_timeout`): a handshake
//! whose peer stalls (a proxy that dies half-way, a peer that accepts and never answers)
//! keeps the channel connecting for good, and every call on it times out. Found by the fault
//! harness's slow links: a leader lost a follower until it restarted. Here TCP and TLS
//! together must finish within the connect timeout, or the attempt fails and the channel
//! tries again.

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How a client dials servers of one role over TLS.
#[derive(Clone)]
pub struct ClientTls {
    /// Shared by every clone and read at each connect: a renewed certificate
    /// ([`ClientTls::replace`]) is what every channel made from this presents next.
    config: Arc<std::sync::RwLock<Arc<ClientConfig>>>,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    /// The role the server's certificate must name, beyond the role's server name.
    expected: Option<crate::Role>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// TCP connect and TLS handshake together, unless set otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ClientTls {
    pub(crate) fn new(config: ClientConfig, server_name: &str) -> Self {
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
            server_name: ServerName::try_from(server_name.to_owned())
                .expect("role server names are valid DNS names"),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            expected: None,
        }
    }

    /// From now on, connections made by this and its clones present `with`'s certificate
    /// (a renewed one); connections already open go on.
    pub fn replace(&self, with: &ClientTls) {
        let config = with
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// Accepts only a server whose certificate names `role` (say, the agent that ran an
    /// attempt, not any agent of the cluster).
    pub fn expecting(mut self, role: crate::Role) -> Self {
        self.expected = Some(role);
        self
    }

    /// The server name this dials (the role's: see [`crate::CONTROL_SERVER_NAME`]).
    pub fn server_name(&self) -> &str {
        match &self.server_name {
            ServerName::DnsName(name) => name.as_ref(),
            _ => "",
        }
    }

    /// The deadline for TCP connect and TLS handshake together.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// An endpoint for `addr` (`host:port`) to configure further (timeouts, keepalive) and then
    /// hand to [`ClientTls::connect_lazy`] or [`ClientTls::connect`]. Its scheme is `http`:
    /// TLS is done under tonic, by this connector.
    pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{addr}"))
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        tonic::codegen::http::Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Error = std::io::Error,
        Future = impl Send + 'static,
    > + Clone
    + Send
    + 'static {
        let config = self.config.clone();
        let (name, timeout) = (self.server_name.clone(), self.connect_timeout);
        let expected = self.expected.clone();
        tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let current = config.read().unwrap_or_else(|p| p.into_inner()).clone();
            let (connector, name) = (tokio_rustls::TlsConnector::from(current), name.clone());
            let expected = expected.clone();
            async move {
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_owned();
                let port = uri.port_u16().unwrap_or(80);
                let handshake = async {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    connector.connect(name, tcp).await
                };
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(tls)) => {
                        if let Some(expected) = expected {
                            let role = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .map(|leaf| crate::role_of_certificate(leaf));
                            if role != Some(Ok(expected.clone())) {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::PermissionDenied,
                                    format!("{host}:{port} is not {expected}"),
                                ));
                            }
                        }
                        Ok(hyper_util::rt::TokioIo::new(tls))
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "connect and TLS handshake with {host}:{port} took over {timeout:?}"
                        ),
                    )),
                }
            }
        })
    }

    /// A channel that connects on first use and again after its connection broke.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    /// A channel, connected now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.connector()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{ClusterCa, Validity};
    use crate::{Identity, Role};

    /// A server that accepts the connection and never answers the handshake: the connect
    /// fails at its deadline instead of hanging the channel for good.
    #[tokio::test]
    async fn a_stalled_handshake_fails_at_the_deadline() {
        let ca = ClusterCa::generate("t").unwrap();
        let agent = ca
            .issue(
                &Role::Agent("a".into()),
                &[],
                Validity::from_now(Duration::from_secs(60)),
            )
            .unwrap();
        let identity = Identity::from_pem(ca.cert_pem(), &agent.cert_pem, &agent.key_pem).unwrap();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                open.push(stream);
            }
        });
        let started = tokio::time::Instant::now();
        let result = identity
            .client_tls(crate::CONTROL_SERVER_NAME)
            .with_connect_timeout(Duration::from_millis(300))
            .connect(ClientTls::endpoint(&addr).unwrap())
            .await;
        assert!(result.is_err(), "a silent server was taken for a TLS peer");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the handshake was not cut off at its deadline: {:?}",
            started.elapsed()
        );
        held.abort();
    }

    /// A log read expects the agent that ran the attempt: another agent of the cluster, with
    /// a valid certificate, is refused after the handshake.
    #[tokio::test]
    async fn a_server_of_the_wrong_name_is_refused_when_one_is_expected() {
        let ca = ClusterCa::generate("t").unwrap();
        let hour = Validity::from_now(Duration::from_secs(3600));
        let control = ca.issue(&Role::Control(1), &[], hour).unwrap();
        let other = ca.issue(&Role::Agent("b".into()), &[], hour).unwrap();
        let reader =
            Identity::from_pem(ca.cert_pem(), &control.cert_pem, &control.key_pem).unwrap();
        let served = Identity::from_pem(ca.cert_pem(), &other.cert_pem, &other.key_pem).unwrap();
        let config = served
            .server_config(crate::ClientCertificates::Required)
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = crate::transport::tls_incoming(listener, config, "test");
        let held = tokio::spawn(async move {
            use tokio_stream::StreamExt;
            let mut incoming = incoming;
            let mut open = Vec::new();
            while let Some(conn) = incoming.next().await {
                open.push(conn);
            }
        });
        let tls = reader.client_tls(crate::AGENT_SERVER_NAME);
        let wrong = tls
            .clone()
            .expecting(Role::Agent("a".into()))
            .connect(ClientTls::endpoint(&addr).unwrap())
            .await;
        assert!(wrong.is_err(), "agent b was taken for agent a");
        let right = tls
            .expecting(Role::Agent("b".into()))
            .connect(ClientTls::endpoint(&addr).unwrap())
            .await;
        assert!(right.is_ok(), "{right:?}");
        held.abort();
    }
}
