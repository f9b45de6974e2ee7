"""A cluster made by `muster cluster init --api-tls`: the API serves HTTPS with a certificate of
the cluster's CA, and boto3 and the aws CLI reach it through the AWS config the command wrote
(`endpoint_url`, `ca_bundle`), as the docs tell an operator to."""

import os
import shutil
import subprocess
import tempfile
import time

import boto3
import botocore.config
import botocore.exceptions
import pytest


@pytest.fixture(scope="module")
def https_cluster():
    binary = os.environ.get("MUSTER_BIN") or shutil.which("muster")
    root = tempfile.mkdtemp(prefix="muster-https-")
    cluster = os.path.join(root, "cluster")
    subprocess.run([binary, "cluster", "init", "--dir", cluster, "--servers", "1", "--api-tls",
                    "--executor", "process"], check=True, stdout=subprocess.DEVNULL)
    log = open(os.path.join(root, "server.log"), "a")
    server = subprocess.Popen([binary, "server", "--config", os.path.join(cluster, "server-1.toml")],
                              stdout=subprocess.DEVNULL, stderr=log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = os.path.join(cluster, "aws", "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(cluster, "aws", "credentials")
    try:
        yield cluster, env
    finally:
        server.kill()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def batch_client(env, **kwargs):
    # The AWS config names the endpoint and the CA bundle; boto3 reads both from it.
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return boto3.session.Session().client("batch", **kwargs)
    finally:
        os.environ.clear()
        os.environ.update(old)


def wait_for_default_queue(client, deadline):
    while True:
        try:
            queues = client.describe_job_queues(jobQueues=["default"])["jobQueues"]
            if queues:
                return queues
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ClientError):
            pass
        assert time.monotonic() < deadline, "the HTTPS API never answered"
        time.sleep(0.2)


def test_the_api_serves_https_that_clients_trust_through_the_written_config(https_cluster):
    cluster, env = https_cluster
    with open(env["AWS_CONFIG_FILE"]) as f:
        config = f.read()
    assert "endpoint_url = https://" in config and "ca_bundle = " in config, config

    client = batch_client(env)
    queues = wait_for_default_queue(client, time.monotonic() + 60)
    assert queues[0]["state"] == "ENABLED"

    # The aws CLI, from the same files.
    out = subprocess.run(["aws", "batch", "describe-job-queues", "--query", "jobQueues[].jobQueueName",
                          "--output", "text"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "default" in out.stdout, out.stderr

    # Without the cluster's CA the certificate is not trusted.
    untrusting_env = dict(env)
    with open(env["AWS_CONFIG_FILE"]) as f:
        without_bundle = "".join(line for line in f if not line.startswith("ca_bundle"))
    bare = os.path.join(cluster, "aws", "config-without-ca")
    with open(bare, "w") as f:
        f.write(without_bundle)
    untrusting_env["AWS_CONFIG_FILE"] = bare
    untrusting = batch_client(untrusting_env)
    with pytest.raises(botocore.exceptions.SSLError):
        untrusting.describe_job_queues()

    # Plain HTTP to the HTTPS port gets nowhere.
    plain_env = dict(env, AWS_ENDPOINT_URL_BATCH=config.split("endpoint_url = ")[1].split()[0]
                     .replace("https://", "http://"))
    plain = batch_client(plain_env, config=botocore.config.Config(retries={"max_attempts": 1}))
    with pytest.raises(botocore.exceptions.BotoCoreError):
        plain.describe_job_queues()
