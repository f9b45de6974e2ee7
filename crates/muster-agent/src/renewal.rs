//! Renewing a joined agent's certificate before it expires, without a restart: a new key, a
//! CSR signed by a control node for the agent the current certificate names, the files in
//! `work_dir/tls` replaced, and the new certificate presented by every connection made from
//! then on (to control nodes, and by the log service).

use crate::reporter::ControlClient;
use muster_proto::pb::RenewRequest;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// A certificate is renewed once two thirds of its lifetime have passed.
fn renew_at(identity: &muster_tls::Identity) -> SystemTime {
    let (start, end) = (identity.not_before(), identity.not_after());
    let lifetime = end.duration_since(start).unwrap_or_default();
    end - lifetime / 3
}

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
        let due = renew_at(&identity);
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

/// Where a renewal stages a file before it replaces it.
pub(crate) fn staged(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".new");
    path.with_file_name(name)
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
    for addr in &control.addrs {
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
    // Both new files first, then both renamed; a crash between the renames leaves a pair that
    // the next start finishes (`join::load_kept`).
    let write = |path: &std::path::Path, text: &str, private: bool| {
        muster_tls::pki::write_pem(&staged(path), text, private)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&files.key_file, &request.key_pem, true)?;
    write(&files.cert_file, &reply.certificate_pem, false)?;
    let check =
        muster_tls::Identity::from_pem(current.ca_pem(), &reply.certificate_pem, &request.key_pem)
            .map_err(|(setting, problem)| format!("the renewed {setting} {problem}"))?;
    for path in [&files.key_file, &files.cert_file] {
        std::fs::rename(staged(path), path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    // The renames themselves must survive a power cut.
    if let Some(dir) = files.cert_file.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    let renewed = Arc::new(check);
    if let Some(tls) = control.tls() {
        tls.replace(&renewed.client_tls(muster_tls::CONTROL_SERVER_NAME));
    }
    if let Some(served) = served {
        served.replace(&renewed).map_err(|e| e.to_string())?;
    }
    Ok(renewed)
}
