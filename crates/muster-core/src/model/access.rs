//! Who may join the cluster as an agent: join tokens, and agents cut off (until reinstated).

use crate::Timestamp;
use serde::{Deserialize, Serialize};

/// A token agents present to get their certificates signed, as many as join with it until it
/// expires or is revoked. Only the SHA-256 of its secret is kept: the token itself is shown
/// once, when it is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The public half (`<id>.<secret>`): names the token in lists and revocations.
    pub id: String,
    /// Hex SHA-256 of the secret half.
    pub secret_sha256: String,
    pub created_at: Timestamp,
    /// Refused from this time on.
    pub expires_at: Timestamp,
    #[serde(default)]
    pub description: String,
    /// Revoked tokens are kept until they expire, so a list shows them.
    #[serde(default)]
    pub revoked: bool,
}

impl JoinToken {
    /// Whether an agent may join with this token at `now`.
    pub fn usable_at(&self, now: Timestamp) -> bool {
        !self.revoked && now < self.expires_at
    }
}

/// A token's id: 6 to 32 lower-case letters and digits (`muster cluster token create`
/// makes 8).
pub fn valid_token_id(id: &str) -> bool {
    (6..=32).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}
