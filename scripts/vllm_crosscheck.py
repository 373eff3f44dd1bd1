"""Cross-check optjob's sharded_state files against vLLM itself, on CPU.

Runs inside the side environment that ``scripts/vllm_env.sh`` builds (vLLM installed with
--no-deps beside the CPU build of torch). For each tensor-parallel rank it starts a CPU process
(gloo), builds vLLM's own model for the source checkpoint with vLLM's config and parallel layers,
loads the Hugging Face weights with vLLM's weight loaders, and then:

1. compares every tensor of vLLM's per-rank state (after ``ShardedStateLoader._filter_subtensors``,
   exactly what vLLM saves) with optjob's files: names, shapes, dtypes and bits;
2. saves vLLM's own sharded_state files with the same part size and compares which tensors each
   part file holds and the file names;
3. loads optjob's files through vLLM's ``ShardedStateLoader`` into a fresh model and compares
   the loaded state with (1) bit for bit.

Prints one JSON line per rank and a final verdict; exits 1 on any difference.

    python scripts/vllm_crosscheck.py --model SRC_DIR --sharded OPTJOB_DIR --tp 2 [--part-bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _use_cpu_platform() -> None:
    """vLLM picks no platform on a host without a GPU; the CPU platform must be set before use."""
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()


def _bits_equal(a, b) -> bool:  # noqa: ANN001 - torch tensors; torch is imported late on purpose
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, results: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _use_cpu_platform()
    import torch
    from safetensors import safe_open
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader
    from vllm.model_executor.model_loader.utils import initialize_model

    dtype = json.loads((Path(args.sharded) / "config.json").read_text()).get("dtype") or "auto"
    model_config = ModelConfig(model=args.model, dtype=dtype, enforce_eager=True, seed=0)
    load_config = LoadConfig(load_format="sharded_state")
    vllm_config = VllmConfig(
        model_config=model_config,
        parallel_config=ParallelConfig(tensor_parallel_size=world),
        device_config=DeviceConfig(device="cpu"),
        load_config=load_config,
    )
    report: dict = {"rank": rank}
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=world)

        def build():  # noqa: ANN202
            # Attention layers register their names per config; a second model needs a clean slate.
            vllm_config.compilation_config.static_forward_context.clear()
            # vLLM's loaders build the model under the configured dtype as the default dtype.
            previous = torch.get_default_dtype()
            torch.set_default_dtype(model_config.dtype)
            try:
                with torch.device("cpu"):
                    return initialize_model(vllm_config=vllm_config).eval()
            finally:
                torch.set_default_dtype(previous)

        model = build()
        weights = []
        for path in sorted(Path(args.model).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                weights.extend((name, f.get_tensor(name)) for name in f.keys())  # noqa: SIM118
        model.load_weights(iter(weights))
        expected = ShardedStateLoader._filter_subtensors(model.state_dict())

        # 1. optjob's files for this rank against vLLM's state.
        ours: dict = {}
        our_parts: dict[str, list[str]] = {}
        for path in sorted(Path(args.sharded).glob(f"model-rank-{rank}-part-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                our_parts[path.name] = sorted(names)
                ours.update((name, f.get_tensor(name)) for name in names)
        report["missing"] = sorted(set(expected) - set(ours))
        report["extra"] = sorted(set(ours) - set(expected))
        report["different"] = sorted(
            name for name in set(expected) & set(ours) if not _bits_equal(expected[name].cpu(), ours[name])
        )
        report["tensors"] = len(expected)

        # 2. vLLM's own files with the same part size: same file names, same tensors in each.
        with tempfile.TemporaryDirectory() as own:
            ShardedStateLoader.save_model(model, own, max_size=args.part_bytes)
            vllm_parts = {}
            for path in sorted(Path(own).glob(f"model-rank-{rank}-part-*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    vllm_parts[path.name] = sorted(f.keys())
        report["parts_match"] = vllm_parts == our_parts
        report["parts"] = sorted(our_parts)
        if not report["parts_match"]:
            report["vllm_parts"] = {k: len(v) for k, v in vllm_parts.items()}
            report["our_parts"] = {k: len(v) for k, v in our_parts.items()}

        # 3. vLLM's sharded_state loader reads optjob's files into a fresh model.
        fresh = build()
        fresh_config = ModelConfig(model=args.sharded, dtype=dtype, enforce_eager=True, seed=0)
        try:
            ShardedStateLoader(load_config).load_weights(fresh, fresh_config)
            loaded = ShardedStateLoader._filter_subtensors(fresh.state_dict())
            report["reload_equal"] = set(loaded) == set(expected) and all(
                _bits_equal(loaded[name], expected[name]) for name in expected
            )
        except Exception as exc:  # noqa: BLE001 - reported, and fails the check
            report["reload_equal"] = False
            report["reload_error"] = f"{type(exc).__name__}: {exc}"
    report["ok"] = (
        not report["missing"] and not report["extra"] and not report["different"]
        and report["parts_match"] and report["reload_equal"]
    )  # fmt: skip
    Path(results, f"rank-{rank}.json").write_text(json.dumps(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the source Hugging Face model directory")
    parser.add_argument("--sharded", required=True, help="optjob's sharded_state output directory")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel degree the files were written for")
    parser.add_argument("--part-bytes", type=int, default=5 * 1024**3, help="part size the files were written with")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    port = _free_port()
    with tempfile.TemporaryDirectory() as results:
        mp.start_processes(_rank, args=(args.tp, port, args, results), nprocs=args.tp, start_method="spawn")
        reports = [json.loads(Path(results, f"rank-{r}.json").read_text()) for r in range(args.tp)]
    for report in reports:
        print(json.dumps(report), flush=True)
    ok = all(report["ok"] for report in reports)
    print(json.dumps({"ok": ok, "tp": args.tp}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
