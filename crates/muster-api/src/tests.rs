//! The API layer over a single in-process state machine (no Raft): request parsing,
//! validation messages, and "nothing is written on bad input". Cluster behaviour is tested
//! end to end in `tests/`.

use super::*;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tower::ServiceExt;

#[derive(Default)]
struct LocalPlane {
    state: Mutex<State>,
    ids: AtomicU64,
    proposals: AtomicU64,
}

impl ControlPlane for Arc<LocalPlane> {
    async fn propose(&self, command: Command) -> Result<Outcome, String> {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        Ok(self.state.lock().unwrap().apply(command))
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, String> {
        Ok(f(&self.state.lock().unwrap()))
    }

    fn now(&self) -> Timestamp {
        Timestamp(1_700_000_000_000 + self.ids.load(Ordering::SeqCst))
    }

    fn new_id(&self) -> String {
        format!("id-{}", self.ids.fetch_add(1, Ordering::SeqCst))
    }
}

async fn call(app: &Router, op: &str, body: Value) -> (u16, Value, Option<String>) {
    let req = Request::post(format!("/v1/{op}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("x-amzn-ErrorType")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        kind,
    )
}

async fn setup() -> (Router, Arc<LocalPlane>) {
    let plane = Arc::new(LocalPlane::default());
    let app = router(plane.clone(), &ApiConfig::default());
    let ok = |r: (u16, Value, Option<String>)| assert_eq!(r.0, 200, "{:?}", r.1);
    ok(call(
        &app,
        "createcomputeenvironment",
        json!({"computeEnvironmentName": "ce", "type": "UNMANAGED"}),
    )
    .await);
    ok(call(
        &app,
        "createjobqueue",
        json!({"jobQueueName": "q", "priority": 1, "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": "ce"}]}),
    )
    .await);
    ok(call(
        &app,
        "registerjobdefinition",
        json!({"jobDefinitionName": "d", "type": "container",
               "containerProperties": {"image": "busybox", "command": ["true"], "vcpus": 1, "memory": 64}}),
    )
    .await);
    (app, plane)
}

