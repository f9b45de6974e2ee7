//! tonic over turmoil's simulated TCP: channels that dial through it, and a server stream of
//! the connections it accepts.

use hyper_util::rt::TokioIo;
use std::task::{Context, Poll};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// A lazily connecting channel to `host:port` on the simulated network.
pub fn channel(endpoint: Endpoint) -> Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
        Ok::<_, std::io::Error>(TokioIo::new(stream))
    }))
}

/// The dialer a simulated control node's peer directory uses.
pub fn dialer() -> muster_raft::Dialer {
    std::sync::Arc::new(channel)
}

/// A channel to `addr` (`host:port`) for a simulated agent.
pub fn agent_channel(addr: &str) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid simulated address")
        .connect_timeout(std::time::Duration::from_millis(500))
        .http2_keep_alive_interval(std::time::Duration::from_secs(5))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    channel(endpoint)
}

/// An accepted simulated connection, as tonic's server takes it.
pub struct Accepted(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Accepted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Accepted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Every connection accepted on `port` of this simulated host.
pub async fn incoming(
    port: u16,
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<Accepted>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| Accepted(s));
        Some((accepted, listener))
    }))
}
