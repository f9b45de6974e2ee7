"""The walking skeleton through the real clients: boto3 and the aws CLI against `muster dev`."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

import boto3
import botocore.exceptions
import pytest

from conftest import TEST_IMAGE, unique, wait_for


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
    # Waiting jobs say why, and where they stand.
    deadline = time.monotonic() + 30
    reason = None
    while time.monotonic() < deadline:
        reason = batch.describe_jobs(jobs=[ids[3]])["jobs"][0].get("statusReason")
        if reason:
            break
        time.sleep(0.2)
    assert reason == f"RUNNABLE: no ready node in {ce}; 3 jobs ahead"

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


def muster_iam(dev, *args):
    """`muster iam …` against the session's cluster, as its root user; the JSON it prints."""
    out = subprocess.run([dev.binary, "iam", *args], env=dev.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip() else {}


def test_a_user_made_with_muster_iam_is_held_to_its_policy(dev, batch):
    def iam(*args):
        return muster_iam(dev, *args)
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


def test_compute_environments_update_and_delete_as_aws_does(batch):
    name = unique("ce")
    arn = batch.create_compute_environment(computeEnvironmentName=name, type="UNMANAGED", unmanagedvCpus=4,
                                           tags={"team": "hpc"})["computeEnvironmentArn"]
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.delete_compute_environment(computeEnvironment=name)
    assert "DISABLED" in err.value.response["Error"]["Message"]
    updated = batch.update_compute_environment(computeEnvironment=arn, state="DISABLED", unmanagedvCpus=8)
    assert updated["computeEnvironmentArn"] == arn
    ce = batch.describe_compute_environments(computeEnvironments=[arn])["computeEnvironments"][0]
    assert (ce["state"], ce["unmanagedvCpus"], ce["tags"]) == ("DISABLED", 8, {"team": "hpc"})
    batch.delete_compute_environment(computeEnvironment=arn)
    assert batch.describe_compute_environments(computeEnvironments=[arn])["computeEnvironments"] == []


def test_managed_environments_are_stored_with_their_compute_resources(batch):
    name = unique("managed")
    resources = {"type": "EC2", "minvCpus": 0, "maxvCpus": 64, "instanceTypes": ["optimal"],
                 "subnets": ["subnet-1"], "securityGroupIds": ["sg-1"], "instanceRole": "ecsInstanceRole",
                 "allocationStrategy": "BEST_FIT_PROGRESSIVE"}
    batch.create_compute_environment(computeEnvironmentName=name, type="MANAGED", computeResources=resources,
                                     serviceRole="arn:aws:iam::000000000000:role/batch")
    ce = batch.describe_compute_environments(computeEnvironments=[name])["computeEnvironments"][0]
    assert ce["type"] == "MANAGED"
    assert ce["computeResources"] == resources
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.create_compute_environment(computeEnvironmentName=unique("bad"), type="MANAGED",
                                         computeResources={"type": "EC2", "maxvCpus": 1, "minvCpus": 4,
                                                           "subnets": [], "instanceRole": "r"})
    assert "computeResources.minvCpus" in err.value.response["Error"]["Message"]


def test_queues_update_snapshot_and_delete(batch):
    ce = batch.create_compute_environment(computeEnvironmentName=unique("qce"), type="UNMANAGED")["computeEnvironmentArn"]
    name = unique("q")
    actions = [{"reason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY", "state": "RUNNABLE", "maxTimeSeconds": 600,
                "action": "CANCEL"}]
    batch.create_job_queue(jobQueueName=name, priority=3, jobStateTimeLimitActions=actions,
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])
    definition = unique("def")
    register_busybox(batch, definition, ["true"])
    first = batch.submit_job(jobName="front", jobQueue=name, jobDefinition=definition)
    snapshot = batch.get_job_queue_snapshot(jobQueue=name)["frontOfQueue"]
    assert [j["jobArn"] for j in snapshot["jobs"]] == [first["jobArn"]]

    batch.update_job_queue(jobQueue=name, priority=9, state="DISABLED")
    q = batch.describe_job_queues(jobQueues=[name])["jobQueues"][0]
    assert (q["priority"], q["state"], q["jobStateTimeLimitActions"]) == (9, "DISABLED", actions)
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(jobName="late", jobQueue=name, jobDefinition=definition)
    assert "DISABLED" in err.value.response["Error"]["Message"]
    batch.delete_job_queue(jobQueue=name)
    assert batch.describe_job_queues(jobQueues=[name])["jobQueues"] == []
    job = batch.describe_jobs(jobs=[first["jobId"]])["jobs"][0]
    assert job["status"] == "FAILED" and "deleted" in job["statusReason"]


