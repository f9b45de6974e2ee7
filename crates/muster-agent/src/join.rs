//! Joining with a token: an agent that starts with only a join token and the CA's fingerprint
//! generates its key, has the cluster sign its certificate, and keeps both in `work_dir/tls`.
//! Later starts use what is kept there.

use crate::AgentConfig;
use muster_proto::pb::JoinRequest;
use muster_proto::pb::agent_service_client::AgentServiceClient;
use std::sync::Arc;
use std::time::Duration;

/// A token and the CA it is for, from the config (`join_token`, `ca_fingerprint`).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSettings {
    /// `None` once joined: the certificate kept in `work_dir/tls` is enough, and the token
    /// (a bearer secret) need not stay in the config.
    pub token: Option<String>,
    pub ca_fingerprint: String,
}

impl std::fmt::Debug for JoinSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token's secret.
        let id = self
            .token
            .as_deref()
            .map(|t| format!("{}.<secret>", t.split('.').next().unwrap_or_default()));
        f.debug_struct("JoinSettings")
            .field("token", &id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

/// How long an agent keeps trying to reach a control node to join before it gives up.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the cluster refused to join this agent: {0}")]
    Refused(String),
    #[error("no control node could be reached to join ({0})")]
    Unreachable(String),
    #[error("{0}")]
    Local(String),
}

/// Where a joined agent keeps its CA, certificate and key.
pub(crate) fn files(config: &AgentConfig) -> muster_tls::TlsFiles {
    let dir = config.work_dir.join("tls");
    muster_tls::TlsFiles {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("agent.pem"),
        key_file: dir.join("agent.key"),
        ca_key_file: None,
    }
}

/// `config` with its TLS identity: the one kept from an earlier join, or a new one from
/// joining now. Configs that name their certificate files, or run plaintext, pass unchanged.
pub async fn ensure_identity(mut config: AgentConfig) -> Result<AgentConfig, JoinError> {
    let Some(join) = config.join.clone() else {
        return Ok(config);
    };
    let files = files(&config);
    let expected = muster_tls::Role::Agent(config.node_id.clone());
    if files.cert_file.exists() {
        let kept = muster_tls::renew::load_finishing_renewal("the joined agent's tls", &files)
            .map_err(|e| JoinError::Local(e.to_string()))
            .and_then(|identity| {
                let ca = muster_tls::pki::fingerprint(identity.ca_pem())
                    .map_err(|e| JoinError::Local(e.to_string()))?;
                if *identity.role() != expected || ca != join.ca_fingerprint {
                    return Err(JoinError::Local(format!(
                        "{} holds the certificate of {} under the CA {ca}, not of {expected} under {}",
                        files.cert_file.display(),
                        identity.role(),
                        join.ca_fingerprint
                    )));
                }
                Ok(identity)
            });
        match kept {
            Ok(identity) => {
                config.tls = Some(Arc::new(identity));
                return Ok(config);
            }
            // Expired, or of another cluster: join again with the token.
            Err(e) => {
                tracing::warn!(error = %e, "the kept certificate cannot be used; joining again")
            }
        }
    }
    let Some(token) = join.token.clone() else {
        return Err(JoinError::Local(format!(
            "{} holds no usable certificate and the config has no join_token to join with",
            files.cert_file.display()
        )));
    };
    let request = muster_tls::pki::signing_request(&expected)
        .map_err(|e| JoinError::Local(format!("cannot make a key: {e}")))?;
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    let mut last_error = String::new();
    let reply = 'joined: loop {
        for addr in &config.control_plane {
            let channel = match muster_tls::join::join_channel(addr, &join.ca_fingerprint).await {
                Ok(channel) => channel,
                Err(e) => {
                    last_error = format!("{addr}: {}", error_chain(&e));
                    continue;
                }
            };
            let call = AgentServiceClient::new(channel)
                .join(JoinRequest {
                    token: token.clone(),
                    node_id: config.node_id.clone(),
                    csr_pem: request.csr_pem.clone(),
                })
                .await;
            match call {
                Ok(reply) => break 'joined reply.into_inner(),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unauthenticated
                            | tonic::Code::PermissionDenied
                            | tonic::Code::InvalidArgument
                            | tonic::Code::AlreadyExists
                    ) =>
                {
                    return Err(JoinError::Refused(status.message().to_owned()));
                }
                Err(status) => last_error = format!("{addr}: {}", status.message()),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(JoinError::Unreachable(last_error));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let fingerprint =
        muster_tls::pki::fingerprint(&reply.ca_pem).map_err(|e| JoinError::Local(e.to_string()))?;
    if fingerprint != join.ca_fingerprint {
        return Err(JoinError::Refused(format!(
            "the cluster sent a CA with fingerprint {fingerprint}, not {}",
            join.ca_fingerprint
        )));
    }
    let write = |path: &std::path::Path, text: &str, private: bool| {
        muster_tls::pki::write_pem(path, text, private)
            .map_err(|e| JoinError::Local(format!("cannot write {}: {e}", path.display())))
    };
    write(&files.key_file, &request.key_pem, true)?;
    write(&files.cert_file, &reply.certificate_pem, false)?;
    write(&files.ca_file, &reply.ca_pem, false)?;
    let identity = muster_tls::Identity::load("the joined agent's tls", &files)
        .map_err(|e| JoinError::Local(e.to_string()))?;
    tracing::info!(node = %config.node_id, dir = %files.cert_file.display(), "joined the cluster");
    config.tls = Some(Arc::new(identity));
    Ok(config)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
