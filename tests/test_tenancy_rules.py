"""The rules behind multi-tenancy, one at a time: key files, accounts, roles, limits, old databases, worker env."""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import optjob.cli.serve  # noqa: F401  (registers the command on the app)
from optjob.api.errors import ResourceLimitExceeded, ResourceNotFound, ValidationException
from optjob.api.principals import load_principals
from optjob.cli import app
from optjob.errors import InfrastructureError, InputError
from optjob.jobs.environment import worker_environment
from optjob.jobs.service import JobService
from optjob.jobs.store import SCHEMA_VERSION, Store
from optjob.jobs.tenancy import AccessDenied, Caller
from optjob.secret_files import SecretFileError
from optjob.settings import Settings, load_settings
from optjob.storage.credentials import job_credentials, roles_in_file
from tests.support.jobs import home, make_request, service, settings  # noqa: F401

A = Caller("111111111111", "us-east-1", "team-a")
B = Caller("222222222222", "us-east-1", "team-b")
ROLE_A = "arn:aws:iam::111111111111:role/optimizer"


def _file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _credentials(path: Path, mode: int = 0o600, account: str = "111111111111") -> Path:
    return _file(
        path,
        f"[team-a]\naws_access_key_id = AKIAA\naws_secret_access_key = sa\naws_account_id = {account}\n\n"
        "[team-b]\naws_access_key_id = AKIAB\naws_secret_access_key = sb\naws_account_id = 222222222222\n\n"
        "[legacy]\naws_access_key_id = AKIAL\naws_secret_access_key = sl\n",
        mode,
    )