def test_definitions_keep_every_member_and_deregister(batch):
    name = unique("full")
    props = {"image": TEST_IMAGE, "command": ["true"], "vcpus": 1, "memory": 64,
             "volumes": [{"name": "scratch", "host": {"sourcePath": "/tmp"}}],
             "mountPoints": [{"sourceVolume": "scratch", "containerPath": "/scratch", "readOnly": False}],
             "ulimits": [{"name": "nofile", "softLimit": 1024, "hardLimit": 4096}], "user": "nobody",
             "linuxParameters": {"initProcessEnabled": True}}
    batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties=props,
                                  parameters={"x": "1"}, platformCapabilities=["EC2"], propagateTags=True,
                                  tags={"k": "v"})
    second = batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties=props)
    assert second["revision"] == 2
    d = batch.describe_job_definitions(jobDefinitions=[f"{name}:1"])["jobDefinitions"][0]
    for key, value in props.items():
        assert d["containerProperties"][key] == value, key
    assert (d["parameters"], d["platformCapabilities"], d["propagateTags"], d["tags"]) == ({"x": "1"}, ["EC2"], True, {"k": "v"})
    batch.deregister_job_definition(jobDefinition=f"{name}:1")
    statuses = {x["revision"]: x["status"] for x in batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"]}
    assert statuses == {1: "INACTIVE", 2: "ACTIVE"}
    active = batch.describe_job_definitions(jobDefinitionName=name, status="ACTIVE")["jobDefinitions"]
    assert [x["revision"] for x in active] == [2]


def test_cancel_fails_waiting_jobs_and_leaves_running_ones(batch):
    ce = batch.create_compute_environment(computeEnvironmentName=unique("cce"), type="UNMANAGED")["computeEnvironmentArn"]
    queue = unique("cq")
    batch.create_job_queue(jobQueueName=queue, priority=1, computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])
    definition = unique("def")
    register_busybox(batch, definition, ["true"])
    waiting = batch.submit_job(jobName="waiting", jobQueue=queue, jobDefinition=definition)["jobId"]
    batch.cancel_job(jobId=waiting, reason="not needed")
    batch.cancel_job(jobId=waiting, reason="again")  # idempotent
    job = batch.describe_jobs(jobs=[waiting])["jobs"][0]
    assert (job["status"], job["statusReason"], job["isCancelled"]) == ("FAILED", "not needed", True)

    sleeper_def = unique("sleeper")
    register_busybox(batch, sleeper_def, ["sleep", "30"])
    running = batch.submit_job(jobName="sleeper", jobQueue="default", jobDefinition=sleeper_def)["jobId"]
    wait_for(batch, running, {"RUNNING"})
    batch.cancel_job(jobId=running, reason="too late")
    assert batch.describe_jobs(jobs=[running])["jobs"][0]["status"] == "RUNNING"
    batch.terminate_job(jobId=running, reason="stop it")
    assert wait_for(batch, running, {"FAILED"})["statusReason"] == "stop it"


def test_describing_definitions_by_name_without_a_revision_lists_every_revision(batch):
    name = unique("revs")
    for command in (["true"], ["false"]):
        register_busybox(batch, name, command)
    arn = batch.describe_job_definitions(jobDefinitions=[f"{name}:1"])["jobDefinitions"][0]["jobDefinitionArn"]
    bare_arn = arn.rsplit(":", 1)[0]
    for reference in (name, bare_arn):
        found = batch.describe_job_definitions(jobDefinitions=[reference])["jobDefinitions"]
        assert sorted(d["revision"] for d in found) == [1, 2], reference
    assert [d["revision"] for d in batch.describe_job_definitions(jobDefinitions=[f"{name}:2"])["jobDefinitions"]] == [2]
    batch.deregister_job_definition(jobDefinition=f"{name}:1")
    active = batch.describe_job_definitions(jobDefinitions=[name], status="ACTIVE")["jobDefinitions"]
    assert [d["revision"] for d in active] == [2]


