//! `muster job logs JOB [--attempt N] [--follow]`: an attempt's output, read through the
//! control plane with CloudWatch Logs' `GetLogEvents` (what `aws logs get-log-events` calls).

use muster_client::BatchClient;
use serde_json::{Value, json};
use std::time::Duration;

pub async fn print(
    client: &BatchClient,
    job_id: &str,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let mut token: Option<String> = None;
    loop {
        let job = describe(client, job_id).await?;
        let stream = stream_of(&job, attempt)?;
        let finished = matches!(job["status"].as_str(), Some("SUCCEEDED" | "FAILED"));
        // Drain what there is, page by page, until the token stops moving.
        loop {
            let mut body = json!({"logGroupName": muster_api::LOG_GROUP,
                                  "logStreamName": stream, "startFromHead": true});
            if let Some(t) = &token {
                body["nextToken"] = json!(t);
            }
            let page = client.call_logs("GetLogEvents", body).await?;
            for event in page["events"].as_array().into_iter().flatten() {
                println!("{}", event["message"].as_str().unwrap_or_default());
            }
            let next = page["nextForwardToken"].as_str().map(str::to_owned);
            if next == token {
                break;
            }
            token = next;
        }
        if !follow || finished {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
