//! Join tokens and revoked agents (see [`crate::AccessCommand`]).

use super::State;
use crate::{AccessCommand, JoinToken, NodeId, Outcome, Rejection, Timestamp};

impl State {
    pub(super) fn check_access(&self, cmd: &AccessCommand) -> Result<(), Rejection> {
        match cmd {
            AccessCommand::CreateJoinToken(token) => {
                if !crate::valid_token_id(&token.id) {
                    return Err(Rejection::new(
                        "id",
                        "a token id is 6 to 32 lower-case letters and digits",
                    ));
                }
                if self.join_tokens.contains_key(&token.id) {
                    return Err(Rejection::new("id", format!("token {} exists", token.id)));
                }
                if token.expires_at <= token.created_at {
                    return Err(Rejection::new(
                        "ttl",
                        "a token must expire after it is made",
                    ));
                }
                Ok(())
            }
            AccessCommand::RevokeJoinToken { id } => match self.join_tokens.get(id) {
                Some(_) => Ok(()),
                None => Err(Rejection::new("id", format!("no join token {id}"))),
            },
            AccessCommand::RevokeAgent { node, .. } => {
                // A mistyped name would ban that name and leave the agent meant
                // running: only an agent that registered can be revoked.
                if !self.nodes.contains_key(node) {
                    return Err(Rejection::new(
                        "node",
                        format!("node: no agent named {node:?} has registered"),
                    ));
                }
                Ok(())
            }
            AccessCommand::ReinstateAgent { node, at } => {
                let Some(revoked_at) = self.revoked_agents.get(node) else {
                    return Err(Rejection::new(
                        "node",
                        format!("node: agent {node} is not revoked"),
                    ));
                };
                let allowed_at = revoked_at.plus(crate::REINSTATE_AFTER);
                if *at < allowed_at {
                    return Err(Rejection::new(
                        "node",
                        format!(
                            "node: agent {node} was revoked less than {} minutes ago; it may be \
                             reinstated in {} s (so that no certificate issued before the \
                             revocation passes for a new one)",
                            crate::REINSTATE_AFTER.as_secs() / 60,
                            (allowed_at.0 - at.0).div_ceil(1000)
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    pub(super) fn apply_access(&mut self, cmd: AccessCommand) -> Outcome {
        if let Err(rejection) = self.check_access(&cmd) {
            return Outcome::Rejected(rejection);
        }
        match cmd {
            AccessCommand::CreateJoinToken(token) => {
                self.join_tokens.insert(token.id.clone(), token);
                self.join_tokens_made += 1;
            }
            AccessCommand::RevokeJoinToken { id } => {
                if let Some(token) = self.join_tokens.get_mut(&id) {
                    token.revoked = true;
                }
            }
            AccessCommand::RevokeAgent { node, at } => {
                self.reinstated_agents.remove(&node);
                self.revoked_agents.insert(node, at);
            }
            AccessCommand::ReinstateAgent { node, .. } => {
                if let Some(revoked_at) = self.revoked_agents.remove(&node) {
                    self.reinstated_agents.insert(node, revoked_at);
                }
            }
        }
        Outcome::Done
    }

    /// The join token named `id`.
    pub fn join_token(&self, id: &str) -> Option<&JoinToken> {
        self.join_tokens.get(id)
    }

    /// Whether the cluster ever had a join token (retention forgets expired ones): a cluster
    /// that never had one is still being founded, or takes no joins.
    pub fn ever_had_join_tokens(&self) -> bool {
        self.join_tokens_made > 0 || !self.join_tokens.is_empty()
    }

    /// Every join token, expired and revoked ones included.
    pub fn join_tokens(&self) -> impl Iterator<Item = &JoinToken> {
        self.join_tokens.values()
    }

    /// Whether agent `node` was revoked (its certificate is refused).
    pub fn agent_revoked(&self, node: &NodeId) -> bool {
        self.revoked_agents.contains_key(node)
    }

    /// Whether a certificate of agent `node` is refused: always while the agent is revoked;
    /// once it is reinstated, when the certificate was issued (`issued_at`, read from the
    /// certificate only then) no later than [`crate::CERTIFICATE_CLOCK_SKEW`] after the
    /// revocation, or cannot be read.
    pub fn agent_certificate_refused(
        &self,
        node: &NodeId,
        issued_at: impl FnOnce() -> Option<Timestamp>,
    ) -> bool {
        if self.agent_revoked(node) {
            return true;
        }
        match self.reinstated_agents.get(node) {
            None => false,
            Some(revoked_at) => issued_at()
                .is_none_or(|issued| issued <= revoked_at.plus(crate::CERTIFICATE_CLOCK_SKEW)),
        }
    }

    /// Reinstated agents, and when each had been revoked.
    pub fn reinstated_agents(&self) -> impl Iterator<Item = (&NodeId, &Timestamp)> {
        self.reinstated_agents.iter()
    }

    /// Revoked agents, and when each was revoked.
    pub fn revoked_agents(&self) -> impl Iterator<Item = (&NodeId, &Timestamp)> {
        self.revoked_agents.iter()
    }
}