def test_evaluate_on_exit_actions_are_taken_in_any_case_and_echoed_in_lower_case(batch):
    name = unique("actions")
    rules = [{"onExitCode": "3", "action": "RETRY"}, {"onExitCode": "4", "action": "Exit"},
             {"onReason": "x*", "action": "retry"}]
    batch.register_job_definition(
        jobDefinitionName=name, type="container", retryStrategy={"attempts": 2, "evaluateOnExit": rules},
        containerProperties={"image": TEST_IMAGE, "command": ["true"],
                             "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "64"}]})
    shown = batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"][0]["retryStrategy"]
    assert [r["action"] for r in shown["evaluateOnExit"]] == ["retry", "exit", "retry"]
    queue = unique("aq")
    ce = batch.create_compute_environment(computeEnvironmentName=unique("ace"), type="UNMANAGED")["computeEnvironmentArn"]
    batch.create_job_queue(jobQueueName=queue, priority=1, computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])
    job = batch.submit_job(jobName="a", jobQueue=queue, jobDefinition=name)["jobId"]
    described = batch.describe_jobs(jobs=[job])["jobs"][0]["retryStrategy"]
    assert [r["action"] for r in described["evaluateOnExit"]] == ["retry", "exit", "retry"]


def test_job_queue_refusals_read_as_aws_words_them(batch):
    ce = batch.create_compute_environment(computeEnvironmentName=unique("wce"), type="UNMANAGED")["computeEnvironmentArn"]
    order = [{"order": 1, "computeEnvironment": ce}]
    with pytest.raises(batch.exceptions.ClientException, match=re.escape("state JUNK must be one of ENABLED | DISABLED")):
        batch.create_job_queue(jobQueueName=unique("wq"), priority=1, state="JUNK", computeEnvironmentOrder=order)
    with pytest.raises(batch.exceptions.ClientException, match=re.escape("At least 1 compute environment must be provided")):
        batch.create_job_queue(jobQueueName=unique("wq"), priority=1, computeEnvironmentOrder=[])


def test_container_lists_aws_always_returns_are_there_when_unset(batch):
    name = unique("lists")
    register_busybox(batch, name, ["true"])
    props = batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"][0]["containerProperties"]
    lists = ["environment", "mountPoints", "secrets", "ulimits", "volumes"]
    assert {k: props[k] for k in lists} == {k: [] for k in lists}
    job = batch.submit_job(jobName="lists", jobQueue="default", jobDefinition=name)["jobId"]
    container = batch.describe_jobs(jobs=[job])["jobs"][0]["container"]
    assert {k: container[k] for k in lists} == {k: [] for k in lists}


def test_eks_and_ecs_definitions_are_kept_and_their_jobs_refused_with_a_reason(batch):
    name = unique("eks")
    pod = {"containers": [{"name": "main", "image": TEST_IMAGE, "command": ["true"]}]}
    batch.register_job_definition(jobDefinitionName=name, type="container", eksProperties={"podProperties": pod})
    shown = batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"][0]
    assert shown["containerOrchestrationType"] == "EKS"
    assert shown["eksProperties"]["podProperties"]["containers"][0]["image"] == TEST_IMAGE
    assert "containerProperties" not in shown
    with pytest.raises(batch.exceptions.ClientException, match=re.escape("eksProperties.podProperties.containers must contain at least one container")):
        batch.register_job_definition(jobDefinitionName=unique("eks"), type="container", eksProperties={"podProperties": {"containers": []}})
    ecs = unique("ecs")
    task = {"containers": [{"name": "main", "image": TEST_IMAGE, "command": ["true"]}]}
    batch.register_job_definition(jobDefinitionName=ecs, type="container", ecsProperties={"taskProperties": [task]})
    for definition, member in ((name, "eksProperties"), (ecs, "ecsProperties")):
        with pytest.raises(batch.exceptions.ClientException, match=f"{member}; Muster runs container jobs"):
            batch.submit_job(jobName="refused", jobQueue="default", jobDefinition=definition)


def test_cancel_and_terminate_of_a_job_that_does_not_exist_answer_empty(batch):
    # As AWS: clients that terminate defensively (Airflow's on_kill) get 200 and {}.
    for call in (batch.cancel_job, batch.terminate_job):
        response = call(jobId="no-such-job-0000", reason="defensive")
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert {k: v for k, v in response.items() if k != "ResponseMetadata"} == {}


def test_scheduling_policies_round_trip(batch):
    name = unique("fair")
    policy = {"shareDecaySeconds": 3600, "computeReservation": 10,
              "shareDistribution": [{"shareIdentifier": "teamA", "weightFactor": 0.5}, {"shareIdentifier": "teamB*"}]}
    arn = batch.create_scheduling_policy(name=name, fairsharePolicy=policy, tags={"o": "p"})["arn"]
    got = batch.describe_scheduling_policies(arns=[arn])["schedulingPolicies"][0]
    assert got["fairsharePolicy"]["shareDistribution"][1] == {"shareIdentifier": "teamB*", "weightFactor": 1.0}
    assert got["tags"] == {"o": "p"}
    bare = batch.create_scheduling_policy(name=unique("bare"))["arn"]
    assert batch.describe_scheduling_policies(arns=[bare])["schedulingPolicies"][0]["fairsharePolicy"] == \
        {"computeReservation": 0, "shareDecaySeconds": 0, "shareDistribution": []}
    assert arn in [p["arn"] for p in batch.list_scheduling_policies()["schedulingPolicies"]]
    batch.update_scheduling_policy(arn=arn, fairsharePolicy={"computeReservation": 50})
    assert batch.describe_scheduling_policies(arns=[arn])["schedulingPolicies"][0]["fairsharePolicy"]["computeReservation"] == 50
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.create_scheduling_policy(name=unique("bad"), fairsharePolicy={"computeReservation": 100})
    assert "computeReservation" in err.value.response["Error"]["Message"]
    batch.delete_scheduling_policy(arn=arn)
    assert batch.describe_scheduling_policies(arns=[arn])["schedulingPolicies"] == []


def test_tags_on_the_percent_encoded_arn_route(batch):
    ce = batch.create_compute_environment(computeEnvironmentName=unique("tce"), type="UNMANAGED")["computeEnvironmentArn"]
    queue = batch.create_job_queue(jobQueueName=unique("tq"), priority=1,
                                   computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])["jobQueueArn"]
    batch.tag_resource(resourceArn=queue, tags={"team": "hpc", "cost center": "42"})
    assert batch.list_tags_for_resource(resourceArn=queue)["tags"] == {"team": "hpc", "cost center": "42"}
    batch.untag_resource(resourceArn=queue, tagKeys=["cost center"])
    assert batch.list_tags_for_resource(resourceArn=queue)["tags"] == {"team": "hpc"}
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.tag_resource(resourceArn=queue, tags={f"k{i}": "v" for i in range(50)})
    assert "50" in err.value.response["Error"]["Message"]
    with pytest.raises(batch.exceptions.ClientException):
        batch.tag_resource(resourceArn=queue, tags={"aws:reserved": "x"})
    with pytest.raises(batch.exceptions.ClientException):
        batch.list_tags_for_resource(resourceArn="arn:aws:batch:us-east-1:000000000000:job-queue/nope")


def test_list_jobs_pages_through_250_jobs(batch):
    ce = batch.create_compute_environment(computeEnvironmentName=unique("pce"), type="UNMANAGED")["computeEnvironmentArn"]
    queue = unique("pq")
    batch.create_job_queue(jobQueueName=queue, priority=1, computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}])
    definition = unique("def")
    register_busybox(batch, definition, ["true"])
    ids = [batch.submit_job(jobName=f"p{i}", jobQueue=queue, jobDefinition=definition)["jobId"] for i in range(250)]
    pages = list(batch.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus="RUNNABLE",
                                                           PaginationConfig={"PageSize": 100}))
    assert [len(p["jobSummaryList"]) for p in pages] == [100, 100, 50]
    assert [j["jobId"] for p in pages for j in p["jobSummaryList"]] == ids
    assert "nextToken" not in pages[-1]


def test_the_aws_cli_manages_policies_and_tags(aws):
    policy_arn = json.loads(aws("create-scheduling-policy", "--name", unique("cli-fair")).stdout)["arn"]
    aws("tag-resource", "--resource-arn", policy_arn, "--tags", "owner=cli")
    tags = json.loads(aws("list-tags-for-resource", "--resource-arn", policy_arn).stdout)["tags"]
    assert tags == {"owner": "cli"}
    aws("untag-resource", "--resource-arn", policy_arn, "--tag-keys", "owner")
    assert json.loads(aws("list-tags-for-resource", "--resource-arn", policy_arn).stdout)["tags"] == {}
    aws("delete-scheduling-policy", "--arn", policy_arn)
    bad = aws("create-job-queue", "--job-queue-name", "q", "--priority", "1", "--state", "JUNK",
              "--compute-environment-order", "order=1,computeEnvironment=default", check=False)
    assert bad.returncode == 255 and "state" in bad.stderr


