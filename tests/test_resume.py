"""A streaming job killed mid-way resumes when ``optjob-worker`` runs again, as a batch scheduler's retry does.

The worker is SIGKILLed (no cleanup runs) once it has recorded a finished output shard. Running the
same spec again must: accept the prefix it left (not refuse it as "objects no job published"),
re-check and reuse the finished shards without uploading them again, do the rest, and publish a
model byte-identical to an uninterrupted run, with the progress record gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from optjob.storage.layout import MANIFEST_NAME, PROGRESS_NAME
from tests.support.s3server import S3Bucket
from tests.support.stages import fp8_job_request

ROOT = Path(__file__).resolve().parent.parent


def _spec(tmp_path: Path, source: str, output: str, name: str) -> Path:
    spec = fp8_job_request(name, source, output)
    path = tmp_path / f"{name}-{output.rstrip('/').rsplit('/', 1)[-1]}.json"
    path.write_text(json.dumps(spec))
    return path


def _worker(spec: Path, bucket: S3Bucket, tmp_path: Path, tag: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTJOB_"))}
    env.update(bucket.server.aws_env(), OPTJOB_HOME=str(tmp_path / f"home-{tag}"))
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--spec", str(spec), "--work-dir", str(tmp_path / f"work-{tag}")],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _progress(bucket: S3Bucket, prefix: str) -> dict | None:
    try:
        body = bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}{PROGRESS_NAME}")["Body"].read()
    except bucket.client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def _manifest(bucket: S3Bucket, prefix: str) -> dict:
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}{MANIFEST_NAME}")["Body"].read())


def test_a_killed_worker_run_again_resumes_and_publishes_the_same_model(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from optjob.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", hidden=1024, intermediate=4096, layers=6, heads=8, kv_heads=4,
                             vocab=2048, shards=6, train_steps=0)  # fmt: skip
    s3_bucket.upload_dir(model, "model")
    source = s3_bucket.uri("model/")

    # An uninterrupted run, for comparison.
    clean = _worker(_spec(tmp_path, source, s3_bucket.uri("clean/"), "resume-me"), s3_bucket, tmp_path, "clean")
    assert clean.wait(timeout=600) == 0, clean.stdout.read()[-3000:] if clean.stdout else ""

    # The same job, killed with SIGKILL (its whole process group: supervisor and job process) once the
    # first output shard is recorded as finished.
    spec = _spec(tmp_path, source, s3_bucket.uri("out/"), "resume-me")
    first = _worker(spec, s3_bucket, tmp_path, "first")
    deadline = time.monotonic() + 300
    while (progress := _progress(s3_bucket, "out/")) is None or not progress["units"]:
        assert first.poll() is None, "the job finished before it could be killed; use a slower model"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    done = sorted(_progress(s3_bucket, "out/")["units"])
    assert done and MANIFEST_NAME not in {k.rsplit("/", 1)[-1] for k in s3_bucket.keys("out/")}
    uploaded_at = {
        rel: s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"out/{rel}")["LastModified"] for rel in done
    }

    # Run again: the prefix is accepted, the finished shards are re-checked and reused, not uploaded again.
    time.sleep(1.1)  # LastModified has one-second resolution
    second = _worker(spec, s3_bucket, tmp_path, "second")
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    for rel, when in uploaded_at.items():
        assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=f"out/{rel}")["LastModified"] == when, rel
    stage = _manifest(s3_bucket, "out/")["metrics"]["1:Quantization"]
    assert stage["streaming"]["attempt"] == 2 and sorted(stage["streaming"]["resumed_files"]) == done
    assert stage["engine_details"]["shards_reused_from_an_earlier_attempt"] == len(done)
    assert stage["verification"]["passed"] and stage["verification"]["per_tensor"]["quantized_tensors"] == 6 * 7
    assert "re-checked" in output

    # Byte-identical to the uninterrupted run, and nothing left over.
    files = {f["path"]: f["sha256"] for f in _manifest(s3_bucket, "out/")["files"]}
    assert files == {f["path"]: f["sha256"] for f in _manifest(s3_bucket, "clean/")["files"]}
    assert _progress(s3_bucket, "out/") is None and s3_bucket.multipart_uploads("out/") == []
    assert sorted(k[len("out/") :] for k in s3_bucket.keys("out/")) == sorted(
        [*files, MANIFEST_NAME, "optjob-status.json"]
    )


def test_leftovers_under_another_fingerprint_are_not_trusted(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A record whose fingerprint no longer matches (the source, the plan or the versions changed)
    is not trusted: the job starts clean and replaces what the dead attempt left."""
    from optjob.storage.progress import FinishedUnit, Progress, ProgressLog
    from optjob.storage.uri import parse_s3_uri
    from optjob.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", hidden=128, intermediate=256, layers=2, heads=2, kv_heads=1,
                             vocab=512, shards=2, train_steps=0)  # fmt: skip
    s3_bucket.upload_dir(model, "model")
    learn = _worker(_spec(tmp_path, s3_bucket.uri("model/"), s3_bucket.uri("learn/"), "changed"), s3_bucket,
                    tmp_path, "learn")  # fmt: skip
    assert learn.wait(timeout=600) == 0
    arn = _manifest(s3_bucket, "learn/")["job_arn"]  # the ARN this worker gives the job

    shard = "model-00001-of-00002.safetensors"
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"out/{shard}", Body=b"stale")
    log = ProgressLog(
        s3_bucket.client, parse_s3_uri(s3_bucket.uri("out/")), Progress(job_arn=arn, fingerprint="0" * 64)
    )
    log.record(FinishedUnit(path=shard, size=5, sha256="0" * 64))
    worker = _worker(_spec(tmp_path, s3_bucket.uri("model/"), s3_bucket.uri("out/"), "changed"), s3_bucket,
                     tmp_path, "changed")  # fmt: skip
    output = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, output[-3000:]
    assert "starting clean" in output
    stage = _manifest(s3_bucket, "out/")["metrics"]["1:Quantization"]
    assert stage["streaming"]["resumed_files"] == [] and stage["verification"]["passed"]
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"out/{shard}")["Body"].read()
    assert body != b"stale" and _progress(s3_bucket, "out/") is None


