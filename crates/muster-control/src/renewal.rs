//! A control node that holds the CA's key renews its own certificate before it expires,
//! without a restart: a new key and certificate written over its `[tls]` files, then presented
//! by its Raft and agent ports and by every connection it makes from then on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How often the time to renew is looked at again at most (clocks step).
const RECHECK: Duration = Duration::from_secs(3600);
/// After a failed renewal (a full disk), the next try.
const RETRY: Duration = Duration::from_secs(10);

/// What presents this node's certificate: its servers, and the configurations its channels
/// connect with.
pub(crate) struct Presented {
    pub servers: Vec<muster_tls::ServedCertificate>,
    pub clients: Vec<muster_tls::ClientTls>,
}

pub(crate) async fn keep_renewed(
    node_id: u64,
    files: muster_tls::TlsFiles,
    mut identity: Arc<muster_tls::Identity>,
    ca: Arc<muster_tls::pki::ClusterCa>,
    presented: Presented,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let due = muster_tls::renew::due(&identity);
        let wait = due
            .duration_since(wall_clock())
            .unwrap_or_default()
            .min(RECHECK);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
        if wall_clock() < due {
            continue;
        }
        match renew(node_id, &files, &identity, &ca, &presented) {
            Ok(renewed) => {
                tracing::info!(node = node_id, "certificate renewed");
                identity = renewed;
            }
            Err(e) => {
                tracing::warn!(node = node_id, error = %e, "certificate renewal failed; trying again");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// The wall clock, as certificates are judged by it (read as the control plane reads it).
fn wall_clock() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(crate::now_millis().as_millis())
}

fn renew(
    node_id: u64,
    files: &muster_tls::TlsFiles,
    current: &muster_tls::Identity,
    ca: &muster_tls::pki::ClusterCa,
    presented: &Presented,
) -> Result<Arc<muster_tls::Identity>, String> {
    // As long as the one it replaces.
    let lifetime = current
        .not_after()
        .duration_since(current.not_before())
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let now = wall_clock();
    let issued = ca
        .issue(
            &muster_tls::Role::Control(node_id),
            &[],
            muster_tls::pki::Validity {
                not_before: now - Duration::from_secs(1).min(lifetime / 10),
                not_after: now + lifetime,
            },
        )
        .map_err(|e| e.to_string())?;
    // As `muster cluster init` writes it: the CA after the node's own certificate, for
    // joining agents that know the CA by its fingerprint alone.
    let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
    let renewed = Arc::new(muster_tls::renew::replace(files, &chain, &issued.key_pem)?);
    for server in &presented.servers {
        server.replace(&renewed).map_err(|e| e.to_string())?;
    }
    for client in &presented.clients {
        client.replace(&renewed.client_tls(client.server_name()));
    }
    Ok(renewed)
}
