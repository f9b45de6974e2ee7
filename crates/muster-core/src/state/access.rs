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
                // A mistyped name would ban that name for good and leave the agent meant
                // running: only an agent that registered can be revoked.
                if !self.nodes.contains_key(node) {
                    return Err(Rejection::new(
                        "node",
                        format!("node: no agent named {node:?} has registered"),
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
                self.revoked_agents.insert(node, at);
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

    /// Revoked agents, and when each was revoked.
    pub fn revoked_agents(&self) -> impl Iterator<Item = (&NodeId, &Timestamp)> {
        self.revoked_agents.iter()
    }
}
