//! Compute environments (where jobs may run) and job queues (how they wait).

use super::{EnabledState, Extra, Tags};
use crate::{Arn, Timestamp};
use serde::{Deserialize, Serialize};

/// `MANAGED | UNMANAGED`. Muster's agents join UNMANAGED environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CeType {
    Managed,
    Unmanaged,
}

impl CeType {
    pub fn as_aws(self) -> &'static str {
        match self {
            CeType::Managed => "MANAGED",
            CeType::Unmanaged => "UNMANAGED",
        }
    }
}

/// Tag on a compute environment that picks how the planner fills its nodes: `BEST_FIT` (the
/// default: pack) or `SPREAD`.
pub const ALLOCATION_STRATEGY_TAG: &str = "muster:allocation-strategy";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeEnvironment {
    pub name: String,
    pub arn: Arn,
    /// Stable id reported as `uuid`, chosen by the node that accepted the create.
    pub uuid: String,
    pub ce_type: CeType,
    pub state: EnabledState,
    pub unmanaged_vcpus: Option<i64>,
    pub service_role: Option<String>,
    pub tags: Tags,
    pub created_at: Timestamp,
    /// Members Muster stores and echoes but does not act on (`computeResources` of a MANAGED
    /// environment, `eksConfiguration`, `updatePolicy`, `context`), as the user sent them.
    #[serde(default)]
    pub extra: Extra,
}

/// One entry of a queue's `computeEnvironmentOrder`: lower `order` is tried first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeOrder {
    pub order: i64,
    /// Name of the compute environment (resolved from the ARN or name the user gave).
    pub compute_environment: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobQueue {
    pub name: String,
    pub arn: Arn,
    /// Higher is served first among queues that share a compute environment.
    pub priority: i64,
    pub state: EnabledState,
    /// Sorted by `order` ascending when stored.
    pub compute_environment_order: Vec<CeOrder>,
    pub tags: Tags,
    pub created_at: Timestamp,
    #[serde(default)]
    pub scheduling_policy_arn: Option<String>,
    /// `jobStateTimeLimitActions`: what happens to a job that waits RUNNABLE too long.
    #[serde(default)]
    pub time_limit_actions: Vec<TimeLimitAction>,
    /// Members stored and echoed as sent (`jobQueueType`, …).
    #[serde(default)]
    pub extra: Extra,
}

/// One `jobStateTimeLimitActions` entry: a job RUNNABLE for `max_time_seconds` whose wait has
/// `reason` (a [`crate::Blocker`] category, such as `CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY`)
/// is cancelled with that reason. (`state` is always RUNNABLE and `action` always CANCEL on
/// AWS today; both are kept to echo them.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeLimitAction {
    pub reason: String,
    pub state: String,
    pub max_time_seconds: u64,
    pub action: String,
}

/// A fair-share scheduling policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulingPolicy {
    pub name: String,
    pub arn: Arn,
    /// `fairsharePolicy`, with AWS's defaults filled in.
    pub fairshare: Option<FairsharePolicy>,
    pub tags: Tags,
}

/// `fairsharePolicy`. Its serialised form is AWS's (which is also how it was stored before
/// it was typed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FairsharePolicy {
    /// Half-life of past usage; 0 counts only what runs now.
    #[serde(default)]
    pub share_decay_seconds: u64,
    /// Percent of capacity kept for share identifiers that are not active yet (0 to 99).
    #[serde(default)]
    pub compute_reservation: u64,
    /// An identifier ending in `*` is a prefix.
    #[serde(default)]
    pub share_distribution: Vec<ShareWeight>,
}

/// One `shareDistribution` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareWeight {
    pub share_identifier: String,
    #[serde(default = "unit_weight")]
    pub weight_factor: f64,
}

fn unit_weight() -> f64 {
    1.0
}

impl SchedulingPolicy {
    pub fn fairshare_policy(&self) -> FairsharePolicy {
        self.fairshare.clone().unwrap_or_default()
    }
}

impl FairsharePolicy {
    /// The weight factor of `share`: an exact entry, else the longest matching `prefix*`
    /// entry, else 1. A lower weight gets a larger share (AWS's meaning).
    pub fn weight_of(&self, share: &str) -> f64 {
        if let Some(exact) = self
            .share_distribution
            .iter()
            .find(|w| w.share_identifier == share)
        {
            return exact.weight_factor;
        }
        self.share_distribution
            .iter()
            .filter_map(|w| {
                let prefix = w.share_identifier.strip_suffix('*')?;
                share
                    .starts_with(prefix)
                    .then_some((prefix.len(), w.weight_factor))
            })
            .max_by_key(|(len, _)| *len)
            .map_or(1.0, |(_, w)| w)
    }
}

/// What a share identifier has used, in millicpu-seconds (1000 per vCPU-second), decayed to
/// `as_of` with the policy's half-life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareUsage {
    pub millicpu_seconds: u64,
    pub as_of: Timestamp,
}

impl ShareUsage {
    /// The usage as it stands at `at`: halved every `half_life_secs` (linearly between
    /// halvings, so that every node computes the same integer).
    pub fn decayed_to(&self, at: Timestamp, half_life_secs: u64) -> u64 {
        if half_life_secs == 0 {
            return 0;
        }
        let half_ms = half_life_secs.saturating_mul(1000);
        let elapsed = at.as_millis().saturating_sub(self.as_of.as_millis());
        let halvings = elapsed / half_ms;
        if halvings >= 64 {
            return 0;
        }
        let v = self.millicpu_seconds >> halvings;
        let into = elapsed % half_ms;
        // 2^-x ≈ 1 - x/2 on [0, 1): within 6% of the curve, and exact at every halving.
        v - ((v as u128 * into as u128) / (2 * half_ms as u128)) as u64
    }

    /// This usage decayed to `at` plus `millicpu_seconds` more.
    pub fn add(&self, millicpu_seconds: u64, at: Timestamp, half_life_secs: u64) -> ShareUsage {
        ShareUsage {
            millicpu_seconds: self
                .decayed_to(at, half_life_secs)
                .saturating_add(millicpu_seconds),
            as_of: at,
        }
    }
}

#[cfg(test)]
mod fairshare_tests {
    use super::*;

    #[test]
    fn a_policy_stored_as_aws_json_reads_back_typed() {
        // How snapshots held a policy before it was typed: AWS's `fairsharePolicy` as sent.
        let stored = serde_json::json!({
            "name": "p", "arn": "arn:aws:batch:us-east-1:000000000000:scheduling-policy/p",
            "fairshare": {"shareDecaySeconds": 3600, "computeReservation": 5,
                          "shareDistribution": [{"shareIdentifier": "team*", "weightFactor": 0.5},
                                                {"shareIdentifier": "ops"}]},
            "tags": {}
        });
        let policy: SchedulingPolicy = serde_json::from_value(stored).unwrap();
        let fair = policy.fairshare_policy();
        assert_eq!(fair.share_decay_seconds, 3600);
        assert_eq!(fair.compute_reservation, 5);
        assert_eq!(fair.weight_of("teamA"), 0.5);
        assert_eq!(fair.weight_of("ops"), 1.0);
        assert_eq!(fair.weight_of("other"), 1.0);
    }
}
