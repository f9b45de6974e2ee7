//! Field checks shared by the API (before proposing) and apply (after commit).

use crate::Rejection;

/// A configuration file (a control node's or an agent's) that cannot be used: it does not
/// parse, or one setting, named, is invalid. One type for both, so that `muster` reports them
/// alike.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot parse config: {0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl ConfigError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// AWS Batch's rule for names of jobs, queues, compute environments and definitions:
/// 1..128 characters, letters, digits, `-` and `_`, starting with a letter or digit.
pub fn name(field: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::new(field, format!("{field} must not be empty")));
    }
    if value.len() > 128 {
        return Err(Rejection::new(
            field,
            format!(
                "{field} must be at most 128 characters long (got {})",
                value.len()
            ),
        ));
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Rejection::new(
            field,
            format!(
                "{field} '{value}' is invalid: it must start with a letter or digit and contain only letters, digits, hyphens and underscores"
            ),
        ));
    }
    Ok(())
}

/// Parses a vCPU amount as AWS writes it (`"2"`, `"0.25"`) into thousandths.
pub fn parse_vcpus(value: &str) -> Option<u64> {
    let v: f64 = value.trim().parse().ok()?;
    if !v.is_finite() || v <= 0.0 || v > 1_000_000.0 {
        return None;
    }
    let milli = (v * 1000.0).round() as u64;
    (milli > 0).then_some(milli)
}

/// An agent's node name (a host name, usually): 1 to 128 letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit. Certificates carry it in a URI.
pub fn node_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a node name: 1 to 128 letters, digits, - _ and ., starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_aws_rules() {
        assert!(name("jobName", "a").is_ok());
        assert!(name("jobName", "A-b_9").is_ok());
        assert!(name("jobName", &"x".repeat(128)).is_ok());
        let long = name("jobName", &"x".repeat(129)).unwrap_err();
        assert!(long.message.contains("jobName") && long.message.contains("128"));
        assert!(name("jobName", "").is_err());
        assert!(name("jobName", "_leading").is_err());
        assert!(name("jobName", "has space").is_err());
        assert!(name("jobName", "ünï").is_err());
    }

    #[test]
    fn vcpus_parse_to_thousandths() {
        assert_eq!(parse_vcpus("2"), Some(2000));
        assert_eq!(parse_vcpus("0.25"), Some(250));
        assert_eq!(parse_vcpus("0"), None);
        assert_eq!(parse_vcpus("-1"), None);
        assert_eq!(parse_vcpus("NaN"), None);
        assert_eq!(parse_vcpus("two"), None);
    }
}
