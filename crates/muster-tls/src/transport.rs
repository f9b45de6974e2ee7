//! TLS for tonic's servers: connections are accepted and their handshakes run off the accept
//! loop (a slow or silent client holds up no one), and every refused handshake is logged with
//! the port, the peer and the reason, so an operator sees which of plaintext, a foreign CA or
//! an expired certificate was turned away.

use rustls::{CertificateError, ServerConfig};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once on one listener: the agents' port takes clients without a
/// certificate, and a flood of them must not grow without bound. Past this, a new connection
/// is closed at once (a real agent retries).
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

/// Connections to `listener` that completed a TLS handshake under `config`, for tonic's
/// `serve_with_incoming`. `port` names the listener in log lines. The accept loop runs on the
/// runtime this is called on, and stops when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    port: &'static str,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine.
                    tracing::debug!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::debug!(port, %peer, "too many handshakes in progress: connection closed");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log_refusal(port, peer, &refusal_reason(&e)),
                    Err(_) => log_refusal(port, peer, "the handshake did not finish in time"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_refusal(port: &'static str, peer: SocketAddr, reason: &str) {
    tracing::warn!(port, %peer, reason, "TLS connection refused");
}

/// Why a handshake failed, in an operator's words.
pub fn refusal_reason(error: &io::Error) -> String {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the peer closed the connection during the handshake".into()
            }
            _ => format!("the handshake failed: {error}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "the peer's certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "the peer's certificate is not valid yet (clock skew?)".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not issued by this cluster's CA".into()
        }
        rustls::Error::InvalidCertificate(other) => {
            format!("the peer's certificate is invalid: {other:?}")
        }
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        rustls::Error::InvalidMessage(_) => {
            "the peer does not speak TLS (a plaintext client?)".into()
        }
        other => format!("the handshake failed: {other}"),
    }
}

/// A server-side TLS connection over TCP.
pub type ServerTlsStream = TlsStream<TcpStream>;

/// Connections whose handshake completed, one at a time, with their peer's address: for HTTP
/// servers (the API) that take a listener rather than a stream.
pub struct TlsListener {
    incoming: ReceiverStream<io::Result<ServerTlsStream>>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        port: &'static str,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            incoming: tls_incoming(listener, config, port),
            local,
        })
    }

    /// The next connection; never returns while none comes.
    pub async fn accept(&mut self) -> (ServerTlsStream, SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}
