"""Issue #28 in what optjob writes: no secret and no other tenant's name in manifests, logs or reasons.

Secrets are put where users put them (OptimizationEnvironment, OverrideEnvironment); the manifest
is the one ``build_manifest`` makes for a real plan, and ownership is checked against a real S3
server (SeaweedFS, ``s3_bucket``).
"""

# Fixtures are imported from tests.test_jobs_support, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optjob.api.errors import ValidationException
from optjob.errors import InputError
from optjob.jobs.logs import JobLog
from optjob.jobs.service import JobService
from optjob.pipeline.plan import build_plan
from optjob.pipeline.transfer import SourceModel, build_manifest
from optjob.storage.publish import publish_model
from optjob.storage.source import FetchedModel
from tests.s3server import S3Bucket, write_tiny_model
from tests.test_jobs_support import home, make_request, service, settings  # noqa: F401

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
