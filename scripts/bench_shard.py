"""Time and memory of a sharding job against the plain download + upload floor, measured in one run.

Why: a sharding job moves every byte of the model down and the same number of bytes back up; the
only honest yardstick is what copying those bytes through this host costs without any work, on
the same machine, in the same run. Setup: the synthetic checkpoints of scripts/bench_pipeline.py
(random weights in the real shapes; cached under ``$OPTJOB_CACHE_DIR/bench/``):

* ``llama-3.2-1b``: hidden 2048, 16 layers, 32/8 heads, vocab 128256, tied: 2.47 GB in 5 shards;
* ``llama-3.2-3b``: hidden 3072, 28 layers, 24/8 heads, tied: 6.4 GB in two shards of up to 5 GB
  (as the published checkpoint is), the case where a shard no longer fits "a few shards in memory".

uploaded to a real local S3 server (SeaweedFS ``weed mini`` on loopback). For each, one after the
other, each as its own measured process tree (wall time; peak RSS summed over the tree):

(a') floor: ``aws s3 cp --recursive`` down to disk, then ``aws s3 cp --recursive`` up;
(c)  optjob: ``optjob run SPEC.json`` with ModelShardingConfig at OPTION_TENSOR_PARALLEL_DEGREE
     (default 4, on ml.g6.12xlarge): fetch, shard, gate every part, publish, manifest last.

Printed: wall and peak RSS of each, c/a' (goal <= 1.2), optjob's peak RSS as a share of the model
(goal <= 0.25) and the anonymous part of it (RSS minus mapped files), and the stage's own figures
from the manifest (gate seconds, tensors checked, the stage's peak RSS).

    .venv/bin/python scripts/bench_shard.py                   # both models, about 6 minutes
    .venv/bin/python scripts/bench_shard.py --arch llama-3.2-1b
    .venv/bin/python scripts/bench_shard.py --quick           # ~30 M parameters, for checking the script

Needs about 4x the model size free under /tmp (S3 data, the job's scratch, the floor's copy).
Results also go to ``$OPTJOB_CACHE_DIR/bench/results/`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402
import bench_pipeline as synth  # noqa: E402

MiB = 2**20


def measure_arch(server: Any, arch: Any, opts: argparse.Namespace, work: Path) -> dict[str, Any]:
    model_dir, facts = synth.synthetic_checkpoint(arch)
    size = synth.dir_bytes(model_dir)
    env, client, src_uri, out_bucket = synth.stage_source(server, arch.name, model_dir)
    src_bucket = src_uri.split("/")[2]
    largest = arch.vocab * arch.hidden * 2  # the embedding, in bf16

    def measured(name: str, cmd: list[str], extra: dict[str, str] | None = None) -> bench_common.Measured:
        return bench_common.measured_step(arch.name, name, cmd, env={**env, **(extra or {})}, work=work)

    floor = synth.floor_copy(arch.name, src_uri, f"s3://{out_bucket}/copy/", env=env, work=work)
    synth.delete_prefix(client, out_bucket, "copy/")

    spec = work / f"{arch.name}-spec.json"
    sharding = {"ModelShardingConfig": {"OverrideEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": str(opts.tp)}}}
    spec.write_text(
        json.dumps(synth.job_spec("bench-shard", src_uri, f"s3://{out_bucket}/optjob/", opts.target, sharding))
    )
    home = work / f"{arch.name}-home"
    job = measured("c_optjob_run", [sys.executable, "-m", "optjob", "run", str(spec)],
                   {"OPTJOB_HOME": str(home), "PYTHONPATH": str(bench_common.REPO_ROOT)})  # fmt: skip
    objects = synth.prefix_bytes(client, out_bucket, "optjob/")
    manifest = None
    with contextlib.suppress(Exception):
        manifest = json.loads(client.get_object(Bucket=out_bucket, Key="optjob/optjob-manifest.json")["Body"].read())
    synth.delete_prefix(client, out_bucket, "optjob/")
    synth.delete_prefix(client, src_bucket, "model/")
    if not opts.keep:
        shutil.rmtree(home, ignore_errors=True)

    stage = (manifest or {}).get("metrics", {}).get("1:Sharding", {})
    ok = job.rc == 0
    ratios = {
        "c/a'": job.wall_s / floor.wall_s if ok else None,
        "optjob peak RSS / model size": job.peak_tree_bytes / size if ok else None,
        "optjob peak anonymous RSS / model size": job.peak_tree_anon_bytes / size if ok else None,
        "largest source tensor / model size": largest / size,
    }
    return {
        "arch": arch.name,
        "model_bytes": size,
        "shards": facts.get("shards"),
        "floor": floor.as_dict(),
        "optjob": job.as_dict(),
        "ratios": ratios,
        "output_objects": objects,
        "stage": {
            k: stage.get(k)
            for k in ("parts_per_rank", "tensors_per_rank", "bytes_per_rank", "gate", "seconds", "peak_rss_mib")
        },  # fmt: skip
        "timings": (manifest or {}).get("timings"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=["llama-3.2-1b", "llama-3.2-3b"],
                        help="synthetic checkpoint(s) to shard (default: both)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a ~30 M-parameter checkpoint only")
    parser.add_argument("--tp", type=int, default=4, help="OPTION_TENSOR_PARALLEL_DEGREE (default %(default)s)")
    parser.add_argument("--target", default="ml.g6.12xlarge", help="DeploymentInstanceType (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default under the cache dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (job store, logs, specs)")
    opts = parser.parse_args(argv)
    bench_common.exit_on_sigterm()
    arches = (
        [synth.QUICK_ARCH] if opts.quick else [synth.ARCHES[a] for a in (opts.arch or ["llama-3.2-1b", "llama-3.2-3b"])]
    )
    record = bench_common.banner("bench_shard", {
        "models": [a.name for a in arches], "tensor_parallel_degree": opts.tp, "target": opts.target,
        "s3": "SeaweedFS weed mini on loopback", "floor": "aws s3 cp down to disk, then up",
    })  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    results = []
    try:
        with synth.s3_server() as server:
            for arch in arches:
                results.append(measure_arch(server, arch, opts, work))
    finally:
        if opts.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    rows = []
    for r in results:
        gb = r["model_bytes"] / 1e9
        rows.append([f"{r['arch']} ({gb:.2f} GB, {r['shards']} shards)", r["floor"]["wall_s"], r["optjob"]["wall_s"],
                     r["ratios"]["c/a'"], r["optjob"]["peak_tree_mib"], r["ratios"]["optjob peak RSS / model size"],
                     r["ratios"]["optjob peak anonymous RSS / model size"], r["optjob"]["rc"]])  # fmt: skip
    bench_common.print_table(
        ["model", "floor s", "optjob s", "c/a' (<= 1.2)", "optjob peak MiB", "peak / model (<= 0.25)",
         "anon / model", "rc"], rows,
        title=f"sharding at TP {opts.tp} ({bench_common.load_note()})",
    )  # fmt: skip
    for r in results:
        print(f"{r['arch']}: stage {json.dumps(r['stage'])}; job timings {r['timings']}")
    record.update(results=results)
    bench_common.save_result("bench_shard", record, opts.json)


if __name__ == "__main__":
    main()