def test_a_killed_multi_stage_job_run_again_skips_the_stages_it_finished(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """[Quantization, SpeculativeDecoding]: killed during EAGLE training, the rerun takes the quantized model
    from optjob-staging/ (every file re-checked) instead of quantizing again, and removes the staging at publish."""
    from optjob.testing import build_tiny_llama

    s3_bucket.upload_dir(build_tiny_llama(tmp_path / "model"), "model")
    spec = json.loads((ROOT / "configs" / "examples" / "eagle-g6-12xlarge.json").read_text())
    fast = {"OPTION_EAGLE_MAX_SAMPLES": "96", "OPTION_EAGLE_EPOCHS": "4", "OPTION_EAGLE_MAX_SEQ_LEN": "128",
            "OPTION_EAGLE_EVAL_PROMPTS": "6"}  # fmt: skip
    spec.update(OptimizationJobName="two-stages", ModelSource={"S3": {"S3Uri": s3_bucket.uri("model/")}},
                OptimizationEnvironment=fast)  # fmt: skip
    spec["OutputConfig"]["S3OutputLocation"] = s3_bucket.uri("out/")
    quantize = {"OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}}
    spec["OptimizationConfigs"].insert(0, {"ModelQuantizationConfig": quantize})
    path = tmp_path / "two-stages.json"
    path.write_text(json.dumps(spec))

    first = _worker(path, s3_bucket, tmp_path, "first")
    staged_unit = "optjob-staging/stage-1-quantization/"
    deadline = time.monotonic() + 300
    while staged_unit not in ((progress := _progress(s3_bucket, "out/")) or {}).get("units", {}):
        assert first.poll() is None, "the job ended before its first stage was kept"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    staged = progress["units"][staged_unit]["stage"]["files"]
    assert any(rel.endswith(".safetensors") for rel in staged)

    second = _worker(path, s3_bucket, tmp_path, "second")
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    assert "stage-1-quantization: finished by an earlier attempt of this job" in output
    assert "stage 1/2 via" not in output  # quantization did not run again
    published = {f["path"]: f["sha256"] for f in _manifest(s3_bucket, "out/")["files"]}
    for rel, (_size, sha) in staged.items():
        if rel.endswith(".safetensors"):
            assert published[rel] == sha, rel  # the target is the quantized model the first attempt made
    assert _manifest(s3_bucket, "out/")["metrics"]["1:Quantization"]["verification"]["passed"]
    assert s3_bucket.keys("out/optjob-staging/") == [] and _progress(s3_bucket, "out/") is None
