"""The walking skeleton through the real clients: boto3 and the aws CLI against `muster dev`."""

import json
import time
import urllib.request
import uuid

import botocore.exceptions
import pytest

from conftest import TEST_IMAGE


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(batch, job_id, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        jobs = batch.describe_jobs(jobs=[job_id])["jobs"]
        if jobs:
            job = jobs[0]
            if job["status"] in statuses:
                return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def register_busybox(batch, name, command):
    return batch.register_job_definition(
        jobDefinitionName=name, type="container",
        containerProperties={"image": TEST_IMAGE, "command": command,
                             "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                                      {"type": "MEMORY", "value": "64"}]},
    )


def test_dev_creates_the_default_environment_and_queue(batch):
    ces = batch.describe_compute_environments(computeEnvironments=["default"])["computeEnvironments"]
    assert [(c["computeEnvironmentName"], c["type"], c["state"], c["status"]) for c in ces] == \
        [("default", "UNMANAGED", "ENABLED", "VALID")]
    queues = batch.describe_job_queues(jobQueues=["default"])["jobQueues"]
    assert queues[0]["jobQueueArn"].endswith(":job-queue/default")
    assert queues[0]["computeEnvironmentOrder"] == [{"order": 1, "computeEnvironment": ces[0]["computeEnvironmentArn"]}]


def test_a_job_runs_in_a_real_docker_container(batch):
    name = unique("hello")
    registered = register_busybox(batch, name, ["sh", "-c", "echo hello from $AWS_BATCH_JOB_ID; test -n \"$AWS_BATCH_CE_NAME\""])
    assert registered["revision"] == 1
    assert registered["jobDefinitionArn"].endswith(f":job-definition/{name}:1")
    submitted = batch.submit_job(jobName="first", jobQueue="default", jobDefinition=name)
    job = wait_for(batch, submitted["jobId"], {"SUCCEEDED", "FAILED"})
    assert job["status"] == "SUCCEEDED", job
    assert job["container"]["exitCode"] == 0
    assert job["jobDefinition"] == registered["jobDefinitionArn"]
    assert job["createdAt"] <= job["startedAt"] <= job["stoppedAt"]
    assert len(job["attempts"]) == 1


def test_a_failing_container_reports_its_exit_code(batch):
    name = unique("fails")
    register_busybox(batch, name, ["sh", "-c", "exit 3"])
    submitted = batch.submit_job(jobName="fails", jobQueue="default", jobDefinition=f"{name}:1")
    job = wait_for(batch, submitted["jobId"], {"SUCCEEDED", "FAILED"})
    assert job["status"] == "FAILED"
    assert job["container"]["exitCode"] == 3
    assert job["statusReason"] == "Essential container in task exited"


def test_overrides_reach_the_container(batch):
    name = unique("override")
    register_busybox(batch, name, ["sh", "-c", "exit 1"])
    submitted = batch.submit_job(
        jobName="override", jobQueue="default", jobDefinition=name,
        containerOverrides={"command": ["sh", "-c", "test \"$GREETING\" = hi"],
                            "environment": [{"name": "GREETING", "value": "hi"}]},
    )
    job = wait_for(batch, submitted["jobId"], {"SUCCEEDED", "FAILED"})
    assert job["status"] == "SUCCEEDED", job


def test_queue_without_capacity_holds_jobs_runnable_lists_them_and_terminates_them(batch):
    ce = unique("idle-ce")
    queue = unique("idle-q")
    created = batch.create_compute_environment(computeEnvironmentName=ce, type="UNMANAGED")
    assert created["computeEnvironmentArn"].endswith(f":compute-environment/{ce}")
    batch.create_job_queue(jobQueueName=queue, priority=5,
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": created["computeEnvironmentArn"]}])
    name = unique("def")
    register_busybox(batch, name, ["true"])
    ids = [batch.submit_job(jobName=f"waiting-{i}", jobQueue=queue, jobDefinition=name)["jobId"] for i in range(25)]

    pages = batch.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus="RUNNABLE",
                                                      PaginationConfig={"PageSize": 10})
    listed = [j["jobId"] for page in pages for j in page["jobSummaryList"]]
    assert listed == ids
    assert batch.list_jobs(jobQueue=queue)["jobSummaryList"] == []  # no status means RUNNING

    batch.terminate_job(jobId=ids[0], reason="cleaning up")
    job = batch.describe_jobs(jobs=[ids[0]])["jobs"][0]
    assert (job["status"], job["statusReason"], job["isTerminated"]) == ("FAILED", "cleaning up", True)


@pytest.mark.parametrize("kwargs, field", [
    (dict(jobName="j", jobQueue="no-such-queue", jobDefinition="{def}"), "jobQueue"),
    (dict(jobName="j", jobQueue="default", jobDefinition="no-such-definition"), "jobDefinition"),
    (dict(jobName="x" * 129, jobQueue="default", jobDefinition="{def}"), "jobName"),
    (dict(jobName="j", jobQueue="default", jobDefinition="{def}", containerOverrides={"vcpus": 0}), "vcpus"),
])
def test_bad_submits_are_client_exceptions_naming_the_field(batch, kwargs, field):
    name = unique("valid")
    register_busybox(batch, name, ["true"])
    kwargs = {k: (v.format(**{"def": name}) if isinstance(v, str) else v) for k, v in kwargs.items()}
    before = batch.list_jobs(jobQueue="default", jobStatus="RUNNABLE")["jobSummaryList"]
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(**kwargs)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert field in err.value.response["Error"]["Message"]
    assert batch.list_jobs(jobQueue="default", jobStatus="RUNNABLE")["jobSummaryList"] == before


def raw_signed(dev, path, body, credentials=None, service="batch"):
    """A request botocore signs but does not validate, for bodies botocore would refuse."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials
    session = dev_session()
    creds = credentials or session.get_credentials()
    req = botocore.awsrequest.AWSRequest(method="POST", url=f"{dev.endpoint}{path}", data=body,
                                         headers={"Content-Type": "application/json"})
    botocore.auth.SigV4Auth(creds, service, "us-east-1").add_auth(req)
    prepared = req.prepare()
    return urllib.request.Request(prepared.url, data=body.encode(), method="POST", headers=dict(prepared.headers))


def dev_session():
    import boto3
    return boto3.session.Session()


def test_missing_job_name_on_the_wire_is_a_client_exception(dev, batch):
    # botocore refuses to send a request without jobName, so this one is signed by hand.
    req = raw_signed(dev, "/v1/submitjob", json.dumps({"jobQueue": "default", "jobDefinition": "x"}))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400
    assert err.value.headers["x-amzn-ErrorType"] == "ClientException"
    assert "jobName" in json.loads(err.value.read())["message"]


def test_unsigned_and_badly_signed_requests_are_refused(dev, batch):
    import botocore.credentials
    unsigned = urllib.request.Request(f"{dev.endpoint}/v1/describejobqueues", data=b"{}", method="POST")
    wrong_secret = botocore.credentials.Credentials(dev_session().get_credentials().access_key, "not-the-secret")
    unknown_key = botocore.credentials.Credentials("AKIANOTAKEYATALL000", "whatever")
    for req, code in [
        (unsigned, "MissingAuthenticationTokenException"),
        (raw_signed(dev, "/v1/describejobqueues", "{}", wrong_secret), "InvalidSignatureException"),
        (raw_signed(dev, "/v1/describejobqueues", "{}", unknown_key), "UnrecognizedClientException"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req)
        assert (err.value.code, err.value.headers["x-amzn-ErrorType"]) == (403, code)
    # botocore surfaces them as ClientError with the code, and does not retry a 403.
    bad = dev_session().client("batch", aws_access_key_id="AKIANOTAKEYATALL000", aws_secret_access_key="x")
    with pytest.raises(botocore.exceptions.ClientError) as err:
        bad.describe_job_queues()
    assert err.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 0


def test_sts_get_caller_identity_names_the_signed_caller(dev, batch):
    import os
    os.environ["AWS_ENDPOINT_URL_STS"] = dev.endpoint
    try:
        identity = dev_session().client("sts").get_caller_identity()
    finally:
        del os.environ["AWS_ENDPOINT_URL_STS"]
    assert identity["Arn"].endswith(":user/root")
    assert identity["Account"] == "000000000000"


def test_a_user_made_with_muster_iam_is_held_to_its_policy(dev, batch):
    import subprocess
    def iam(*args):
        out = subprocess.run([dev.binary, "iam", *args], env=dev.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if out.stdout.strip() else {}
    user = unique("reader")
    iam("create-user", "--user-name", user)
    key = iam("create-access-key", "--user-name", user)["AccessKey"]
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["batch:Describe*", "batch:ListJobs"], "Resource": "*"},
        {"Effect": "Allow", "Action": "batch:SubmitJob",
         "Resource": ["arn:aws:batch:*:*:job-queue/default", "arn:aws:batch:*:*:job-definition/allowed-*"]}]})
    iam("put-user-policy", "--user-name", user, "--policy-name", "limited", "--policy-document", policy)
    assert [u["UserName"] for u in iam("list-users")["Users"]].count(user) == 1

    reader = dev_session().client("batch", aws_access_key_id=key["AccessKeyId"],
                                  aws_secret_access_key=key["SecretAccessKey"])
    assert reader.describe_job_queues()["jobQueues"]
    with pytest.raises(botocore.exceptions.ClientError) as err:
        reader.create_compute_environment(computeEnvironmentName=unique("no"), type="UNMANAGED")
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    denied_def = unique("denied")
    allowed_def = unique("allowed")
    register_busybox(batch, denied_def, ["true"])
    register_busybox(batch, allowed_def, ["true"])
    with pytest.raises(botocore.exceptions.ClientError) as err:
        reader.submit_job(jobName="x", jobQueue="default", jobDefinition=denied_def)
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    assert reader.submit_job(jobName="x", jobQueue="default", jobDefinition=allowed_def)["jobId"]


def test_zero_vcpus_definition_is_refused(batch):
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.register_job_definition(jobDefinitionName=unique("zero"), type="container",
                                      containerProperties={"image": TEST_IMAGE, "vcpus": 0, "memory": 64})
    assert "containerProperties.vcpus" in err.value.response["Error"]["Message"]


def test_the_aws_cli_drives_the_same_operations(aws):
    queues = json.loads(aws("describe-job-queues").stdout)
    assert "default" in [q["jobQueueName"] for q in queues["jobQueues"]]
    name = unique("cli")
    props = json.dumps({"image": TEST_IMAGE, "command": ["sh", "-c", "exit 0"],
                        "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "32"}]})
    registered = json.loads(aws("register-job-definition", "--job-definition-name", name, "--type", "container",
                                "--container-properties", props).stdout)
    assert registered["revision"] == 1
    defs = json.loads(aws("describe-job-definitions", "--job-definition-name", name).stdout)["jobDefinitions"]
    assert defs[0]["containerProperties"]["image"] == TEST_IMAGE
    job_id = json.loads(aws("submit-job", "--job-name", "from-cli", "--job-queue", "default",
                            "--job-definition", name).stdout)["jobId"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = json.loads(aws("describe-jobs", "--jobs", job_id).stdout)["jobs"][0]
        if job["status"] in ("SUCCEEDED", "FAILED"):
            break
        time.sleep(0.2)
    assert job["status"] == "SUCCEEDED", job
    listed = json.loads(aws("list-jobs", "--job-queue", "default", "--job-status", "SUCCEEDED").stdout)
    assert job_id in [j["jobId"] for j in listed["jobSummaryList"]]

    refused = aws("submit-job", "--job-name", "x", "--job-queue", "nope", "--job-definition", name, check=False)
    assert refused.returncode == 255
    assert "ClientException" in refused.stderr and "jobQueue" in refused.stderr
