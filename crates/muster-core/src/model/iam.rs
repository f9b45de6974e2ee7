//! Users, access keys and policies: who may call the API, and what they may do.
//!
//! Policies use IAM's grammar — `Effect`, `Action`, `Resource`, with `*` and `?` wildcards —
//! and IAM's evaluation: an explicit Deny wins, otherwise an Allow is needed, otherwise deny.

use crate::{Rejection, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub effect: Effect,
    /// `batch:SubmitJob`, `batch:*`, `*` — matched case-insensitively.
    pub actions: Vec<String>,
    /// ARN patterns with `*` and `?`.
    pub resources: Vec<String>,
}

/// A parsed policy, with the document as the user wrote it (echoed back by the IAM CLI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub document: String,
    pub statements: Vec<Statement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No statement allowed it.
    ImplicitDeny,
    /// A statement denied it.
    ExplicitDeny,
}

fn one_or_many(field: &str, value: Option<&serde_json::Value>) -> Result<Vec<String>, Rejection> {
    let bad = || {
        Rejection::new(
            "policyDocument",
            format!("policyDocument: {field} must be a string or a list of strings"),
        )
    };
    match value {
        Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
        Some(serde_json::Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

impl Policy {
    /// Parses an IAM policy document. `NotAction`, `NotResource`, `Principal` and `Condition`
    /// are refused rather than ignored, so that a policy never grants more than it reads.
    pub fn parse(document: &str) -> Result<Policy, Rejection> {
        let invalid =
            |why: String| Rejection::new("policyDocument", format!("policyDocument: {why}"));
        let value: serde_json::Value =
            serde_json::from_str(document).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let statements = match value.get("Statement") {
            Some(serde_json::Value::Array(s)) => s.clone(),
            Some(single @ serde_json::Value::Object(_)) => vec![single.clone()],
            _ => {
                return Err(invalid(
                    "Statement must be an object or a list of objects".into(),
                ));
            }
        };
        let statements = statements
            .iter()
            .map(|s| {
                let obj = s
                    .as_object()
                    .ok_or_else(|| invalid("each Statement must be an object".into()))?;
                for key in obj.keys() {
                    if !matches!(key.as_str(), "Effect" | "Action" | "Resource" | "Sid") {
                        return Err(invalid(format!(
                            "{key} is not supported in a Muster policy"
                        )));
                    }
                }
                let effect = match obj.get("Effect").and_then(|e| e.as_str()) {
                    Some("Allow") => Effect::Allow,
                    Some("Deny") => Effect::Deny,
                    _ => return Err(invalid("Effect must be Allow or Deny".into())),
                };
                Ok(Statement {
                    effect,
                    actions: one_or_many("Action", obj.get("Action"))?,
                    resources: one_or_many("Resource", obj.get("Resource"))?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            document: document.to_owned(),
            statements,
        })
    }
}

/// IAM evaluation over every policy of a user.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    action: &str,
    resource: &str,
) -> Decision {
    let mut allowed = false;
    for statement in policies.into_iter().flat_map(|p| &p.statements) {
        let action_matches = statement
            .actions
            .iter()
            .any(|a| glob(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()));
        if !action_matches || !statement.resources.iter().any(|r| glob(r, resource)) {
            continue;
        }
        match statement.effect {
            Effect::Deny => return Decision::ExplicitDeny,
            Effect::Allow => allowed = true,
        }
    }
    if allowed {
        Decision::Allow
    } else {
        Decision::ImplicitDeny
    }
}

/// `*` matches any run of characters (including none), `?` exactly one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyStatus {
    Active,
    Inactive,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    pub id: String,
    /// Needed to verify signatures (SigV4 is symmetric); never returned after creation.
    pub secret: String,
    pub user: String,
    pub status: KeyStatus,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    /// `AIDA…`, chosen by the node that accepted the create.
    pub user_id: String,
    pub arn: String,
    pub created_at: Timestamp,
    /// Inline policies by name.
    pub policies: BTreeMap<String, Policy>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_iam() {
        assert!(glob("*", ""));
        assert!(glob(
            "arn:aws:batch:*:*:job-queue/prod-*",
            "arn:aws:batch:us-east-1:1:job-queue/prod-a"
        ));
        assert!(!glob(
            "arn:aws:batch:*:*:job-queue/prod-*",
            "arn:aws:batch:us-east-1:1:job-queue/dev"
        ));
        assert!(glob("batch:Describe*", "batch:DescribeJobs"));
        assert!(glob("a?c", "abc") && !glob("a?c", "ac"));
        assert!(glob("*a*b*", "xxaxxbxx") && !glob("*a*b*", "xxbxxaxx"));
    }

    #[test]
    fn explicit_deny_wins_and_default_is_deny() {
        let p = Policy::parse(
            r#"{"Version":"2012-10-17","Statement":[
                {"Effect":"Allow","Action":"batch:*","Resource":"*"},
                {"Effect":"Deny","Action":["batch:SubmitJob"],"Resource":"arn:aws:batch:*:*:job-queue/prod"}]}"#,
        )
        .unwrap();
        assert_eq!(
            evaluate([&p], "batch:SubmitJob", "arn:aws:batch:r:a:job-queue/dev"),
            Decision::Allow
        );
        assert_eq!(
            evaluate([&p], "batch:submitjob", "arn:aws:batch:r:a:job-queue/prod"),
            Decision::ExplicitDeny
        );
        assert_eq!(
            evaluate([&p], "iam:CreateUser", "arn:aws:iam::a:user/x"),
            Decision::ImplicitDeny
        );
        assert_eq!(
            evaluate(std::iter::empty(), "batch:DescribeJobs", "*"),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn policies_that_would_read_wider_than_written_are_refused() {
        for bad in [
            "not json",
            r#"{"Statement":[{"Effect":"Allow","NotAction":"batch:*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"batch:*","Resource":"*","Condition":{}}]}"#,
            r#"{"Statement":[{"Effect":"Maybe","Action":"batch:*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":[],"Resource":"*"}]}"#,
        ] {
            let err = Policy::parse(bad).unwrap_err();
            assert!(
                err.message.starts_with("policyDocument"),
                "{bad}: {}",
                err.message
            );
        }
    }
}
