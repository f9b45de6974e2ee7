//! Identifiers and time as the state machine sees them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Milliseconds since the Unix epoch, stamped by the node that received a request.
/// The state machine never reads a clock; it only compares and stores these.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: std::time::Duration) -> Self {
        Self(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}

string_id!(
    /// A worker node's id, chosen by the agent (from its config or host name).
    NodeId
);
string_id!(
    /// An Amazon Resource Name as AWS Batch shapes it.
    Arn
);

/// A job's id: a UUID chosen by the node that accepted the SubmitJob, `<uuid>:<index>` for an
/// array child. Cloning shares the text: the job table and every index that names a job hold
/// the same allocation, which matters with a million jobs queued.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub Arc<str>);

impl JobId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(JobId::from)
    }
}

/// Where ARNs point: the region and account the cluster presents itself as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArnScope {
    pub region: String,
    pub account: String,
}

impl Default for ArnScope {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            account: "000000000000".into(),
        }
    }
}

impl ArnScope {
    /// Whether `region` looks like an AWS region (`us-east-1`, `eu-central-2`,
    /// `us-gov-west-1`: lowercase words and a number) and `account` is twelve digits, as clients
    /// that parse ARNs expect. The error names the setting (`region`, `account_id`).
    pub fn check(&self) -> Result<(), crate::ConfigError> {
        let parts: Vec<&str> = self.region.split('-').collect();
        let region_ok = parts.len() >= 3
            && parts[..parts.len() - 1]
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
            && parts[parts.len() - 1].parse::<u16>().is_ok();
        if !region_ok {
            return Err(crate::ConfigError::invalid(
                "region",
                format!(
                    "{:?} is not a region name like us-east-1 (lowercase words and a number, joined by '-')",
                    self.region
                ),
            ));
        }
        if self.account.len() != 12 || !self.account.chars().all(|c| c.is_ascii_digit()) {
            return Err(crate::ConfigError::invalid(
                "account_id",
                format!("{:?} is not an account id: twelve digits", self.account),
            ));
        }
        Ok(())
    }

    /// `arn:aws:batch:<region>:<account>:<kind>/<name>`
    pub fn arn(&self, kind: &str, name: &str) -> Arn {
        Arn(format!(
            "arn:aws:batch:{}:{}:{}/{}",
            self.region, self.account, kind, name
        ))
    }
}
