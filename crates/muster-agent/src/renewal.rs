//! Renewing a joined agent's certificate before it expires, without a restart: a new key, a
//! CSR signed by a control node for the agent the current certificate names, the files in
//! `work_dir/tls` replaced, and the new certificate presented by every connection made from
//! then on (to control nodes, and by the log service).

use crate::reporter::ControlClient;
use muster_proto::pb::RenewRequest;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How often the time to renew is looked at again at most (clocks step; a machine sleeps).
const RECHECK: Duration = Duration::from_secs(3600);
/// After a failed renewal (no control node could sign), the next try.
const RETRY: Duration = Duration::from_secs(10);

pub(crate) async fn keep_renewed(
    node_id: String,
    files: muster_tls::TlsFiles,
    mut identity: Arc<muster_tls::Identity>,
    control: ControlClient,
    served: Option<muster_tls::ServedCertificate>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let due = muster_tls::renew::due(&identity);
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(RECHECK);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(wait) => {}
        }
        if SystemTime::now() < due {
            continue;
        }
        match renew(&node_id, &files, &identity, &control, served.as_ref()).await {
            Ok(renewed) => {
                tracing::info!(node = %node_id, "certificate renewed");
                identity = renewed;
            }
            Err(e) => {
                tracing::warn!(node = %node_id, error = %e, "certificate renewal failed; trying again");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

async fn renew(
    node_id: &str,
    files: &muster_tls::TlsFiles,
    current: &muster_tls::Identity,
    control: &ControlClient,
    served: Option<&muster_tls::ServedCertificate>,
) -> Result<Arc<muster_tls::Identity>, String> {
    let request = muster_tls::pki::signing_request(&muster_tls::Role::Agent(node_id.to_owned()))
        .map_err(|e| format!("cannot make a key: {e}"))?;
    let mut last_error = String::from("no control node is configured");
    let mut reply = None;
    for addr in &control.addrs() {
        let Some(mut client) = control.client(addr) else {
            continue;
        };
        match client
            .renew_certificate(RenewRequest {
                node_id: node_id.to_owned(),
                csr_pem: request.csr_pem.clone(),
            })
            .await
        {
            Ok(answer) => {
                reply = Some(answer.into_inner());
                break;
            }
            Err(status) => last_error = format!("{addr}: {}", status.message()),
        }
    }
    let reply = reply.ok_or(last_error)?;
    if reply.ca_pem.trim() != current.ca_pem().trim() {
        return Err("a control node answered with another CA".into());
    }
    let check = muster_tls::renew::replace(files, &reply.certificate_pem, &request.key_pem)?;
    let renewed = Arc::new(check);
    if let Some(tls) = control.tls() {
        tls.replace(&renewed.client_tls(muster_tls::CONTROL_SERVER_NAME));
    }
    if let Some(served) = served {
        served.replace(&renewed).map_err(|e| e.to_string())?;
    }
    Ok(renewed)
}