def test_array_jobs_with_n_to_n_and_sequential_dependencies(batch):
    name = unique("arr")
    register_busybox(batch, name, ["sh", "-c", "test \"$AWS_BATCH_JOB_ARRAY_INDEX\" -lt \"$AWS_BATCH_JOB_ARRAY_SIZE\""])
    first = batch.submit_job(jobName="first", jobQueue="default", jobDefinition=name, arrayProperties={"size": 3})
    assert ":" not in first["jobId"]
    second = batch.submit_job(jobName="second", jobQueue="default", jobDefinition=name, arrayProperties={"size": 3},
                              dependsOn=[{"jobId": first["jobId"], "type": "N_TO_N"}])
    seq = batch.submit_job(jobName="seq", jobQueue="default", jobDefinition=name, arrayProperties={"size": 2},
                           dependsOn=[{"type": "SEQUENTIAL"}])
    last = batch.submit_job(jobName="last", jobQueue="default", jobDefinition=name, dependsOn=[{"jobId": second["jobId"]}],
                            containerOverrides={"command": ["true"]})
    done = wait_for(batch, last["jobId"], {"SUCCEEDED", "FAILED"}, timeout=120)
    assert done["status"] == "SUCCEEDED", done
    parent = batch.describe_jobs(jobs=[second["jobId"]])["jobs"][0]
    assert parent["status"] == "SUCCEEDED"
    assert parent["arrayProperties"]["size"] == 3
    assert parent["arrayProperties"]["statusSummary"]["SUCCEEDED"] == 3
    assert parent["dependsOn"] == [{"jobId": first["jobId"], "type": "N_TO_N"}]
    child = batch.describe_jobs(jobs=[f"{second['jobId']}:1"])["jobs"][0]
    assert child["arrayProperties"]["index"] == 1
    # Child i of `second` started only after child i of `first` stopped.
    first_child = batch.describe_jobs(jobs=[f"{first['jobId']}:1"])["jobs"][0]
    assert child["startedAt"] >= first_child["stoppedAt"]
    assert wait_for(batch, seq["jobId"], {"SUCCEEDED", "FAILED"})["status"] == "SUCCEEDED"
    children = batch.list_jobs(arrayJobId=seq["jobId"], jobStatus="SUCCEEDED")["jobSummaryList"]
    assert sorted(c["arrayProperties"]["index"] for c in children) == [0, 1]
    s0, s1 = (batch.describe_jobs(jobs=[f"{seq['jobId']}:{i}"])["jobs"][0] for i in (0, 1))
    assert s1["startedAt"] >= s0["stoppedAt"]
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(jobName="x", jobQueue="default", jobDefinition=name, arrayProperties={"size": 10001})
    assert "arrayProperties.size" in err.value.response["Error"]["Message"]


def test_a_failed_dependency_fails_its_dependents(batch):
    failing = unique("failing")
    register_busybox(batch, failing, ["sh", "-c", "exit 2"])
    ok_def = unique("ok")
    register_busybox(batch, ok_def, ["true"])
    bad = batch.submit_job(jobName="bad", jobQueue="default", jobDefinition=failing)["jobId"]
    child = batch.submit_job(jobName="child", jobQueue="default", jobDefinition=ok_def, dependsOn=[{"jobId": bad}])["jobId"]
    grandchild = batch.submit_job(jobName="grandchild", jobQueue="default", jobDefinition=ok_def,
                                  dependsOn=[{"jobId": child}])["jobId"]
    assert batch.describe_jobs(jobs=[child])["jobs"][0]["status"] in ("PENDING", "FAILED")
    done = wait_for(batch, grandchild, {"SUCCEEDED", "FAILED"})
    assert done["status"] == "FAILED"
    assert wait_for(batch, child, {"FAILED"})["statusReason"] == f"Dependent Job {bad} failed"
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(jobName="x", jobQueue="default", jobDefinition=ok_def, dependsOn=[{"jobId": "no-such-job"}])
    assert "dependsOn" in err.value.response["Error"]["Message"]


