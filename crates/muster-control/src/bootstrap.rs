//! The first administrator: a `root` user with an allow-all policy and one access key, made
//! once per cluster and written as an AWS shared credentials file so that the aws CLI, boto3
//! and `muster` itself can use it at once.

use muster_core::{
    AdminCommand, Arn, ArnScope, CeOrder, CeType, Command, ComputeEnvironment, EnabledState,
    IamCommand, JobQueue, Outcome, Policy,
};
use muster_raft::RaftNode;
use std::path::{Path, PathBuf};

pub const ROOT_USER: &str = "root";
const ROOT_POLICY: &str = "allow-all";
const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;

/// An access key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster refused the root user: {0}")]
    Refused(String),
    #[error("the cluster refused its region and account: {0}")]
    Scope(String),
}

fn random_upper(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(
            &uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .to_ascii_uppercase(),
        );
    }
    s.truncate(n);
    s
}

/// Reads `[default]` credentials from an AWS shared credentials file.
pub fn read_credentials(path: &Path) -> Option<Credentials> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut in_default = false;
    let (mut id, mut secret) = (None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_default = line == "[default]";
        } else if in_default && let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
    })
}

/// A new cluster starts at the command level all its founding members report (this release's,
/// `muster_core::COMMAND_LEVEL`, when they run it), before anything else is proposed: the
/// founder waits up to `FOUNDING_LEVEL_WAIT` for every member to answer. Asked again, or
/// left to the leader's housekeeping (within seconds) when not every member answered: a
/// founder restarted on an empty disk, whose peers run an earlier release, never raises the
/// level past theirs.
pub async fn found_at_level(node: &RaftNode) {
    let deadline = tokio::time::Instant::now() + FOUNDING_LEVEL_WAIT;
    while tokio::time::Instant::now() < deadline {
        if let Some(level) = node.lowest_member_level().await {
            if level >= muster_core::LEVEL_ARCHIVE_ENDED
                && let Err(e) = node.propose(Command::SetClusterLevel { level }).await
            {
                tracing::warn!(error = %e, level, "could not record the cluster's command level");
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How long a founder waits for every founding member to report its command level.
const FOUNDING_LEVEL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets the cluster's region and account, as the node that founds it does first: proposed
/// again with the same values, nothing changes; with others, once anything has an ARN, the
/// refusal says which the cluster has.
pub async fn set_scope(node: &RaftNode, scope: &ArnScope) -> Result<(), BootstrapError> {
    match node
        .propose(Command::Admin(AdminCommand::SetArnScope(scope.clone())))
        .await
    {
        Ok(Outcome::Rejected(r)) => Err(BootstrapError::Scope(r.message)),
        Ok(_) => Ok(()),
        Err(e) => Err(BootstrapError::Scope(e.to_string())),
    }
}

/// Makes sure the cluster names `scope` in its ARNs ([`set_scope`]) and that the root user,
/// its policy and the key in `dir/credentials` exist, creating the key (and the files
/// `dir/credentials` and `dir/config`, which names the region) the first time.
/// A new random access key pair for the root user.
pub fn new_credentials() -> Credentials {
    Credentials {
        access_key_id: format!("AKIA{}", random_upper(16)),
        secret_access_key: format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
    }
}

pub async fn ensure_root(
    node: &RaftNode,
    dir: &Path,
    scope: &ArnScope,
) -> Result<Credentials, BootstrapError> {
    set_scope(node, scope).await?;
    let region = scope.region.as_str();
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BootstrapError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let credentials_path = dir.join("credentials");
    let credentials = match read_credentials(&credentials_path) {
        Some(c) => c,
        None => {
            let c = new_credentials();
            let text = format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                c.access_key_id, c.secret_access_key
            );
            write_private(&credentials_path, &text).map_err(io(&credentials_path))?;
            c
        }
    };
    // One written before (by `muster cluster init`, with the cluster's endpoint) is kept: the
    // region cannot have changed since, for the cluster keeps the one it was founded with.
    let config_path = dir.join("config");
    if !config_path.exists() {
        std::fs::write(
            &config_path,
            format!("[default]\nregion = {region}\noutput = json\n"),
        )
        .map_err(io(&config_path))?;
    }

    let key_id = credentials.access_key_id.clone();
    let (has_user, has_policy, has_key) = node
        .read(move |s| {
            let user = s.user(ROOT_USER);
            (
                user.is_some(),
                user.is_some_and(|u| u.policies.contains_key(ROOT_POLICY)),
                s.access_key(&key_id).is_some_and(|k| k.user == ROOT_USER),
            )
        })
        .await
        .map_err(|e| BootstrapError::Refused(e.to_string()))?;
    let now = crate::now_millis();
    let mut commands = Vec::new();
    if !has_user {
        commands.push(IamCommand::CreateUser {
            name: ROOT_USER.into(),
            user_id: format!("AIDA{}", random_upper(17)),
            at: now,
        });
    }
    if !has_policy {
        let policy = Policy::parse(ALLOW_ALL).expect("the built-in policy parses");
        commands.push(IamCommand::PutUserPolicy {
            user: ROOT_USER.into(),
            policy_name: ROOT_POLICY.into(),
            policy,
        });
    }
    if !has_key {
        commands.push(IamCommand::CreateAccessKey {
            user: ROOT_USER.into(),
            id: credentials.access_key_id.clone(),
            secret: credentials.secret_access_key.clone(),
            at: now,
        });
    }
    for cmd in commands {
        match node.propose(Command::Iam(cmd)).await {
            Ok(Outcome::Rejected(r)) => return Err(BootstrapError::Refused(r.message)),
            Ok(_) => {}
            Err(e) => return Err(BootstrapError::Refused(e.to_string())),
        }
    }
    Ok(credentials)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// The name of the compute environment and job queue a cluster may be founded with.
pub const DEFAULT: &str = "default";

/// Creates the `default` compute environment (UNMANAGED: agents join it) and job queue, once.
pub async fn ensure_defaults(node: &RaftNode) -> Result<(), BootstrapError> {
    let (has_ce, has_queue) = node
        .read(|s| {
            (
                s.compute_environment(DEFAULT).is_some(),
                s.queue(DEFAULT).is_some(),
            )
        })
        .await
        .map_err(|e| BootstrapError::Refused(e.to_string()))?;
    let now = crate::now_millis();
    if !has_ce {
        let ce = ComputeEnvironment {
            name: DEFAULT.to_owned(),
            arn: Arn(String::new()),
            uuid: uuid::Uuid::new_v4().to_string(),
            ce_type: CeType::Unmanaged,
            state: EnabledState::Enabled,
            unmanaged_vcpus: None,
            service_role: None,
            tags: Default::default(),
            created_at: now,
            extra: Default::default(),
        };
        expect_done(node.propose(Command::CreateComputeEnvironment(ce)).await)?;
    }
    if !has_queue {
        let queue = JobQueue {
            name: DEFAULT.to_owned(),
            arn: Arn(String::new()),
            priority: 1,
            state: EnabledState::Enabled,
            compute_environment_order: vec![CeOrder {
                order: 1,
                compute_environment: DEFAULT.to_owned(),
            }],
            tags: Default::default(),
            created_at: now,
            scheduling_policy_arn: None,
            time_limit_actions: Vec::new(),
            extra: Default::default(),
        };
        expect_done(node.propose(Command::CreateJobQueue(queue)).await)?;
    }
    Ok(())
}

fn expect_done<E: std::fmt::Display>(outcome: Result<Outcome, E>) -> Result<(), BootstrapError> {
    match outcome {
        Ok(Outcome::Rejected(r)) => Err(BootstrapError::Refused(r.message)),
        Ok(_) => Ok(()),
        Err(e) => Err(BootstrapError::Refused(e.to_string())),
    }
}

/// Records the join token `muster cluster init` wrote into the founding node's config, once.
pub async fn ensure_join_token(
    node: &RaftNode,
    token: &crate::config::FoundingJoinToken,
) -> Result<(), BootstrapError> {
    let id = token.id.clone();
    let known = node
        .read(move |s| s.join_token(&id).is_some())
        .await
        .map_err(|e| BootstrapError::Refused(e.to_string()))?;
    if known {
        return Ok(());
    }
    let now = crate::now_millis();
    expect_done(
        node.propose(Command::Access(
            muster_core::AccessCommand::CreateJoinToken(muster_core::JoinToken {
                id: token.id.clone(),
                secret_sha256: token.secret_sha256.clone(),
                created_at: now,
                expires_at: muster_core::Timestamp(token.expires_at_unix * 1000),
                description: "made by muster cluster init".into(),
                revoked: false,
            }),
        ))
        .await,
    )
}
