//! `muster job logs JOB [--attempt N] [--follow]`: an attempt's output, read through the
//! control plane with CloudWatch Logs' `GetLogEvents` (what `aws logs get-log-events` calls).
//!
//! An array's parent and a multi-node job's parent run nothing themselves and, as in AWS
//! Batch, have no log stream of their own: for one, the output of each child (or node) is
//! printed in index order under a `==> ID <==` line (as `tail` heads each file), and
//! `--follow` follows each to its end in turn.

use muster_client::BatchClient;
use serde_json::{Value, json};
use std::time::Duration;

pub async fn print(
    client: &BatchClient,
    job_id: &str,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let job = describe(client, job_id).await?;
    let Some(family) = Family::of(&job) else {
        return print_job(client, job, attempt, follow).await;
    };
    for child in family.members(client, job_id).await? {
        println!("==> {child} <==");
        let job = describe(client, &child).await?;
        // A child that ended without running (its array cancelled, a dependency failed)
        // has no output, followed or not.
        let ended = matches!(job["status"].as_str(), Some("SUCCEEDED" | "FAILED"));
        if (!follow || ended) && stream_of(&job, attempt).is_err() {
            println!(
                "(no output: {})",
                job["status"].as_str().unwrap_or_default()
            );
            continue;
        }
        print_job(client, job, attempt, follow).await?;
    }
    Ok(())
}

/// Prints one job's output; with `follow`, until it ends.
async fn print_job(
    client: &BatchClient,
    mut job: Value,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let job_id = job["jobId"].as_str().unwrap_or_default().to_owned();
    // The stream being read, and where its reading got to.
    let mut reading: Option<(String, Option<String>)> = None;
    loop {
        let finished = matches!(job["status"].as_str(), Some("SUCCEEDED" | "FAILED"));
        let stream = match stream_of(&job, attempt) {
            Ok(stream) => Some(stream),
            // Followed, a job that has not started yet is waited for.
            Err(_) if follow && !finished => None,
            Err(e) => return Err(e),
        };
        let group = log_group(&job);
        if let Some(stream) = stream {
            match &mut reading {
                Some((name, token)) if *name == stream => {
                    drain(client, &group, name, token).await?
                }
                _ => {
                    // A retry writes a stream of its own: the last attempt's is read to its
                    // end first, then the new one from its start.
                    if let Some((name, token)) = &mut reading {
                        drain(client, &group, name, token).await?;
                    }
                    let mut token = None;
                    drain(client, &group, &stream, &mut token).await?;
                    reading = Some((stream, token));
                }
            }
        }
        if !follow || finished {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        job = describe(client, &job_id).await?;
    }
}

/// Prints what `stream` holds past `token`, page by page, until the token stops moving.
async fn drain(
    client: &BatchClient,
    group: &str,
    stream: &str,
    token: &mut Option<String>,
) -> anyhow::Result<()> {
    loop {
        let mut body = json!({"logGroupName": group, "logStreamName": stream,
                              "startFromHead": true});
        if let Some(t) = token.as_ref() {
            body["nextToken"] = json!(t);
        }
        let page = client.call_logs("GetLogEvents", body).await?;
        for event in page["events"].as_array().into_iter().flatten() {
            println!("{}", event["message"].as_str().unwrap_or_default());
        }
        let next = page["nextForwardToken"].as_str().map(str::to_owned);
        if next == *token {
            return Ok(());
        }
        *token = next;
    }
}

/// The log group of a job's streams, as DescribeJobs echoes its definition's
/// `logConfiguration`: its `awslogs-group` with the `awslogs` driver, else Batch's own.
fn log_group(job: &Value) -> String {
    let config = &job["container"]["logConfiguration"];
    match config["options"]["awslogs-group"].as_str() {
        Some(group) if config["logDriver"] == "awslogs" => group.to_owned(),
        _ => muster_api::LOG_GROUP.to_owned(),
    }
}

async fn describe(client: &BatchClient, job_id: &str) -> anyhow::Result<Value> {
    let answer = client
        .call("DescribeJobs", json!({ "jobs": [job_id] }))
        .await?;
    answer["jobs"]
        .as_array()
        .and_then(|jobs| jobs.first())
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("job {job_id} does not exist"))
}

/// A job that runs nothing itself: its members do.
enum Family {
    /// An array's parent: its children.
    Array,
    /// A multi-node job's parent: its nodes.
    MultiNode,
}

impl Family {
    /// An array's parent carries the children's `statusSummary` (a child, its `index`); a
    /// multi-node job's parent carries `nodeProperties` and no `nodeDetails` (a node both).
    fn of(job: &Value) -> Option<Self> {
        if job["arrayProperties"]["statusSummary"].is_object() {
            Some(Family::Array)
        } else if job["nodeProperties"].is_object() && job["nodeDetails"].is_null() {
            Some(Family::MultiNode)
        } else {
            None
        }
    }

    /// The ids of its members, in index order (ListJobs by `arrayJobId` or `multiNodeJobId`,
    /// every page).
    async fn members(&self, client: &BatchClient, parent: &str) -> anyhow::Result<Vec<String>> {
        let (by, index) = match self {
            Family::Array => ("arrayJobId", "arrayProperties"),
            Family::MultiNode => ("multiNodeJobId", "nodeProperties"),
        };
        let mut members = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // A filter lists every status (without one, ListJobs lists RUNNING jobs only).
            let mut body = json!({ by: parent, "maxResults": 100,
                                   "filters": [{"name": "AFTER_CREATED_AT", "values": ["0"]}] });
            if let Some(t) = &token {
                body["nextToken"] = json!(t);
            }
            let page = client.call("ListJobs", body).await?;
            for summary in page["jobSummaryList"].as_array().into_iter().flatten() {
                let at = &summary[index];
                let position = at["index"]
                    .as_u64()
                    .or(at["nodeIndex"].as_u64())
                    .unwrap_or(0);
                if let Some(id) = summary["jobId"].as_str() {
                    members.push((position, id.to_owned()));
                }
            }
            token = page["nextToken"].as_str().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        members.sort();
        Ok(members.into_iter().map(|(_, id)| id).collect())
    }
}

/// The log stream of `attempt` (1-based), or of the latest attempt.
fn stream_of(job: &Value, attempt: Option<u32>) -> anyhow::Result<String> {
    let stream = match attempt {
        None => job["container"]["logStreamName"].as_str(),
        Some(n) => job["attempts"]
            .as_array()
            .and_then(|a| a.get((n as usize).checked_sub(1)?))
            .and_then(|a| a["container"]["logStreamName"].as_str())
            .or_else(|| {
                // The attempt running now is not among the ended ones yet.
                let ended = job["attempts"].as_array().map_or(0, Vec::len);
                (n as usize == ended + 1)
                    .then(|| job["container"]["logStreamName"].as_str())
                    .flatten()
            }),
    };
    stream.map(str::to_owned).ok_or_else(|| {
        anyhow::anyhow!(
            "job {} has no output yet (status {})",
            job["jobId"].as_str().unwrap_or_default(),
            job["status"].as_str().unwrap_or_default()
        )
    })
}