def test_retry_strategies_and_parameters(batch):
    name = unique("retry")
    batch.register_job_definition(
        jobDefinitionName=name, type="container", parameters={"code": "5"},
        retryStrategy={"attempts": 3, "evaluateOnExit": [{"onExitCode": "5", "action": "EXIT"}]},
        containerProperties={"image": TEST_IMAGE, "command": ["sh", "-c", "exit $0", "Ref::code"],
                             "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "32"}]})
    exits = batch.submit_job(jobName="exits", jobQueue="default", jobDefinition=name)["jobId"]
    retried = batch.submit_job(jobName="retried", jobQueue="default", jobDefinition=name, parameters={"code": "7"})["jobId"]
    job = wait_for(batch, exits, {"SUCCEEDED", "FAILED"})
    assert (job["status"], len(job["attempts"]), job["container"]["exitCode"]) == ("FAILED", 1, 5)
    job = wait_for(batch, retried, {"SUCCEEDED", "FAILED"}, timeout=90)
    assert (job["status"], len(job["attempts"])) == ("FAILED", 3)
    assert job["retryStrategy"]["attempts"] == 3
    assert job["container"]["command"] == ["sh", "-c", "exit $0", "Ref::code"]
    assert job["parameters"] == {"code": "7"}
    for bad, field in [({"attempts": 11}, "attempts"), ({"attempts": 2, "evaluateOnExit": [{"action": "RETRY"}] * 6}, "evaluateOnExit"),
                       ({"attempts": 2, "evaluateOnExit": [{"onExitCode": "1x", "action": "EXIT"}]}, "onExitCode")]:
        with pytest.raises(batch.exceptions.ClientException) as err:
            batch.submit_job(jobName="x", jobQueue="default", jobDefinition=name, retryStrategy=bad)
        assert field in err.value.response["Error"]["Message"]
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(jobName="x", jobQueue="default", jobDefinition=name, timeout={"attemptDurationSeconds": 0})
    assert "attemptDurationSeconds" in err.value.response["Error"]["Message"]


def test_a_client_token_makes_submit_idempotent(batch):
    name = unique("idem")
    register_busybox(batch, name, ["true"])
    token = {"muster:client-token": unique("token")}
    first = batch.submit_job(jobName="once", jobQueue="default", jobDefinition=name, tags=token)
    again = batch.submit_job(jobName="once", jobQueue="default", jobDefinition=name, tags=token)
    assert again["jobId"] == first["jobId"]
    other = batch.submit_job(jobName="once", jobQueue="default", jobDefinition=name)
    assert other["jobId"] != first["jobId"]


def test_attempt_timeouts_stop_the_container_and_retry(batch):
    name = unique("slow")
    register_busybox(batch, name, ["sleep", "600"])
    job_id = batch.submit_job(jobName="slow", jobQueue="default", jobDefinition=name,
                              timeout={"attemptDurationSeconds": 2}, retryStrategy={"attempts": 2})["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert job["status"] == "FAILED"
    assert job["statusReason"] == "Job attempt duration exceeded timeout"
    assert [a["statusReason"] for a in job["attempts"]] == ["Job attempt duration exceeded timeout"] * 2
    assert job["timeout"] == {"attemptDurationSeconds": 2}
    for attempt in job["attempts"]:
        assert attempt["stoppedAt"] - attempt["startedAt"] < 20_000


def test_jobs_that_can_never_fit_fail_fast_with_a_misconfiguration_reason(batch):
    name = unique("huge")
    batch.register_job_definition(jobDefinitionName=name, type="container",
                                  containerProperties={"image": TEST_IMAGE, "command": ["true"], "vcpus": 4096, "memory": 64})
    job_id = batch.submit_job(jobName="huge", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=30)
    assert job["status"] == "FAILED"
    assert job["statusReason"].startswith("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT - the job needs 4096 vCPU")


def test_runnable_time_limits_cancel_jobs_that_wait_for_capacity(batch):
    ce = unique("empty")
    batch.create_compute_environment(computeEnvironmentName=ce, type="UNMANAGED")
    queue = unique("limited")
    batch.create_job_queue(jobQueueName=queue, priority=1, computeEnvironmentOrder=[{"order": 1, "computeEnvironment": ce}],
                           jobStateTimeLimitActions=[{"reason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY", "state": "RUNNABLE",
                                                      "maxTimeSeconds": 1, "action": "CANCEL"}])
    name = unique("def")
    register_busybox(batch, name, ["true"])
    job_id = batch.submit_job(jobName="waits", jobQueue=queue, jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=60)
    assert (job["status"], job["statusReason"], job["isCancelled"]) == \
        ("FAILED", "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY", True)


def test_multinode_definitions_are_echoed_and_a_gang_larger_than_the_cluster_fails_fast(batch):
    name = unique("mnp")
    node_properties = {"numNodes": 4, "mainNode": 0, "nodeRangeProperties": [
        {"targetNodes": "0", "container": {"image": TEST_IMAGE, "command": ["main"], "vcpus": 1, "memory": 64}},
        {"targetNodes": "1:", "container": {"image": TEST_IMAGE, "command": ["worker"], "vcpus": 1, "memory": 64}}]}
    batch.register_job_definition(jobDefinitionName=name, type="multinode", nodeProperties=node_properties)
    d = batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"][0]
    assert (d["type"], d["nodeProperties"]) == ("multinode", node_properties)
    # This cluster has one agent; each of the four nodes needs one of its own.
    job_id = batch.submit_job(jobName="mnp", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["status"] == "FAILED"
    assert job["statusReason"].startswith("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"), job["statusReason"]
    assert "4 nodes" in job["statusReason"], job["statusReason"]
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.register_job_definition(jobDefinitionName=name, type="multinode",
                                      nodeProperties={"numNodes": 2, "mainNode": 0, "nodeRangeProperties": [
                                          {"targetNodes": "0", "container": {"image": TEST_IMAGE, "vcpus": 1, "memory": 8}}]})
    assert "node 1 is in no range" in err.value.response["Error"]["Message"]


def test_a_fair_share_queue_runs_every_share_and_reports_priorities(batch):
    policy = batch.create_scheduling_policy(name=unique("fair"), fairsharePolicy={
        "shareDecaySeconds": 600, "computeReservation": 0,
        "shareDistribution": [{"shareIdentifier": "gold", "weightFactor": 0.5},
                              {"shareIdentifier": "lead*", "weightFactor": 1.0}]})
    queue = unique("fair-q")
    batch.create_job_queue(jobQueueName=queue, priority=1, schedulingPolicyArn=policy["arn"],
                           computeEnvironmentOrder=[{"order": 1, "computeEnvironment": "default"}])
    name = unique("def")
    register_busybox(batch, name, ["true"])
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.submit_job(jobName="no-share", jobQueue=queue, jobDefinition=name)
    assert "shareIdentifier" in err.value.response["Error"]["Message"]
    submitted = [(share, prio, batch.submit_job(jobName=f"f-{share}", jobQueue=queue, jobDefinition=name,
                                                shareIdentifier=share, schedulingPriorityOverride=prio)["jobId"])
                 for share, prio in [("gold", 5), ("leadA", 1), ("gold", 9), ("leadB", 0)]]
    for share, prio, job_id in submitted:
        job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
        assert (job["status"], job["shareIdentifier"], job["schedulingPriority"]) == ("SUCCEEDED", share, prio)


def test_jobs_requiring_a_label_no_node_has_fail_fast_and_say_which(batch):
    name = unique("def")
    register_busybox(batch, name, ["true"])
    job_id = batch.submit_job(jobName="picky", jobQueue="default", jobDefinition=name,
                              tags={"muster:node.rack": "r99"})["jobId"]
    job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=30)
    assert job["status"] == "FAILED"
    assert job["statusReason"].startswith("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT")
    assert "rack=r99" in job["statusReason"]


def test_allocation_strategy_tag_is_checked(batch):
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.create_compute_environment(computeEnvironmentName=unique("ce"), type="UNMANAGED",
                                         tags={"muster:allocation-strategy": "RANDOM"})
    assert "muster:allocation-strategy" in err.value.response["Error"]["Message"]
    ce = unique("spread")
    batch.create_compute_environment(computeEnvironmentName=ce, type="UNMANAGED",
                                     tags={"muster:allocation-strategy": "SPREAD"})
    described = batch.describe_compute_environments(computeEnvironments=[ce])["computeEnvironments"][0]
    assert described["tags"]["muster:allocation-strategy"] == "SPREAD"


def test_job_output_is_served_as_cloudwatch_log_events(dev, batch):
    name = unique("def")
    register_busybox(batch, name, ["sh", "-c", "echo first; echo second >&2; sleep 0.1; echo third"])
    job_id = batch.submit_job(jobName="talker", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["status"] == "SUCCEEDED"
    stream = job["container"]["logStreamName"]
    assert stream == job["attempts"][0]["container"]["logStreamName"]

    logs = boto3.client("logs")
    page = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream, startFromHead=True)
    messages = [e["message"] for e in page["events"]]
    assert sorted(messages[:2]) == ["first", "second"] and messages[2:] == ["third"]
    assert all(job["startedAt"] - 5000 <= e["timestamp"] <= job["stoppedAt"] + 5000 for e in page["events"])
    # Paging as Airflow and Nextflow do: follow nextForwardToken until it stops moving.
    first = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream, startFromHead=True, limit=2)
    rest = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream,
                               nextToken=first["nextForwardToken"], limit=2)
    end = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream, nextToken=rest["nextForwardToken"])
    assert [e["message"] for e in first["events"] + rest["events"]] == messages
    assert end["events"] == [] and end["nextForwardToken"] == rest["nextForwardToken"]
    # Without startFromHead, the latest events.
    tail = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream, limit=1)
    assert [e["message"] for e in tail["events"]] == ["third"]

    with pytest.raises(logs.exceptions.ResourceNotFoundException):
        logs.get_log_events(logGroupName="/aws/batch/job", logStreamName="nope/default/nothing-1")

    cli = subprocess.run(["aws", "logs", "get-log-events", "--log-group-name", "/aws/batch/job",
                          "--log-stream-name", stream, "--start-from-head", "--output", "json"],
                         env=dev.env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert [e["message"] for e in json.loads(cli.stdout)["events"]] == messages

    own = subprocess.run([dev.binary, "job", "logs", job_id], env=dev.env, capture_output=True, text=True, timeout=60)
    assert own.returncode == 0, own.stderr
    assert own.stdout.splitlines() == messages


def test_an_array_parent_has_no_stream_of_its_own_and_muster_prints_its_childrens_output(dev, batch):
    name = unique("arrlogs")
    register_busybox(batch, name, ["sh", "-c", "echo child $AWS_BATCH_JOB_ARRAY_INDEX"])
    parent_id = batch.submit_job(jobName=name, jobQueue="default", jobDefinition=name,
                                 arrayProperties={"size": 3})["jobId"]
    parent = wait_for(batch, parent_id, {"SUCCEEDED", "FAILED"})
    assert parent["status"] == "SUCCEEDED"
    # As AWS Batch describes an array parent: it ran nothing, so no stream and no attempts;
    # each child has its own.
    assert "logStreamName" not in parent["container"] and parent["attempts"] == []
    children = [f"{parent_id}:{i}" for i in range(3)]
    described = batch.describe_jobs(jobs=children)["jobs"]
    assert all(c["container"]["logStreamName"] for c in described)

    expected = []
    for i, child in enumerate(children):
        expected += [f"==> {child} <==", f"child {i}"]
    for follow in [[], ["--follow"]]:
        own = subprocess.run([dev.binary, "job", "logs", parent_id, *follow], env=dev.env,
                             capture_output=True, text=True, timeout=60)
        assert own.returncode == 0, own.stderr
        assert own.stdout.splitlines() == expected


def test_a_custom_awslogs_group_serves_the_jobs_output_and_is_echoed(dev, batch):
    name = unique("grouped")
    group = f"/custom/{name}"
    log_configuration = {"logDriver": "awslogs", "options": {"awslogs-group": group}}
    batch.register_job_definition(
        jobDefinitionName=name, type="container",
        containerProperties={"image": TEST_IMAGE, "command": ["echo", "to my group"], "logConfiguration": log_configuration,
                             "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "64"}]})
    job_id = batch.submit_job(jobName=name, jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["container"]["logConfiguration"] == log_configuration
    stream = job["container"]["logStreamName"]
    logs = boto3.client("logs")
    events = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)["events"]
    assert [e["message"] for e in events] == ["to my group"]
    with pytest.raises(logs.exceptions.ResourceNotFoundException):
        logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream)
    assert [s["logStreamName"] for s in logs.describe_log_streams(logGroupName=group)["logStreams"]] == [stream]
    own = subprocess.run([dev.binary, "job", "logs", job_id], env=dev.env, capture_output=True, text=True, timeout=60)
    assert own.returncode == 0, own.stderr
    assert own.stdout.splitlines() == ["to my group"]


def test_log_events_page_backward_filter_by_time_and_pattern_and_streams_are_listed(dev, batch):
    name = unique("lines")
    register_busybox(batch, name, ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line $i alpha; done; "
                                               "echo 'error: disk \"full\"'; echo done beta"])
    job_id = batch.submit_job(jobName=name, jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    stream = job["container"]["logStreamName"]
    logs = boto3.client("logs")
    group = "/aws/batch/job"
    everything = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)["events"]
    assert len(everything) == 8

    # Tail first, then older pages through nextBackwardToken, as tail-first clients read.
    seen, page = [], logs.get_log_events(logGroupName=group, logStreamName=stream, limit=3)
    for _ in range(5):
        seen = [e["message"] for e in page["events"]] + seen
        older = logs.get_log_events(logGroupName=group, logStreamName=stream, limit=3,
                                    nextToken=page["nextBackwardToken"])
        if not older["events"]:
            break
        page = older
    assert seen == [e["message"] for e in everything]

    # startTime / endTime bound by time stamp (end excluded).
    last = everything[-1]["timestamp"]
    late = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, startTime=last)["events"]
    assert late and all(e["timestamp"] >= last for e in late)
    early = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, endTime=last)["events"]
    assert all(e["timestamp"] < last for e in early)

    listed = logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=f"{name}/")["logStreams"]
    assert [s["logStreamName"] for s in listed] == [stream]

    def filtered(pattern):
        out = logs.filter_log_events(logGroupName=group, logStreamNames=[stream], filterPattern=pattern)
        return [e["message"] for e in out["events"]]
    assert filtered("alpha 3") == ["line 3 alpha"]
    assert filtered('"error: disk"') == ['error: disk "full"']
    assert filtered("alpha -line") == []
    assert len(filtered("")) == 8
    paginator = logs.get_paginator("filter_log_events")
    pages = list(paginator.paginate(logGroupName=group, logStreamNamePrefix=f"{name}/", filterPattern="beta"))
    assert [e["message"] for p in pages for e in p["events"]] == ["done beta"]



