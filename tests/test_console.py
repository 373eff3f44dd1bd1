"""The web console and /metrics, as people and Prometheus see them.

Everything is real: ``optjob serve`` as a subprocess with a credentials file naming two accounts
(one principal of account A may change jobs from the console, one may only look) and a roles
file; SeaweedFS; FP8 jobs on a tiny Llama that really run (each first sleeps through
``OPTJOB_DEBUG_DELAY_SECONDS`` reporting progress, so a running job can be watched); Debian's
Chromium driven by Playwright, refusing every request that leaves loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from optjob.testing.local_s3 import S3Server, run_weed_mini
from tests.support.browser import Watched, browser, new_page
from tests.support.server_process import Server, running_server, wait_terminal

pytestmark = pytest.mark.slow

ACCOUNT_A, ACCOUNT_B = "111111111111", "222222222222"
PRINCIPALS = {  # name -> (key, secret, account, console access)
    "team-a-admin": ("AKIACONSOLEA00000001", "console-a-admin-secret-0123456789", ACCOUNT_A, "read-write"),
    "team-a-viewer": ("AKIACONSOLEA00000002", "console-a-viewer-secret-012345678", ACCOUNT_A, "read-only"),
    "team-b": ("AKIACONSOLEB00000001", "console-b-secret-0123456789abcdefg", ACCOUNT_B, "read-write"),
}
ROLES = {  # role ARN -> (SeaweedFS identity, key, secret)
    f"arn:aws:iam::{ACCOUNT_A}:role/optimizer": ("console-role-a", "CONSOLEROLEA00000001", "console-role-a-secret-01"),
    f"arn:aws:iam::{ACCOUNT_B}:role/optimizer": ("console-role-b", "CONSOLEROLEB00000001", "console-role-b-secret-01"),
}
ROLE_A, ROLE_B = list(ROLES)
SOURCE, OUTPUT = "console-models", "console-output"
DELAY_S = 14
EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "examples" / "fp8-g6-12xlarge.json"
SCREENSHOT_DIR_ENV = "OPTJOB_SCREENSHOT_DIR"  # also save the screenshots there (the README's picture)


@dataclass
class Setup:
    s3: S3Server
    server: Server
    shots: Path

    def client(self, principal: str):
        key, secret, *_ = PRINCIPALS[principal]
        return self.server.client(key, secret)


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from optjob.testing import build_tiny_llama

    root = tmp_path_factory.mktemp("console")
    model = build_tiny_llama(root / "model", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300)
    identities = [
        {
            "name": identity,
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Read", "Write", "List"],
        }
        for identity, key, secret in ROLES.values()
    ]
    with run_weed_mini(identities=identities) as s3:
        admin = s3.client()
        for bucket in (SOURCE, OUTPUT):
            admin.create_bucket(Bucket=bucket)
        for item in model.iterdir():
            admin.upload_file(str(item), SOURCE, f"tiny-llama/{item.name}")
        credentials = _private(
            root / "credentials",
            "".join(
                f"[{name}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
                f"aws_account_id = {account}\noptjob_console = {access}\n\n"
                for name, (key, secret, account, access) in PRINCIPALS.items()
            ),
        )
        roles = _private(
            root / "roles",
            "".join(
                f"[{arn}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n\n"
                for arn, (_, key, secret) in ROLES.items()
            ),
        )
        env = {**s3.aws_env(), "OPTJOB_EXECUTOR_SLOTS": "1", "OPTJOB_DEBUG_DELAY_SECONDS": str(DELAY_S)}
        args = ("--credentials-file", str(credentials), "--roles-file", str(roles))
        with running_server(root / "home", extra_env=env, args=args) as server:
            shots = root / "screenshots"
            shots.mkdir()
            yield Setup(s3, server, shots)


def spec(name: str, role: str = ROLE_A, source: str = f"s3://{SOURCE}/tiny-llama/") -> dict:
    request = json.loads(EXAMPLE.read_text())
    request.update(OptimizationJobName=name, RoleArn=role, Tags=[])
    request["ModelSource"] = {"S3": {"S3Uri": source}}
    request["OutputConfig"] = {"S3OutputLocation": f"s3://{OUTPUT}/{name}/"}
    request["OptimizationEnvironment"] = {"OPTION_TENSOR_PARALLEL_DEGREE": "4", "HF_TOKEN": "hf_console_secret_value"}
    return request


def sign_in(page, setup: Setup, principal: str) -> None:
    key, secret, *_ = PRINCIPALS[principal]
    page.goto(f"{setup.server.url}/console/")
    assert page.url.endswith("/console/login"), "an anonymous visitor must be sent to the sign-in form"
    page.fill("input[name=access_key_id]", key)
    page.fill("input[name=secret_access_key]", secret)
    page.click("button[type=submit]")
    page.wait_for_url(f"{setup.server.url}/console/")
    assert principal in page.inner_text("[data-testid=who]")


def shoot(page, setup: Setup, name: str) -> Path:
    path = setup.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get(SCREENSHOT_DIR_ENV)
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(extra) / f"{name}.png"), full_page=True)
    assert path.stat().st_size > 10_000, "a screenshot of a rendered page is not a few bytes"
    return path


def percent(page) -> float:
    text = page.inner_text("[data-testid=progress-percent]")
    return float(text.replace("%", "").strip())


def assert_clean(watched: Watched) -> None:
    assert watched.outside == [], f"the page reached outside loopback: {watched.outside}"
    assert watched.errors == [], f"the page logged errors: {watched.errors}"


def test_console_watch_stop_and_inspect_jobs(setup: Setup) -> None:
    admin = setup.client("team-a-admin")
    admin.create_optimization_job(**spec("console-stopped"))
    admin.create_optimization_job(**spec("console-done"))

    with browser() as (chromium, watched):
        page = new_page(chromium, watched)
        sign_in(page, setup, "team-a-admin")
        # The list refreshes by itself: the first job turns INPROGRESS without a reload.
        row = page.locator("tr[data-job=console-stopped] [data-testid=status]")
        row.filter(has_text="INPROGRESS").wait_for(timeout=30_000)
        assert page.locator("tr[data-job=console-done] [data-testid=status]").inner_text() == "STARTING"
        assert "Quantization" in page.inner_text("tr[data-job=console-stopped]")
        assert "ml.g6.12xlarge" in page.inner_text("tr[data-job=console-stopped]")
        shoot(page, setup, "console-list")

        # Its detail page: the progress bar advances as the job's events arrive.
        page.click("a[href='/console/jobs/console-stopped']")
        page.wait_for_selector("[data-testid=progress-percent]", timeout=15_000)
        first = percent(page)
        deadline = time.monotonic() + 10
        while percent(page) <= first and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert percent(page) > first, "the progress bar did not advance by itself"
        assert page.inner_text("[data-testid=progress-eta]").startswith("ETA ")
        request_shown = page.inner_text("[data-testid=request]")
        assert '"OptimizationJobName": "console-stopped"' in request_shown
        assert "hf_console_secret_value" not in page.content(), "a secret-looking environment value was shown"

        # Stop, with a confirmation; the page follows the job to STOPPED.
        page.click("[data-testid=stop]")
        assert watched.dialogs and "Stop console-stopped?" in watched.dialogs[-1]
        page.wait_for_selector("[data-testid=notice]")
        page.locator("[data-testid=job-status]").filter(has_text="STOPPED").wait_for(timeout=60_000)
        assert admin.describe_optimization_job(OptimizationJobName="console-stopped")["OptimizationJobStatus"] == (
            "STOPPED"
        )
        timeline = page.inner_text("[data-testid=timeline]")
        assert timeline.index("STARTING") < timeline.index("INPROGRESS") < timeline.index("STOPPING")
        assert "STOPPED" in timeline
        shoot(page, setup, "console-stopped")

        # The second job runs to the end; its page shows where the time went and what was verified.
        described = wait_terminal(admin, "console-done", timeout=180)
        assert described["OptimizationJobStatus"] == "COMPLETED", described.get("FailureReason")
        page.goto(f"{setup.server.url}/console/jobs/console-done")
        assert page.inner_text("[data-testid=job-status]") == "COMPLETED"
        figures = page.inner_text("[data-testid=figures]")
        assert "verification.passed" in figures and "verification.e2e.mean_kl" in figures
        assert "verification.per_tensor" in figures
        phases = page.inner_text("[data-testid=phases]")
        assert "debug-delay" in phases and "upload" in phases
        assert page.locator("canvas[data-chart=phases]").bounding_box()["height"] > 50
        assert page.inner_text("[data-testid=output]") == f"s3://{OUTPUT}/console-done/"
        image = described["OptimizationOutput"]["RecommendedInferenceImage"]
        assert page.inner_text("[data-testid=image]") == image
        serve = page.inner_text("[data-testid=serve]")
        assert f"aws s3 sync s3://{OUTPUT}/console-done/ ./model" in serve and image in serve
        assert re.search(r"Size source\s+[\d.]+ (KiB|MiB)", page.inner_text("#live"))
        assert "published" in page.inner_text("[data-testid=log]")
        shoot(page, setup, "console-job")

        # Delete, with a confirmation; the record is gone from the list and the API.
        page.goto(f"{setup.server.url}/console/jobs/console-stopped")
        page.click("[data-testid=delete]")
        page.wait_for_url(re.compile(r".*/console/\?notice=.*"))
        assert page.locator("tr[data-job=console-stopped]").count() == 0
        with pytest.raises(admin.exceptions.ResourceNotFound):
            admin.describe_optimization_job(OptimizationJobName="console-stopped")

        # Filters are ListOptimizationJobs' own.
        page.goto(f"{setup.server.url}/console/?status=FAILED")
        page.wait_for_selector("[data-testid=no-jobs]")
        page.goto(f"{setup.server.url}/console/?name=done&status=COMPLETED&technique=Quantization")
        assert page.locator("tr[data-job=console-done]").count() == 1
        page.goto(f"{setup.server.url}/console/?created_after=2099-01-01T00:00")
        page.wait_for_selector("[data-testid=no-jobs]")
        assert_clean(watched)


@pytest.fixture()
def done_job(setup: Setup) -> str:
    """console-done, COMPLETED (created here unless the first test already did)."""
    admin = setup.client("team-a-admin")
    try:
        admin.describe_optimization_job(OptimizationJobName="console-done")
    except admin.exceptions.ResourceNotFound:
        admin.create_optimization_job(**spec("console-done"))
    assert wait_terminal(admin, "console-done", timeout=180)["OptimizationJobStatus"] == "COMPLETED"
    return "console-done"


def test_console_shows_each_account_only_its_own_jobs_and_read_only_principals_no_buttons(
    setup: Setup, done_job: str
) -> None:
    admin = setup.client("team-a-admin")
    with browser() as (chromium, watched):
        other = new_page(chromium, watched)
        sign_in(other, setup, "team-b")
        other.wait_for_selector("[data-testid=no-jobs]")
        assert "console-done" not in other.content()
        assert_clean(watched)
        other.goto(f"{setup.server.url}/console/jobs/console-done")
        assert "ResourceNotFound" in other.inner_text("[data-testid=error]")
        shoot(other, setup, "console-other-account")
        # That page is an HTTP 404, which Chromium logs; it is the only thing it may log.
        assert [e for e in watched.errors if "404" not in e] == []
        watched.errors.clear()

        viewer = new_page(chromium, watched)
        sign_in(viewer, setup, "team-a-viewer")
        viewer.click("a[href='/console/jobs/console-done']")
        viewer.wait_for_selector("[data-testid=job-status]")
        assert viewer.locator("[data-testid=delete]").count() == 0, "a read-only principal was offered Delete"
        # A forged form is refused the same way (and the job stays).
        response = viewer.request.post(f"{setup.server.url}/console/jobs/console-done/delete", form={"csrf": "x"})
        assert response.status == 403
        assert admin.describe_optimization_job(OptimizationJobName="console-done")["OptimizationJobStatus"] == (
            "COMPLETED"
        )
        assert_clean(watched)

        # A wrong secret signs nobody in, and says nothing about which half was wrong.
        stranger = new_page(chromium, watched)
        stranger.goto(f"{setup.server.url}/console/login")
        stranger.fill("input[name=access_key_id]", PRINCIPALS["team-b"][0])
        stranger.fill("input[name=secret_access_key]", "not-the-secret")
        stranger.click("button[type=submit]")
        assert "do not match" in stranger.inner_text("[data-testid=login-error]")
        stranger.goto(f"{setup.server.url}/console/")
        assert stranger.url.endswith("/console/login")


def test_the_session_cookie_holds_no_secret_and_the_store_only_its_hash(setup: Setup) -> None:
    key, secret, *_ = PRINCIPALS["team-b"]
    with browser() as (chromium, watched):
        page = new_page(chromium, watched)
        sign_in(page, setup, "team-b")
        cookies = page.context.cookies()
        token = next(c for c in cookies if c["name"] == "optjob_console")
        assert token["httpOnly"] and token["sameSite"] == "Strict"
        assert secret not in json.dumps(cookies) and secret not in page.content()
    checked = 0
    for path in setup.server.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, f"{path} holds the secret"
            assert token["value"].encode() not in data, f"{path} holds the session token"
            checked += path.name.startswith("optjob.sqlite3")
    assert checked, "the store's files were not found"
    stored = sqlite3.connect(setup.server.home / "optjob.sqlite3").execute(
        "SELECT access_key_id FROM console_sessions WHERE token_sha256 = ?",
        (hashlib.sha256(token["value"].encode()).hexdigest(),),
    )
    assert stored.fetchall() == [(key,)], "the session is not kept server-side under its token's hash"


def _metrics(url: str) -> dict[str, dict[tuple, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_after_jobs_of_each_outcome_and_health(setup: Setup, done_job: str) -> None:
    admin, other = setup.client("team-a-admin"), setup.client("team-b")
    # One job that fails (its source does not exist), beside the completed and stopped ones above.
    other.create_optimization_job(**spec("console-fails", role=ROLE_B, source=f"s3://{SOURCE}/no-such-model/"))
    failed = wait_terminal(other, "console-fails", timeout=120)
    assert failed["OptimizationJobStatus"] == "FAILED"
    with browser() as (chromium, watched):  # the reason, as its owner sees it
        page = new_page(chromium, watched)
        sign_in(page, setup, "team-b")
        page.click("a[href='/console/jobs/console-fails']")
        shown = page.inner_text("[data-testid=failure-reason]")
        assert failed["FailureReason"][:80] in shown and "no-such-model" in shown
        assert page.locator("[data-testid=progress]").count() == 0
        assert_clean(watched)
    admin.create_optimization_job(**spec("console-stopped-2"))
    admin.stop_optimization_job(OptimizationJobName="console-stopped-2")
    assert wait_terminal(admin, "console-stopped-2", timeout=60)["OptimizationJobStatus"] == "STOPPED"
    with pytest.raises(admin.exceptions.ResourceNotFound):
        admin.describe_optimization_job(OptimizationJobName="never-created")

    found = _metrics(setup.server.url)
    jobs = found["optjob_jobs"]
    assert jobs[(("status", "COMPLETED"), ("technique", "Quantization"))] >= 1
    assert jobs[(("status", "FAILED"), ("technique", "Quantization"))] == 1
    assert jobs[(("status", "STOPPED"), ("technique", "Quantization"))] >= 1
    durations = found["optjob_job_duration_seconds_count"]
    assert durations[(("status", "COMPLETED"),)] >= 1 and durations[(("status", "FAILED"),)] == 1
    assert found["optjob_gate_checks_total"][(("result", "pass"),)] >= 1
    assert found["optjob_uploaded_bytes_total"][()] > 100_000
    assert found["optjob_downloaded_bytes_total"][()] > 100_000
    phases = found["optjob_job_phase_seconds_count"]
    assert any(dict(labels)["stage"] == "Quantization" for labels in phases)
    assert found["optjob_executor_slots"][(("state", "total"),)] == 1
    latency = found["optjob_api_request_seconds_count"]
    assert latency[(("code", "200"), ("operation", "DescribeOptimizationJob"))] >= 1
    assert latency[(("code", "400"), ("operation", "DescribeOptimizationJob"))] >= 1
    assert latency[(("code", "200"), ("operation", "CreateOptimizationJob"))] >= 3

    assert urllib.request.urlopen(f"{setup.server.url}/healthz", timeout=5).read() == b"ok\n"
    ready = json.loads(urllib.request.urlopen(f"{setup.server.url}/readyz", timeout=5).read())
    assert ready["ready"] is True and ready["checks"]["store"] == "ok"
    assert ready["checks"]["executor"] == "running"


@pytest.mark.timeout(60)
def test_metrics_routes_answer_get_only_and_mint_no_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics and the health routes answer GET only; the API stays at POST / (SigV4)."""
    from starlette.testclient import TestClient

    from optjob.api.server import create_app
    from optjob.jobs.service import JobService

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path))
    app = create_app(lambda: JobService(start_executor=False), {}, home_region="us-east-1")
    with TestClient(app) as client:
        assert client.post("/metrics").status_code == 405
        assert client.get("/healthz").text == "ok\n"
        # Unknown X-Amz-Target values never become label values: a caller cannot mint series.
        for index in range(3):
            client.post("/", headers={"X-Amz-Target": f"SageMaker.Bogus{index}"}, content=b"{}")
        body = client.get("/metrics").text
        assert "Bogus" not in body and 'operation="unknown"' in body


def test_console_refuses_oversized_forms_before_reading_them(setup: Setup) -> None:
    request = urllib.request.Request(
        f"{setup.server.url}/console/login", data=b"a" * (64 * 1024), method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 413
