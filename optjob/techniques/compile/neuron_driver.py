"""optjob's command interface into the Neuron environment (optimum-neuron 0.4.5, transformers 4.57).

This file is run by path with the Neuron environment's own interpreter, never imported by optjob:
optimum-neuron cannot share optjob's environment, so everything optjob needs from it goes through
these two commands, JSON in and JSON out, with optimum-neuron's own functions doing the work.

    NEURON_PY neuron_driver.py probe
        -> {"optimum_neuron": ..., "transformers": ..., "neuronxcc": "2.21...+hash" | null,
            "missing": ["neuronx-cc", ...], "optimum_cli": "/path/bin/optimum-cli"}
    NEURON_PY neuron_driver.py cache-entry < {"model_dir", "model_id", "task", "neuron_config"}
        -> {"arch_digest", "hash", "serialized", "registry_folder"}

``cache-entry`` builds the registry entry exactly as ``NxDPreTrainedModel._export`` does before it
compiles: the text config loaded by ``AutoConfig``, its dtype set to the neuron config's, a null
``head_dim`` filled in, then ``SingleModelCacheEntry`` (whose arch digest depends on transformers
4.57's config defaults, which is why it cannot be computed in optjob's environment).

Only the standard library is imported at module level, so ``probe`` answers even in a broken env.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys

SDK_PACKAGES = ("neuronx-cc", "torch-neuronx", "neuronx-distributed", "libneuronxla")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe() -> dict:
    """Versions of what is installed; the compiler's full version string comes from the compiler."""
    missing = [name for name in SDK_PACKAGES if _version(name) is None]
    compiler = None
    if "neuronx-cc" not in missing:
        try:
            import neuronxcc

            compiler = str(neuronxcc.__version__)
        except Exception as exc:  # noqa: BLE001 - a broken compiler install is reported, not raised
            missing.append(f"neuronx-cc (installed but not importable: {type(exc).__name__}: {exc})")
    bindir = os.path.dirname(sys.executable)
    cli = os.path.join(bindir, "optimum-cli")
    return {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "optimum_neuron": _version("optimum-neuron"),
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "neuronxcc": compiler,
        "missing": missing,
        "optimum_cli": cli if os.path.exists(cli) else shutil.which("optimum-cli"),
    }


def cache_entry(request: dict) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.neuron.cache.entries.single_model import SingleModelCacheEntry
    from optimum.neuron.cache.hub_cache import REGISTRY_FOLDER
    from transformers import AutoConfig

    neuron_config = request["neuron_config"]
    config = AutoConfig.from_pretrained(request["model_dir"]).get_text_config()
    config.torch_dtype = neuron_config["torch_dtype"]
    if hasattr(config, "head_dim") and config.head_dim is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    entry = SingleModelCacheEntry(request["model_id"], task=request["task"], config=config, neuron_config=neuron_config)
    return {
        "arch_digest": entry.arch_digest(),
        "hash": entry.hash,
        "serialized": entry.serialize(),
        "registry_folder": REGISTRY_FOLDER,
    }


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    if command == "probe":
        result = probe()
    elif command == "cache-entry":
        result = cache_entry(json.load(sys.stdin))
    else:
        print(f"usage: {argv[0]} probe | cache-entry < request.json", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
