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

const ROOT_KEY: (&str, &str) = ("AKIAROOTROOTROOTROOT", "root-secret");
const NOW_MS: u64 = 1_795_656_225_000;

#[derive(Default)]
struct LocalPlane {
    state: Mutex<State>,
    ids: AtomicU64,
    proposals: AtomicU64,
}

impl ControlPlane for Arc<LocalPlane> {
    async fn propose(&self, command: Command) -> Result<Outcome, crate::PlaneError> {
        self.proposals.fetch_add(1, Ordering::SeqCst);
        Ok(self.state.lock().unwrap().apply(command))
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> R + Send + 'static,
    ) -> Result<R, crate::PlaneError> {
        Ok(f(&self.state.lock().unwrap()))
    }

    fn read_local<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state.lock().unwrap())
    }

    fn now(&self) -> Timestamp {
        Timestamp(NOW_MS)
    }

    fn new_id(&self) -> String {
        format!("id-{}", self.ids.fetch_add(1, Ordering::SeqCst))
    }
}

/// A request signed by `key` at `signed_at` (seconds), as botocore would sign it.
fn signed(
    path: &str,
    body: &str,
    key: (&str, &str),
    service: &str,
    signed_at: u64,
) -> Request<Body> {
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("host".to_owned(), "muster".to_owned()),
    ];
    let extra = muster_sigv4::sign(
        &muster_sigv4::Request {
            method: "POST",
            path,
            query: "",
            headers: &headers,
            body: body.as_bytes(),
        },
        key.0,
        key.1,
        "us-east-1",
        service,
        &muster_sigv4::format_amz_date(signed_at),
    );
    let mut req = Request::post(path);
    for (n, v) in headers.iter().chain(&extra) {
        req = req.header(n, v);
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (u16, Value, Option<String>) {
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

async fn call_as(
    app: &Router,
    key: (&str, &str),
    op: &str,
    body: Value,
) -> (u16, Value, Option<String>) {
    send(
        app,
        signed(
            &format!("/v1/{op}"),
            &body.to_string(),
            key,
            "batch",
            NOW_MS / 1000,
        ),
    )
    .await
}

async fn call(app: &Router, op: &str, body: Value) -> (u16, Value, Option<String>) {
    call_as(app, ROOT_KEY, op, body).await
}

fn user_with_policy(state: &mut State, name: &str, key: (&str, &str), policy: &str) {
    for cmd in [
        muster_core::IamCommand::CreateUser {
            name: name.into(),
            user_id: format!("AIDA{name}"),
            at: Timestamp(1),
        },
        muster_core::IamCommand::CreateAccessKey {
            user: name.into(),
            id: key.0.into(),
            secret: key.1.into(),
            at: Timestamp(1),
        },
        muster_core::IamCommand::PutUserPolicy {
            user: name.into(),
            policy_name: "p".into(),
            policy: muster_core::Policy::parse(policy).unwrap(),
        },
    ] {
        assert_eq!(state.apply(Command::Iam(cmd)), Outcome::Done);
    }
}

async fn setup() -> (Router, Arc<LocalPlane>) {
    let plane = Arc::new(LocalPlane::default());
    user_with_policy(
        &mut plane.state.lock().unwrap(),
        "root",
        ROOT_KEY,
        r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
    );
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
        let req = signed(
            &format!("/v1/{op}"),
            "{not json",
            ROOT_KEY,
            "batch",
            NOW_MS / 1000,
        );
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

#[tokio::test]
async fn every_call_must_be_signed_by_a_known_key_within_five_minutes() {
    let (app, plane) = setup().await;
    let body = json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d"}).to_string();
    let before = plane.proposals.load(Ordering::SeqCst);
    let unsigned = Request::post("/v1/submitjob")
        .body(Body::from(body.clone()))
        .unwrap();
    let cases = [
        (unsigned, "MissingAuthenticationTokenException"),
        (
            signed(
                "/v1/submitjob",
                &body,
                ("AKIAUNKNOWN", "x"),
                "batch",
                NOW_MS / 1000,
            ),
            "UnrecognizedClientException",
        ),
        (
            signed(
                "/v1/submitjob",
                &body,
                (ROOT_KEY.0, "wrong"),
                "batch",
                NOW_MS / 1000,
            ),
            "InvalidSignatureException",
        ),
        (
            signed(
                "/v1/submitjob",
                &body,
                ROOT_KEY,
                "batch",
                NOW_MS / 1000 - 301,
            ),
            "InvalidSignatureException",
        ),
        (
            signed(
                "/v1/submitjob",
                &body,
                ROOT_KEY,
                "batch",
                NOW_MS / 1000 + 301,
            ),
            "InvalidSignatureException",
        ),
        (
            signed("/v1/submitjob", &body, ROOT_KEY, "s3", NOW_MS / 1000),
            "InvalidSignatureException",
        ),
    ];
    for (req, code) in cases {
        let (status, out, kind) = send(&app, req).await;
        assert_eq!((status, kind.as_deref()), (403, Some(code)), "{out}");
    }
    // A body changed after signing is caught.
    let mut req = signed("/v1/submitjob", &body, ROOT_KEY, "batch", NOW_MS / 1000);
    *req.body_mut() = Body::from(body.replace("\"j\"", "\"k\""));
    assert_eq!(
        send(&app, req).await.2.as_deref(),
        Some("InvalidSignatureException")
    );
    // Within the window is fine.
    let (status, _, _) = send(
        &app,
        signed(
            "/v1/submitjob",
            &body,
            ROOT_KEY,
            "batch",
            NOW_MS / 1000 - 299,
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        plane.proposals.load(Ordering::SeqCst),
        before + 1,
        "only the valid call was proposed"
    );
}

#[tokio::test]
async fn policies_decide_and_submit_needs_both_queue_and_definition() {
    let (app, plane) = setup().await;
    call(
        &app,
        "createjobqueue",
        json!({"jobQueueName": "other", "priority": 1,
        "computeEnvironmentOrder": [{"order": 1, "computeEnvironment": "ce"}]}),
    )
    .await;
    let alice = ("AKIAALICE", "alice-secret");
    user_with_policy(
        &mut plane.state.lock().unwrap(),
        "alice",
        alice,
        r#"{"Statement":[
            {"Effect":"Allow","Action":["batch:SubmitJob","batch:Describe*"],"Resource":"*"},
            {"Effect":"Deny","Action":"batch:SubmitJob","Resource":"arn:aws:batch:*:*:job-queue/other"}]}"#,
    );
    let before = plane.proposals.load(Ordering::SeqCst);
    let (status, _, _) = call_as(
        &app,
        alice,
        "submitjob",
        json!({"jobName": "a", "jobQueue": "q", "jobDefinition": "d"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, out, kind) = call_as(
        &app,
        alice,
        "submitjob",
        json!({"jobName": "a", "jobQueue": "other", "jobDefinition": "d"}),
    )
    .await;
    assert_eq!(
        (status, kind.as_deref()),
        (403, Some("AccessDeniedException")),
        "{out}"
    );
    assert!(out["message"].as_str().unwrap().contains("job-queue/other"));
    let (status, _, kind) = call_as(
        &app,
        alice,
        "createcomputeenvironment",
        json!({"computeEnvironmentName": "x", "type": "UNMANAGED"}),
    )
    .await;
    assert_eq!(
        (status, kind.as_deref()),
        (403, Some("AccessDeniedException"))
    );
    let (status, _, _) = call_as(&app, alice, "describejobqueues", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        plane.proposals.load(Ordering::SeqCst),
        before + 1,
        "refused calls proposed nothing"
    );

    // Allowed on the queue but not on the definition: refused.
    let bob = ("AKIABOB", "bob-secret");
    user_with_policy(
        &mut plane.state.lock().unwrap(),
        "bob",
        bob,
        r#"{"Statement":{"Effect":"Allow","Action":"batch:SubmitJob","Resource":"arn:aws:batch:*:*:job-queue/*"}}"#,
    );
    let (status, out, _) = call_as(
        &app,
        bob,
        "submitjob",
        json!({"jobName": "b", "jobQueue": "q", "jobDefinition": "d"}),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("job-definition/d:1"),
        "{out}"
    );
}

#[tokio::test]
async fn sts_answers_who_is_calling() {
    let (app, _) = setup().await;
    let req = signed(
        "/",
        "Action=GetCallerIdentity&Version=2011-06-15",
        ROOT_KEY,
        "sts",
        NOW_MS / 1000,
    );
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        body.contains("<Arn>arn:aws:iam::000000000000:user/root</Arn>"),
        "{body}"
    );
    assert!(body.contains("<Account>000000000000</Account>"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Whatever JSON arrives, signed, at whatever route: never a 5xx, never a panic.
    #[test]
    fn random_json_never_answers_5xx(op in proptest::sample::select(vec![
        "createcomputeenvironment", "describecomputeenvironments", "createjobqueue", "describejobqueues",
        "registerjobdefinition", "describejobdefinitions", "submitjob", "describejobs", "listjobs", "terminatejob",
        "iam/createuser", "iam/putuserpolicy", "iam/createaccesskey", "iam/listusers", "iam/deleteuser",
    ]), body in arbitrary_json(3)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (app, _) = setup().await;
            let (status, out, _) = send(&app, signed(&format!("/v1/{op}"), &body.to_string(), ROOT_KEY, "batch", NOW_MS / 1000)).await;
            assert!(status < 500, "{op} {body} -> {status} {out}");
        });
    }
}

fn arbitrary_json(depth: u32) -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let names = prop::sample::select(vec![
        "jobName",
        "jobQueue",
        "jobDefinition",
        "containerOverrides",
        "vcpus",
        "memory",
        "command",
        "environment",
        "resourceRequirements",
        "type",
        "value",
        "name",
        "computeEnvironmentName",
        "computeEnvironmentOrder",
        "order",
        "computeEnvironment",
        "priority",
        "state",
        "jobQueueName",
        "jobDefinitionName",
        "containerProperties",
        "image",
        "jobs",
        "jobStatus",
        "maxResults",
        "nextToken",
        "jobId",
        "reason",
        "tags",
        "UserName",
        "PolicyName",
        "PolicyDocument",
        "parameters",
        "retryStrategy",
        "attempts",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "q",
            "d",
            "ce",
            "UNMANAGED",
            "ENABLED",
            "VCPU",
            "MEMORY",
            "GPU",
            "0",
            "1",
            "-1",
            "x:y",
            "arn:aws:batch:us-east-1:000000000000:job-queue/q"
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(depth, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(names.clone(), inner, 0..8).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
            )),
        ]
    })
}