#[tokio::test]
async fn bad_input_is_a_client_exception_naming_the_field_and_writes_nothing() {
    let (app, plane) = setup().await;
    let before = plane.proposals.load(Ordering::SeqCst);
    let base = json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d"});
    let cases = [
        (json!({"jobQueue": "q", "jobDefinition": "d"}), "jobName"),
        (
            json!({"jobName": "x".repeat(129), "jobQueue": "q", "jobDefinition": "d"}),
            "jobName",
        ),
        (
            json!({"jobName": "_x", "jobQueue": "q", "jobDefinition": "d"}),
            "jobName",
        ),
        (
            json!({"jobName": "j", "jobQueue": "nope", "jobDefinition": "d"}),
            "jobQueue",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "nope"}),
            "jobDefinition",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d:7"}),
            "jobDefinition",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "containerOverrides": {"vcpus": 0}}),
            "containerOverrides.vcpus",
        ),
        (
            json!({"jobName": 5, "jobQueue": "q", "jobDefinition": "d"}),
            "jobName",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "containerOverrides": {"resourceRequirements": [{"type": "VCPU", "value": "0"}]}}),
            "containerOverrides.resourceRequirements",
        ),
        (
            json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "containerOverrides": {"environment": [{"name": "AWS_BATCH_X", "value": "1"}]}}),
            "containerOverrides.environment",
        ),
    ];
    for (body, field) in cases {
        let (status, body_out, kind) = call(&app, "submitjob", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {body_out}");
        assert_eq!(kind.as_deref(), Some("ClientException"));
        assert_eq!(body_out["__type"], "ClientException");
        let message = body_out["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "message {message:?} should name {field}"
        );
    }
    let (status, _, _) = call(
        &app,
        "registerjobdefinition",
        json!({"jobDefinitionName": "z", "type": "container", "containerProperties": {"image": "i", "vcpus": 0, "memory": 64}}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        plane.proposals.load(Ordering::SeqCst),
        before,
        "a refused request reached the log"
    );
    assert_eq!(plane.state.lock().unwrap().job_count(), 0);
    let (status, _, _) = call(&app, "submitjob", base).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn garbage_never_answers_5xx() {
    let (app, _) = setup().await;
    let ops = [
        "createcomputeenvironment",
        "describecomputeenvironments",
        "createjobqueue",
        "describejobqueues",
        "registerjobdefinition",
        "describejobdefinitions",
        "submitjob",
        "describejobs",
        "listjobs",
        "terminatejob",
        "nosuchoperation",
    ];
    let bodies = [
        json!(null),
        json!([]),
        json!("s"),
        json!(1),
        json!({"jobs": "x"}),
        json!({"maxResults": -1}),
        json!({"computeEnvironmentOrder": [{}]}),
        json!({"containerProperties": []}),
        json!({"jobQueue": {}}),
        json!({"jobStatus": "NOPE", "jobQueue": "q"}),
        json!({"nextToken": "zz", "jobQueue": "q"}),
    ];
    for op in ops {
        for body in &bodies {
            let (status, out, _) = call(&app, op, body.clone()).await;
            assert!(status < 500, "{op} {body} answered {status} {out}");
        }
        let req = Request::post(format!("/v1/{op}"))
            .body(Body::from("{not json"))
            .unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 400);
    }
}

#[tokio::test]
async fn describe_and_list_echo_what_was_stored() {
    let (app, _) = setup().await;
    let (_, submitted, _) = call(
        &app,
        "submitjob",
        json!({"jobName": "j1", "jobQueue": "q", "jobDefinition": "d:1",
               "containerOverrides": {"command": ["echo", "hi"], "environment": [{"name": "A", "value": "1"}]}}),
    )
    .await;
    let id = submitted["jobId"].as_str().unwrap().to_owned();
    assert_eq!(
        submitted["jobArn"],
        format!("arn:aws:batch:us-east-1:000000000000:job/{id}")
    );
    let (_, described, _) = call(&app, "describejobs", json!({"jobs": [id, "unknown"]})).await;
    let job = &described["jobs"][0];
    assert_eq!(described["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(job["status"], "RUNNABLE");
    assert_eq!(job["container"]["command"], json!(["echo", "hi"]));
    assert_eq!(
        job["container"]["environment"],
        json!([{"name": "A", "value": "1"}])
    );
    assert_eq!(
        job["jobQueue"],
        "arn:aws:batch:us-east-1:000000000000:job-queue/q"
    );
    assert_eq!(
        job["jobDefinition"],
        "arn:aws:batch:us-east-1:000000000000:job-definition/d:1"
    );
    let (_, listed, _) = call(
        &app,
        "listjobs",
        json!({"jobQueue": "q", "jobStatus": "RUNNABLE"}),
    )
    .await;
    assert_eq!(listed["jobSummaryList"][0]["jobName"], "j1");
    let (_, running, _) = call(&app, "listjobs", json!({"jobQueue": "q"})).await;
    assert_eq!(
        running["jobSummaryList"],
        json!([]),
        "without jobStatus only RUNNING jobs are listed"
    );
}

#[tokio::test]
async fn pages_cover_every_job_once() {
    let (app, _) = setup().await;
    for i in 0..25 {
        call(
            &app,
            "submitjob",
            json!({"jobName": format!("j{i}"), "jobQueue": "q", "jobDefinition": "d"}),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut body = json!({"jobQueue": "q", "jobStatus": "RUNNABLE", "maxResults": 10});
        if let Some(t) = &token {
            body["nextToken"] = json!(t);
        }
        let (_, page, _) = call(&app, "listjobs", body).await;
        seen.extend(
            page["jobSummaryList"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["jobName"].as_str().unwrap().to_owned()),
        );
        match page.get("nextToken") {
            Some(t) => token = Some(t.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("j{i}")).collect();
    assert_eq!(seen, expected);
}
