"""Issue #28 in what optjob writes: no secret and no other tenant's name in manifests, logs or reasons.

Secrets are put where users put them (OptimizationEnvironment, OverrideEnvironment); the manifest
is the one ``build_manifest`` makes for a real plan, and ownership is checked against a real S3
server (SeaweedFS, ``s3_bucket``).
"""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from optjob.api.errors import ValidationException
from optjob.errors import InputError
from optjob.jobs.logs import JobLog
from optjob.jobs.service import JobService
from optjob.pipeline.outcome import RunOutcome
from optjob.pipeline.plan import Plan, build_plan
from optjob.pipeline.transfer import SourceModel, build_manifest
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.settings import Settings
from optjob.storage.publish import Publisher, publish_model
from optjob.storage.s3 import S3Settings
from optjob.storage.source import FetchedModel
from tests.support.jobs import (  # noqa: F401
    home,
    make_request,
    running_executor,
    service,
    settings,
    wait_for,
    wait_status,
)
from tests.support.s3server import S3Bucket, write_tiny_model

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HF = "hf_" + "a1B2c3D4" * 5


def test_the_manifest_keeps_variable_names_but_not_secret_values(tmp_path: Path) -> None:
    request = make_request(
        "secret-job",
        OptimizationEnvironment={"AWS_SECRET_ACCESS_KEY": SECRET, "OPTION_MAX_MODEL_LEN": "4096"},
        OptimizationConfigs=[
            {"ModelCompilationConfig": {"OverrideEnvironment": {"HF_TOKEN": HF, "NOTE": "key AKIAIOSFODNN7EXAMPLE"}}}
        ],
    )
    plan = build_plan(request, region="us-east-1")
    fetched = FetchedModel(
        source_uri="s3://models-bucket/llama/", path=tmp_path, files=[], total_bytes=0, etags={}, archive=False,
        from_cache=False, bytes_downloaded=0,
    )  # fmt: skip
    manifest = build_manifest(plan, "arn:job", SourceModel(path=tmp_path, fetched=fetched), {}, [])
    text = json.dumps(manifest)
    for secret in (SECRET, HF, "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in text
    env = manifest["techniques"][0]["env"]
    assert env["AWS_SECRET_ACCESS_KEY"] == env["HF_TOKEN"] == "***redacted***"
    assert env["OPTION_MAX_MODEL_LEN"] == "4096" and env["NOTE"] == "key ***redacted***"
    assert manifest["plan"]["stages"][0]["env"]["AWS_SECRET_ACCESS_KEY"] == "***redacted***"
    assert plan.stages[0].env["AWS_SECRET_ACCESS_KEY"] == SECRET  # the job itself still gets the value


def test_job_log_messages_never_carry_a_secret(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "job.log")
    log.write("plan", "warning", f"OverrideEnvironment HF_TOKEN={HF} is ignored; AWS_SECRET_ACCESS_KEY: {SECRET}")
    text = (tmp_path / "job.log").read_text()
    assert HF not in text and SECRET not in text
    assert "HF_TOKEN=***redacted***" in text and "OverrideEnvironment" in text


def test_a_prefix_held_by_another_account_is_refused_without_naming_that_account(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    arn = "arn:aws:sagemaker:us-east-1:111111111111:optimization-job/acme-secret-project"
    theirs = {"job_name": "acme-secret-project", "job_arn": arn}
    model = write_tiny_model(tmp_path / "a", shards=1)
    publish_model(model, s3_bucket.uri("shared/"), manifest=theirs, kms_key_id=None)
    mine = {"job_name": "b-job", "job_arn": "arn:aws:sagemaker:us-east-1:222222222222:optimization-job/b-job"}
    with pytest.raises(InputError) as caught:
        publish_model(write_tiny_model(tmp_path / "b", shards=1), s3_bucket.uri("shared/"), manifest=mine,
                      kms_key_id=None)  # fmt: skip
    reason = str(caught.value)
    assert "a job of another account" in reason and "not overwritten" in reason
    assert "acme-secret-project" not in reason and "111111111111" not in reason
    # the same account's own earlier job is still named, so its owner knows which one
    own = {"job_name": "a-two", "job_arn": "arn:aws:sagemaker:us-east-1:111111111111:optimization-job/a-two"}
    with pytest.raises(InputError, match="of job acme-secret-project"):
        publish_model(write_tiny_model(tmp_path / "c", shards=1), s3_bucket.uri("shared/"), manifest=own,
                      kms_key_id=None)  # fmt: skip


# --- item 8: a KmsKeyId the server cannot use is named as the input at fault -------------------------


@pytest.mark.parametrize(
    "key", ["alias/no-such-key", "arn:aws:kms:us-east-1:111111111111:key/" + "0" * 8 + "-0000-0000-0000-" + "0" * 12]
)
def test_an_unusable_kms_key_is_an_input_error_naming_kms_key_id(s3_bucket: S3Bucket, tmp_path: Path, key: str) -> None:
    model = write_tiny_model(tmp_path / "m", shards=1)
    mine = {"job_name": "k-job", "job_arn": "arn:aws:sagemaker:us-east-1:111111111111:optimization-job/k-job"}
    with pytest.raises(InputError) as caught:
        publish_model(model, s3_bucket.uri("enc/"), manifest=mine, kms_key_id=key)
    reason = str(caught.value)
    assert f"OutputConfig.KmsKeyId '{key}'" in reason and "try again" not in reason
    assert s3_bucket.keys("enc/") == []  # the probe write was removed


@pytest.mark.parametrize("key", ["not-a-key", "arn:aws:kms:us-east-1:111111111111:nope/x", "alias/"])
def test_a_kms_key_id_no_key_can_have_is_refused_at_create(service: JobService, key: str) -> None:
    request = make_request("kms-job", OutputConfig={"S3OutputLocation": "s3://output-bucket/out/", "KmsKeyId": key})
    with pytest.raises(ValidationException, match=f"OutputConfig.KmsKeyId '{key}' is not a KMS key"):
        service.create(request)


# --- item 8: a worker killed after Stop or MaxRuntime leaves nothing at its output ------------------


def claim_then_hang(plan: Plan, *, job_arn: str, work_dir: Path, events: EventSink, cancel: CancelToken,
                    storage: S3Settings | None = None, **_: Any) -> RunOutcome:  # fmt: skip
    """A worker pipeline: claim the output prefix and upload a shard the way a streaming stage does,
    then ignore SIGTERM and never look at the cancel token, so only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    publisher = Publisher(plan.output.s3_uri, job_name=plan.job_name, job_arn=job_arn, kms_key_id=None,
                          settings=storage, events=events, cancel=cancel)  # fmt: skip
    publisher.open()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
    publisher.upload("model-00001-of-00002.safetensors", work_dir / "model-00001-of-00002.safetensors")
    events("Compilation", "stuck", 0.5, "claimed the output and uploaded a shard")
    time.sleep(120)
    raise AssertionError("unreachable: the executor kills this worker")


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_a_killed_workers_claim_and_partial_output_are_removed(
    s3_bucket: S3Bucket, service: JobService, settings: Settings, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setenv("OPTJOB_PIPELINE", "tests.test_hostile_outputs:claim_then_hang")  # a real worker runs it
    runtime = {"StoppingCondition": {"MaxRuntimeInSeconds": 3}} if how == "timeout" else {}
    service.create(make_request("killed", OutputConfig={"S3OutputLocation": s3_bucket.uri("out/")}, **runtime))
    with running_executor(settings):
        wait_for(lambda: s3_bucket.keys("out/") == ["out/model-00001-of-00002.safetensors", "out/optjob-progress.json"])
        if how == "stop":
            service.stop("killed")
        record = wait_status(service, "killed", "STOPPED", "FAILED", timeout=30)
        assert "partial output was discarded" in (record.failure_reason or "partial output was discarded")
        wait_for(lambda: s3_bucket.keys("out/") == [], timeout=20)
    assert "SIGKILL" in Path(record.log_path).read_text()