def clients_for(d):
    """boto3 clients for another `muster dev` than the session's, from the files it wrote."""
    import configparser
    credentials = configparser.ConfigParser()
    credentials.read(os.path.join(d.data_dir, "aws", "credentials"))
    keys = credentials["default"]
    make = lambda service: boto3.client(service, endpoint_url=d.endpoint, region_name="us-east-1",
                                        aws_access_key_id=keys["aws_access_key_id"],
                                        aws_secret_access_key=keys["aws_secret_access_key"])
    return make("batch"), make("logs")


def containers_of(job_id):
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=muster.job-id={job_id}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_after_kill_9_the_agent_readopts_its_running_container(dev, batch):
    from conftest import Dev
    # A job of the session's cluster runs on the same Docker engine throughout: the restarted
    # agent must neither adopt nor remove it.
    neighbour_def = unique("def")
    register_busybox(batch, neighbour_def, ["sh", "-c", "sleep 10"])
    neighbour = batch.submit_job(jobName="neighbour", jobQueue="default", jobDefinition=neighbour_def)["jobId"]
    wait_for(batch, neighbour, {"RUNNING"})
    own = Dev(dev.binary)  # its own cluster: this test kills it
    try:
        mine, logs = clients_for(own)
        name = unique("def")
        register_busybox(mine, name, ["sh", "-c", "echo before; sleep 6; echo after"])
        job_id = mine.submit_job(jobName="survivor", jobQueue="default", jobDefinition=name)["jobId"]
        wait_for(mine, job_id, {"RUNNING"})
        container = containers_of(job_id)
        assert len(container) == 1

        own.crash_and_restart()  # agent and control plane die with SIGKILL; the container lives
        assert containers_of(job_id) == container
        mine, logs = clients_for(own)
        job = wait_for(mine, job_id, {"SUCCEEDED", "FAILED"})
        assert (job["status"], len(job["attempts"])) == ("SUCCEEDED", 1), job
        assert job["container"]["exitCode"] == 0
        assert containers_of(job_id) == []
        events = logs.get_log_events(logGroupName="/aws/batch/job", startFromHead=True,
                                     logStreamName=job["container"]["logStreamName"])["events"]
        # One run of the container: a restarted attempt would have said "before" twice.
        assert [e["message"] for e in events] == ["before", "after"]
        done = wait_for(batch, neighbour, {"SUCCEEDED", "FAILED"})
        assert (done["status"], len(done["attempts"]), done["container"]["exitCode"]) == ("SUCCEEDED", 1, 0), done
    finally:
        own.stop()
        shutil.rmtree(own.data_dir, ignore_errors=True)


