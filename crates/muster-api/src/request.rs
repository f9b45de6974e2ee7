//! Parsing request bodies and the small shapes several operations share.

use crate::ApiError;
use muster_core::{ResourceRequirement, ResourceType, Tags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Parses a JSON body into `T`. A type error names the path of the offending member
/// (`containerProperties.vcpus`); an empty body counts as `{}` as botocore sends it.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::client(format!("request body is not valid JSON: {inner}"))
        } else if path == "." {
            // serde names a missing member itself: "missing field `jobName`".
            ApiError::client(
                inner
                    .to_string()
                    .replace("missing field", "missing required field"),
            )
        } else {
            ApiError::client(format!("{path}: {inner}"))
        }
    })
}

/// The request's members other than `typed` ones, kept verbatim to be echoed back.
pub(crate) fn extra(body: &[u8], typed: &[&str]) -> muster_core::Extra {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter(|(k, v)| !typed.contains(&k.as_str()) && !v.is_null())
            .collect(),
        _ => Default::default(),
    }
}

/// A describe answer: the typed `shape` Muster computes, plus every stored member it does not
/// compute (`extra`). Objects present in both are merged one level deep, Muster's fields
/// winning (so `containerProperties` keeps members like `volumes` as the user sent them).
pub(crate) fn echo(extra: &muster_core::Extra, shape: impl Serialize) -> serde_json::Value {
    let mut out = serde_json::to_value(shape).unwrap_or_default();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    for (k, v) in extra {
        match (obj.get_mut(k), v) {
            (Some(serde_json::Value::Object(ours)), serde_json::Value::Object(theirs)) => {
                for (ik, iv) in theirs {
                    ours.entry(ik.clone()).or_insert_with(|| iv.clone());
                }
            }
            (Some(_), _) => {}
            (None, _) => {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Fills the lists AWS always returns in a container's description with `[]` where the
/// definition left them out (`containerProperties` in DescribeJobDefinitions, `container` in
/// DescribeJobs): clients index them without looking first.
pub(crate) fn with_container_lists(described: &mut serde_json::Value, key: &str) {
    if let Some(container) = described.get_mut(key) {
        add_container_lists(container);
    }
}

/// As [`with_container_lists`], on the container object itself.
pub(crate) fn add_container_lists(container: &mut serde_json::Value) {
    if let Some(container) = container.as_object_mut() {
        for list in [
            "environment",
            "mountPoints",
            "secrets",
            "ulimits",
            "volumes",
        ] {
            container
                .entry(list)
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        }
    }
}

/// Fails unless `value` is present and non-empty.
pub(crate) fn required<'a>(field: &str, value: &'a Option<String>) -> Result<&'a str, ApiError> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::client(format!("{field} is required"))),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct KeyValuePair {
    pub name: Option<String>,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct ResourceRequirementShape {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub value: String,
}

/// Validates `environment` entries: each needs a name, and `AWS_BATCH*` names are reserved.
pub(crate) fn environment(
    field: &str,
    entries: &[KeyValuePair],
) -> Result<Vec<(String, String)>, ApiError> {
    entries
        .iter()
        .map(|kv| {
            let name = kv.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                ApiError::client(format!("{field}.name is required for every environment variable"))
            })?;
            if name.starts_with("AWS_BATCH") {
                return Err(ApiError::client(format!(
                    "{field}.name: {name} is reserved; names starting with AWS_BATCH are set by Muster"
                )));
            }
            Ok((name, kv.value.clone().unwrap_or_default()))
        })
        .collect()
}

/// Validates `resourceRequirements`: known types, each at most once, sensible values.
pub(crate) fn resource_requirements(
    field: &str,
    shapes: &[ResourceRequirementShape],
) -> Result<Vec<ResourceRequirement>, ApiError> {
    let mut out: Vec<ResourceRequirement> = Vec::new();
    for shape in shapes {
        let Some(resource_type) = ResourceType::parse(&shape.resource_type) else {
            return Err(ApiError::client(format!(
                "{field}.type: {} must be one of VCPU | MEMORY | GPU",
                shape.resource_type
            )));
        };
        if out.iter().any(|r| r.resource_type == resource_type) {
            return Err(ApiError::client(format!(
                "{field}.type: {} is given twice",
                shape.resource_type
            )));
        }
        let value = shape.value.trim();
        let ok = match resource_type {
            ResourceType::Vcpu => muster_core::validate::parse_vcpus(value).is_some(),
            ResourceType::Memory => value.parse::<u64>().is_ok_and(|m| m >= 4),
            ResourceType::Gpu => value.parse::<u32>().is_ok_and(|g| g >= 1),
        };
        if !ok {
            let rule = match resource_type {
                ResourceType::Vcpu => "a positive number of vCPUs",
                ResourceType::Memory => "a whole number of MiB, at least 4",
                ResourceType::Gpu => "a whole number of GPUs, at least 1",
            };
            return Err(ApiError::client(format!(
                "{field}.value: {} for {} must be {rule}",
                shape.value, shape.resource_type
            )));
        }
        out.push(ResourceRequirement {
            resource_type,
            value: value.to_owned(),
        });
    }
    out.sort_by_key(|r| r.resource_type);
    Ok(out)
}

pub(crate) fn requirement_shapes(reqs: &[ResourceRequirement]) -> Vec<ResourceRequirementShape> {
    reqs.iter()
        .map(|r| ResourceRequirementShape {
            resource_type: r.resource_type.as_aws().to_owned(),
            value: r.value.clone(),
        })
        .collect()
}

/// Validates tags as AWS limits them.
pub(crate) fn tags(field: &str, tags: Option<Tags>) -> Result<Tags, ApiError> {
    let tags = tags.unwrap_or_default();
    if tags.len() > 50 {
        return Err(ApiError::client(format!(
            "{field}: at most 50 tags are allowed (got {})",
            tags.len()
        )));
    }
    for (k, v) in &tags {
        if k.is_empty() || k.len() > 128 {
            return Err(ApiError::client(format!(
                "{field}: tag key '{k}' must be 1 to 128 characters"
            )));
        }
        if v.len() > 256 {
            return Err(ApiError::client(format!(
                "{field}: value of tag '{k}' must be at most 256 characters"
            )));
        }
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(ApiError::client(format!(
                "{field}: tag key '{k}' uses the reserved prefix aws:"
            )));
        }
    }
    Ok(tags)
}

