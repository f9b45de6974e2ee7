//! TagResource, UntagResource, ListTagsForResource on `/v1/tags/{resourceArn}`.

use crate::request::{parse, tags};
use crate::{ApiError, ControlPlane, Principal, check_and_propose};
use muster_core::{AdminCommand, Command, Tags};
use serde::Deserialize;
use serde_json::{Value, json};

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

pub(crate) async fn dispatch<P: ControlPlane>(
    plane: &P,
    caller: &Principal,
    method: &str,
    arn: &str,
    query: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    match method {
        "GET" => {
            caller.authorize("batch:ListTagsForResource", &[arn])?;
            let wanted = arn.to_owned();
            let found = plane
                .read(move |s| {
                    s.tags_of(&wanted).cloned().or_else(|| {
                        // An ended job that left memory: its tags are in the archive.
                        let (_, id) = wanted.rsplit_once(":job/")?;
                        let id = muster_core::JobId::from(id);
                        s.ended_job(&id)?;
                        Some(s.find_job(&id)?.reported_tags().clone())
                    })
                })
                .await
                .map_err(ApiError::from)?;
            let tags = found.ok_or_else(|| {
                ApiError::client(format!(
                    "resourceArn: {arn} does not name a taggable resource"
                ))
            })?;
            Ok(json!({ "tags": tags }))
        }
        "POST" => {
            #[derive(Deserialize)]
            struct TagRequest {
                tags: Option<Tags>,
            }
            caller.authorize("batch:TagResource", &[arn])?;
            let req: TagRequest = parse(body)?;
            let tags = tags("tags", req.tags)?;
            if tags.is_empty() {
                return Err(ApiError::client("tags: at least one tag is required"));
            }
            check_and_propose(
                plane,
                Command::Admin(AdminCommand::TagResource {
                    arn: arn.to_owned(),
                    tags,
                }),
            )
            .await?;
            Ok(json!({}))
        }
        "DELETE" => {
            caller.authorize("batch:UntagResource", &[arn])?;
            let keys: Vec<String> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| *k == "tagKeys")
                .map(|(_, v)| percent_decode(&v.replace('+', " ")))
                .collect();
            if keys.is_empty() || keys.len() > 50 {
                return Err(ApiError::client("tagKeys: give 1 to 50 tag keys"));
            }
            check_and_propose(
                plane,
                Command::Admin(AdminCommand::UntagResource {
                    arn: arn.to_owned(),
                    keys,
                }),
            )
            .await?;
            Ok(json!({}))
        }
        other => Err(ApiError::client(format!("{other} is not a tag operation"))),
    }
}