def test_principals_carry_their_account_and_a_key_without_one_is_the_home_accounts(tmp_path: Path) -> None:
    principals = load_principals("000000000000", _credentials(tmp_path / "credentials"))
    assert {k: (p.name, p.account_id) for k, p in principals.items()} == {
        "AKIAA": ("team-a", "111111111111"),
        "AKIAB": ("team-b", "222222222222"),
        "AKIAL": ("legacy", "000000000000"),
    }
    assert "sa" not in repr(principals["AKIAA"])
    with pytest.raises(SecretFileError, match="12 digits"):
        load_principals("000000000000", _credentials(tmp_path / "bad", account="1234"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_files_readable_by_others_are_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = _credentials(tmp_path / "credentials", mode)
    with pytest.raises(SecretFileError) as caught:
        load_principals("000000000000", path)
    assert f"mode {mode:04o}" in str(caught.value) and f"chmod 600 {path}" in str(caught.value)
    roles = _file(tmp_path / "roles", f"[{ROLE_A}]\naws_access_key_id = K\naws_secret_access_key = S\n", mode)
    with pytest.raises(SecretFileError, match="chmod 600"):
        roles_in_file(roles)


def test_serve_refuses_open_files_and_several_accounts_without_role_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    # serve sets these in its own process's environment; recorded here so they are restored afterwards
    for name in ("OPTJOB_AUTH_KEYS", "OPTJOB_CREDENTIALS_FILE", "OPTJOB_ROLES_FILE", "OPTJOB_ASSUME_ROLE",
                 "OPTJOB_AUDIT_LOG", "OPTJOB_NO_AUTH"):  # fmt: skip
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    runner = CliRunner()
    open_file = _credentials(tmp_path / "open", 0o644)
    result = runner.invoke(app, ["serve", "--credentials-file", str(open_file)])
    assert result.exit_code == 2 and f"chmod 600 {open_file}" in " ".join(result.output.split())
    several = _credentials(tmp_path / "credentials")
    result = runner.invoke(app, ["serve", "--credentials-file", str(several)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "names 3 accounts" in text and "--roles-file" in text, text
    roles = _file(tmp_path / "roles", f"[{ROLE_A}]\naws_access_key_id = K\naws_secret_access_key = S\n", 0o644)
    result = runner.invoke(app, ["serve", "--credentials-file", str(several), "--roles-file", str(roles)])
    assert result.exit_code == 2 and "roles file" in result.output and "chmod 600" in result.output
    help_text = runner.invoke(app, ["serve", "--help"]).output
    assert (
        "aws_account_id = 111122223333" in help_text and "[arn:aws:iam::111122223333:role/team-a-optjob]" in help_text
    )


def test_roles_must_belong_to_the_callers_account_and_be_in_the_roles_file(tmp_path: Path, home: Path) -> None:
    roles = _file(tmp_path / "roles", f"[{ROLE_A}]\naws_access_key_id = K\naws_secret_access_key = S\n")
    service = JobService(load_settings(roles_file=roles, role_credentials="roles-file"), start_executor=False)
    service.create(make_request("ok", RoleArn=ROLE_A), A)
    with pytest.raises(AccessDenied, match="iam:PassRole"):
        service.create(make_request("foreign", RoleArn=ROLE_A), B)
    with pytest.raises(ValidationException, match="^Could not assume role arn:aws:iam::111111111111:role/other"):
        service.create(make_request("unknown", RoleArn="arn:aws:iam::111111111111:role/other"), A)
    assert service.get("ok", A).role_source == f"roles-file:{roles}"


def test_single_tenant_home_account_keeps_naming_any_role(service: JobService) -> None:
    # Ambient credentials: the home account's requests always named roles of any account (recorded only).
    service.create(make_request("legacy", RoleArn="arn:aws:iam::123456789012:role/OptjobTests"))
    assert service.get("legacy").role_source == "ambient"
    with pytest.raises(AccessDenied):  # but another account may still only pass its own
        service.create(make_request("legacy", RoleArn="arn:aws:iam::123456789012:role/OptjobTests"), A)


def test_names_limits_and_operations_are_per_account(home: Path) -> None:
    service = JobService(load_settings(max_active_jobs=2), start_executor=False)
    for caller in (A, B):
        service.create(make_request("same", RoleArn=f"arn:aws:iam::{caller.account_id}:role/r"), caller)
    service.create(make_request("second", RoleArn="arn:aws:iam::111111111111:role/r"), A)
    with pytest.raises(ResourceLimitExceeded):
        service.create(make_request("third", RoleArn="arn:aws:iam::111111111111:role/r"), A)
    service.create(make_request("second", RoleArn="arn:aws:iam::222222222222:role/r"), B)  # B has its own limit
    assert [s.optimization_job_arn for s in service.list(caller=A).optimization_job_summaries] == [
        "arn:aws:sagemaker:us-east-1:111111111111:optimization-job/same",
        "arn:aws:sagemaker:us-east-1:111111111111:optimization-job/second",
    ]
    west = Caller("111111111111", "us-west-2", "team-a")
    assert service.list(caller=west).optimization_job_summaries == []  # and per region
    with pytest.raises(ResourceNotFound):
        service.describe("same", west)
    service.stop("same", A)
    assert service.get("same", A).status == "STOPPING" and service.get("same", B).status == "STARTING"
    keys = {service.get("same", A).job_key, service.get("same", B).job_key}
    assert keys == {"same.111111111111.us-east-1", "same.222222222222.us-east-1"}
    service.create(make_request("home-job"))
    assert service.get("home-job").job_key == "home-job"  # the home account keeps plain keys
    beijing = Caller("111111111111", "cn-north-1", "team-a")
    with pytest.raises(ResourceLimitExceeded, match="counted across regions"):  # one host: all regions count
        service.create(make_request("cn-job", RoleArn="arn:aws-cn:iam::111111111111:role/r"), beijing)
    assert service.store.transition(service.get("second", A).job_key, expect=("STARTING",), to="FAILED")
    service.create(make_request("cn-job", RoleArn="arn:aws-cn:iam::111111111111:role/r"), beijing)
    assert service.get("cn-job", beijing).arn == "arn:aws-cn:sagemaker:cn-north-1:111111111111:optimization-job/cn-job"


_V1_SCHEMA = """
CREATE TABLE jobs (name TEXT PRIMARY KEY, arn TEXT NOT NULL, status TEXT NOT NULL, creation_time REAL NOT NULL,
    last_modified_time REAL NOT NULL, start_time REAL, end_time REAL, failure_reason TEXT, output_image TEXT,
    instance_type TEXT NOT NULL, max_instance_count INTEGER, optimization_types TEXT NOT NULL, max_runtime_s REAL,
    max_pending_s REAL, request_json TEXT NOT NULL, plan_json TEXT NOT NULL, tags_json TEXT NOT NULL,
    log_path TEXT NOT NULL, worker_pid INTEGER, worker_ctime REAL, stop_reason TEXT, stop_requested_at REAL,
    last_event_json TEXT);
CREATE INDEX jobs_by_creation ON jobs (creation_time, name);
CREATE INDEX jobs_by_status ON jobs (status, name);
CREATE INDEX jobs_by_modified ON jobs (last_modified_time);
CREATE TABLE models (name TEXT PRIMARY KEY, s3_uri TEXT NOT NULL, creation_time REAL NOT NULL);
PRAGMA user_version=1;
"""


def test_a_schema_1_database_is_migrated_in_place(settings: Settings) -> None:
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(settings.db_path)
    conn.executescript(_V1_SCHEMA)
    conn.execute(
        "INSERT INTO jobs VALUES ('old-job', 'arn:aws:sagemaker:us-east-1:000000000000:optimization-job/old-job', "
        "'COMPLETED', 1.0, 2.0, 1.5, 2.0, NULL, 'img', 'ml.g6.12xlarge', NULL, '|Quantization|', NULL, NULL, "
        "'{}', 'null', '[]', '/tmp/log', NULL, NULL, NULL, NULL, NULL)"
    )
    conn.execute("INSERT INTO models VALUES ('m', 's3://b/m/', 1.0)")
    conn.commit()
    conn.close()
    service = JobService(settings, start_executor=False)
    record = service.get("old-job")
    assert (record.job_key, record.account_id, record.region, record.status) == (
        "old-job",
        "000000000000",
        "us-east-1",
        "COMPLETED",
    )
    assert record.role_source == "ambient" and service.store.get_model("m") is not None
    assert sqlite3.connect(settings.db_path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    Store(settings.db_path)  # opening again changes nothing
    assert service.list().optimization_job_summaries[0].optimization_job_name == "old-job"


def test_a_jobs_worker_never_gets_the_servers_keys(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTJOB_AUTH_KEYS", "AKIASERVER:server-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SERVERKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-aws-secret")
    roles = _file(tmp_path / "roles", f"[{ROLE_A}]\naws_access_key_id = K\naws_secret_access_key = S\n")
    settings = load_settings(roles_file=roles, role_credentials="roles-file")
    service = JobService(settings, start_executor=False)
    service.create(make_request("job", RoleArn=ROLE_A), A)
    env = worker_environment(settings, service.get("job", A))
    assert not {"OPTJOB_AUTH_KEYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert "server-secret" not in json.dumps(env) and env["OPTJOB_HOME"] == str(settings.home)
    ambient = JobService(load_settings(), start_executor=False)
    ambient.create(make_request("plain"))
    env = worker_environment(settings, ambient.get("plain"))
    assert "OPTJOB_AUTH_KEYS" not in env and env["AWS_ACCESS_KEY_ID"] == "SERVERKEY"  # single tenant: its own


def test_job_credentials_from_the_roles_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roles = _file(
        tmp_path / "roles",
        f"[{ROLE_A}]\naws_access_key_id = ROLEKEY\naws_secret_access_key = rolesecret\naws_session_token = tok\n",
    )
    credentials = job_credentials(f"roles-file:{roles}", ROLE_A, "job-1")
    assert credentials is not None
    frozen = credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == ("ROLEKEY", "rolesecret", "tok")
    assert job_credentials("ambient", ROLE_A, "job-1") is None
    with pytest.raises(InputError, match="Could not assume role arn:aws:iam::111111111111:role/gone"):
        job_credentials(f"roles-file:{roles}", "arn:aws:iam::111111111111:role/gone", "job-1")
    roles.chmod(0o644)
    with pytest.raises(InfrastructureError, match="chmod 600"):
        job_credentials(f"roles-file:{roles}", ROLE_A, "job-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(InfrastructureError, match="no AWS credentials of its own"):
        job_credentials("sts", ROLE_A, "job-1")