/// Page size: `maxResults` within `1..=max`, `max` when absent.
pub(crate) fn page_size(max_results: Option<i64>, max: usize) -> Result<usize, ApiError> {
    match max_results {
        None => Ok(max),
        Some(n) if n >= 1 && n as usize <= max => Ok(n as usize),
        Some(n) => Err(ApiError::client(format!(
            "maxResults: {n} must be between 1 and {max}"
        ))),
    }
}

/// One page of a describe over named resources: those named in `wanted` (by name or ARN; all
/// when it is empty), in name order, after the `after` token, at most `limit`. Returns the
/// page and the token for the next one (absent on the last page, as botocore expects).
pub(crate) fn named_page<'a, T: 'a>(
    items: impl Iterator<Item = &'a T>,
    name_and_arn: impl Fn(&T) -> (&str, &str),
    wanted: &[String],
    after: Option<&str>,
    limit: usize,
    show: impl Fn(&T) -> serde_json::Value,
) -> (Vec<serde_json::Value>, Option<String>) {
    let mut matching = items
        .filter(|item| {
            let (name, arn) = name_and_arn(item);
            wanted.is_empty() || wanted.iter().any(|w| w == name || w == arn)
        })
        .filter(|item| after.is_none_or(|a| name_and_arn(item).0 > a));
    let page: Vec<&T> = matching.by_ref().take(limit).collect();
    let token = page
        .last()
        .filter(|_| matching.next().is_some())
        .map(|last| name_and_arn(last).0.to_owned());
    (page.into_iter().map(show).collect(), token)
}

/// A paginated answer: `items` under `key`, and `nextToken` only when there is another page.
pub(crate) fn page_answer(
    key: &str,
    items: impl Serialize,
    token: Option<String>,
) -> serde_json::Value {
    let mut out = serde_json::json!({ key: items });
    if let Some(token) = token {
        out["nextToken"] = serde_json::json!(token);
    }
    out
}

/// A resource that Describe operations name by name or ARN and page through by name.
pub(crate) trait Named: Sized + 'static {
    /// The request member that names them (`computeEnvironments`, `jobQueues`), which is also
    /// the answer's.
    const FIELD: &'static str;
    /// The IAM action a Describe needs.
    const DESCRIBE_ACTION: &'static str;
    fn all(state: &muster_core::State) -> impl Iterator<Item = &Self>;
    fn name_and_arn(&self) -> (&str, &str);
    fn show(&self, state: &muster_core::State) -> serde_json::Value;
}

/// DescribeComputeEnvironments, DescribeJobQueues: those the request (`R`, read by `paging`)
/// names (every one when it names none), at most 100 named at once, a page of `max_results` after `next_token`, read
/// linearizably.
pub(crate) async fn describe_named<T: Named, R: DeserializeOwned, P: crate::ControlPlane>(
    plane: &P,
    caller: &crate::Principal,
    body: &[u8],
    paging: impl FnOnce(R) -> (Option<Vec<String>>, Option<i64>, Option<String>),
) -> Result<serde_json::Value, ApiError> {
    caller.authorize(T::DESCRIBE_ACTION, &["*"])?;
    let (wanted, max_results, next_token) = paging(parse(body)?);
    let wanted = wanted.unwrap_or_default();
    if wanted.len() > 100 {
        return Err(ApiError::client(format!(
            "{}: at most 100 may be described at once",
            T::FIELD
        )));
    }
    let limit = page_size(max_results, 100)?;
    let (page, token) = plane
        .read(move |s| {
            named_page(
                T::all(s),
                T::name_and_arn,
                &wanted,
                next_token.as_deref(),
                limit,
                |item| item.show(s),
            )
        })
        .await
        .map_err(ApiError::from)?;
    Ok(page_answer(T::FIELD, page, token))
}