#[tokio::test]
async fn oversized_bodies_are_client_exceptions() {
    let (app, plane) = setup().await;
    let before = plane.proposals.load(Ordering::SeqCst);
    let big = "x".repeat(SUBMIT_JOB_MAX_BYTES);
    let body =
        json!({"jobName": "j", "jobQueue": "q", "jobDefinition": "d", "parameters": {"p": big}})
            .to_string();
    let (status, out, kind) = send(
        &app,
        signed("/v1/submitjob", &body, ROOT_KEY, "batch", NOW_MS / 1000),
    )
    .await;
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("ClientException")),
        "{out}"
    );
    assert!(out["message"].as_str().unwrap().contains("request body"));
    assert_eq!(plane.proposals.load(Ordering::SeqCst), before);
}

#[test]
fn what_was_certainly_not_done_is_503_and_what_may_have_been_is_500() {
    let not_taken = ApiError::from(crate::PlaneError::Unavailable("no leader".into()));
    assert_eq!(
        (not_taken.status.as_u16(), not_taken.code),
        (503, "ServiceUnavailableException")
    );
    let unknown = ApiError::from(crate::PlaneError::Indeterminate("replaced".into()));
    assert_eq!(
        (unknown.status.as_u16(), unknown.code),
        (500, "ServerException")
    );
}