def test_containers_get_their_limits_mounts_user_and_ulimits(batch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    shared.chmod(0o755)
    script = "; ".join([
        "set -e",
        "echo uid=$(id -u)",
        "echo ulimit=$(ulimit -n)",
        "cat /data/in.txt",
        "if touch /rootfs-probe 2>/dev/null; then echo rootfs=writable; else echo rootfs=readonly; fi",
        # cgroup v2 or v1, whichever the host runs
        "echo memory=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes)",
        "echo cpu=$(cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)",
        "echo job=$AWS_BATCH_JOB_ID attempt=$AWS_BATCH_JOB_ATTEMPT queue=$AWS_BATCH_JQ_NAME ce=$AWS_BATCH_CE_NAME",
    ])
    name = unique("limits")
    batch.register_job_definition(
        jobDefinitionName=name, type="container",
        containerProperties={
            "image": TEST_IMAGE, "command": ["sh", "-c", script],
            "resourceRequirements": [{"type": "VCPU", "value": "0.5"}, {"type": "MEMORY", "value": "96"}],
            "volumes": [{"name": "shared", "host": {"sourcePath": str(shared)}}],
            "mountPoints": [{"sourceVolume": "shared", "containerPath": "/data", "readOnly": True}],
            "user": "4321", "readonlyRootFilesystem": True,
            "ulimits": [{"name": "nofile", "softLimit": 321, "hardLimit": 654}],
        })
    job_id = batch.submit_job(jobName="limited", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    events = boto3.client("logs").get_log_events(
        logGroupName="/aws/batch/job", logStreamName=job["container"]["logStreamName"], startFromHead=True)["events"]
    lines = [e["message"] for e in events]
    assert job["status"] == "SUCCEEDED", (job, lines)
    assert lines[:4] == ["uid=4321", "ulimit=321", "from the host", "rootfs=readonly"], lines
    assert lines[4] == f"memory={96 * 1024 * 1024}", lines
    assert lines[5] in ("cpu=50000 100000", "cpu=50000"), lines  # v2 "quota period", v1 quota
    assert lines[6] == f"job={job_id} attempt=1 queue=default ce=default"


@pytest.mark.parametrize("props, field", [
    ({"mountPoints": [{"sourceVolume": "nope", "containerPath": "/x"}]}, "mountPoints.sourceVolume"),
    ({"volumes": [{"name": "v", "host": {"sourcePath": "relative"}}]}, "sourcePath"),
    ({"ulimits": [{"name": "nofile", "softLimit": 9, "hardLimit": 1}]}, "ulimits"),
])
def test_bad_container_options_are_refused_naming_the_field(batch, props, field):
    with pytest.raises(batch.exceptions.ClientException) as err:
        batch.register_job_definition(
            jobDefinitionName=unique("bad"), type="container",
            containerProperties={"image": TEST_IMAGE, "command": ["true"], "vcpus": 1, "memory": 64, **props})
    assert field in err.value.response["Error"]["Message"]


ESCAPES = [
    ({"privileged": True}, "containerProperties.privileged"),
    ({"volumes": [{"name": "sock", "host": {"sourcePath": "/var/run/docker.sock"}}],
      "mountPoints": [{"sourceVolume": "sock", "containerPath": "/var/run/docker.sock"}]},
     "containerProperties.volumes.host.sourcePath: host path /var/run/docker.sock"),
    ({"volumes": [{"name": "root", "host": {"sourcePath": "/"}}]},
     "containerProperties.volumes.host.sourcePath: host path /"),
    ({"linuxParameters": {"devices": [{"hostPath": "/dev/kmsg"}]}}, "containerProperties.linuxParameters.devices"),
]


def allow(dev, user, policy_name, *actions):
    """Adds a policy allowing `actions` on every resource to `user`."""
    muster_iam(dev, "put-user-policy", "--user-name", user, "--policy-name", policy_name, "--policy-document",
               json.dumps({"Version": "2012-10-17",
                           "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]}))


def test_definitions_that_escape_the_container_need_an_explicit_allowance(dev, batch):
    user = unique("registrar")
    muster_iam(dev, "create-user", "--user-name", user)
    key = muster_iam(dev, "create-access-key", "--user-name", user)["AccessKey"]
    allow(dev, user, "register", "batch:RegisterJobDefinition")
    registrar = dev_session().client("batch", aws_access_key_id=key["AccessKeyId"],
                                     aws_secret_access_key=key["SecretAccessKey"])
    base = {"image": TEST_IMAGE, "command": ["true"], "vcpus": 1, "memory": 64}
    for props, field in ESCAPES:
        with pytest.raises(registrar.exceptions.ClientException) as err:
            registrar.register_job_definition(jobDefinitionName=unique("escape"), type="container",
                                              containerProperties={**base, **props})
        message = err.value.response["Error"]["Message"]
        assert field in message and "batch:RegisterPrivilegedJobDefinition" in message, message
    # Saying no is no escape.
    registrar.register_job_definition(jobDefinitionName=unique("plain"), type="container",
                                      containerProperties={**base, "privileged": False})
    # Allowed by the caller's policy, they register.
    allow(dev, user, "privileged", "batch:RegisterPrivilegedJobDefinition")
    for props, _ in ESCAPES:
        registrar.register_job_definition(jobDefinitionName=unique("allowed"), type="container",
                                          containerProperties={**base, **props})


@pytest.mark.parametrize("props, setting", [
    (ESCAPES[0][0], "allow_privileged"),
    (ESCAPES[1][0], "allowed_host_paths"),
    ({"volumes": [{"name": "etc", "host": {"sourcePath": "/etc"}}],
      "mountPoints": [{"sourceVolume": "etc", "containerPath": "/host-etc"}]}, "allowed_host_paths"),
])
def test_the_agent_refuses_what_its_config_does_not_allow(batch, props, setting):
    # The root user may register anything; `muster dev`'s agent allows only the temporary
    # directory (see conftest) and nothing privileged.
    name = unique("agent-refuses")
    batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties={
        "image": TEST_IMAGE, "command": ["true"], "vcpus": 1, "memory": 64, **props})
    job_id = batch.submit_job(jobName="refused", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})
    assert job["status"] == "FAILED", job
    reason = job["attempts"][-1]["container"].get("reason", "")
    assert reason.startswith("CannotStartContainerError") and setting in reason, job


def test_an_image_that_cannot_be_pulled_fails_the_attempt_with_the_pull_error(batch):
    name = unique("unpullable")
    batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties={
        # A registry nobody listens on: the pull fails at once instead of hanging.
        "image": "127.0.0.1:9/muster-absent:1", "command": ["true"], "vcpus": 1, "memory": 64})
    job_id = batch.submit_job(jobName="unpullable", jobQueue="default", jobDefinition=name)["jobId"]
    job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=60)
    assert job["status"] == "FAILED"
    assert job["statusReason"].startswith("CannotPullContainerError: pulling 127.0.0.1:9/muster-absent:1"), job


def test_an_image_the_host_lacks_is_pulled_from_its_registry_and_runs(batch):
    from registry import Registry
    registry = Registry()
    tag = uuid.uuid4().hex[:8]
    image = registry.add(TEST_IMAGE, "muster-pulled/busybox", tag)
    try:
        assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0, \
            "the host must not have the image before the job runs"
        name = unique("pulled")
        batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties={
            "image": image, "command": ["sh", "-c", "echo pulled and ran"], "vcpus": 1, "memory": 64})
        job_id = batch.submit_job(jobName="pulled", jobQueue="default", jobDefinition=name)["jobId"]
        job = wait_for(batch, job_id, {"FAILED", "SUCCEEDED"}, timeout=60)
        assert job["status"] == "SUCCEEDED", (job.get("statusReason"), job.get("attempts"))
        assert set(registry.pulled) == {"muster-pulled/busybox"}, registry.pulled
        assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0
    finally:
        registry.close()
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True)


def test_secrets_never_reach_the_cluster_log(dev, batch):
    # Environment values and the caller's secret key stay out of every log line (the
    # environment is the usual place for credentials a job needs).
    name = unique("secretive")
    batch.register_job_definition(jobDefinitionName=name, type="container", containerProperties={
        "image": TEST_IMAGE, "command": ["sh", "-c", "test -n \"$TOKEN\""], "vcpus": 1, "memory": 64,
        "environment": [{"name": "TOKEN", "value": "definition-secret-4f1c"}]})
    job_id = batch.submit_job(jobName="secretive", jobQueue="default", jobDefinition=name, containerOverrides={
        "environment": [{"name": "OTHER", "value": "override-secret-9a2e"}]})["jobId"]
    assert wait_for(batch, job_id, {"SUCCEEDED", "FAILED"})["status"] == "SUCCEEDED"
    secret_key = batch._request_signer._credentials.get_frozen_credentials().secret_key
    log = open(dev.log_path, errors="replace").read()
    assert "agent registered" in log  # the log being read is the cluster's
    for secret in ("definition-secret-4f1c", "override-secret-9a2e", secret_key):
        assert secret not in log
