#!/usr/bin/env python3
"""optimum-neuron 0.4.5's own export planning for one request, without the Neuron SDK.

Runs in the side environment scripts/neuron_env.sh builds (optimum-neuron 0.4.5, transformers 4.57),
never in optjob's: tests/test_neuron_plan.py feeds it the requests optjob plans and requires the
same neuron_config.json, compiler arguments and head sharding, field for field.

    $(scripts/neuron_env.sh) scripts/neuron_plan_crosscheck.py < request.json

Request (JSON object on stdin):
  {"config": {...config.json...},            # required
   "batch_size": int|null,                    # --batch_size          (omitted from argv when null)
   "sequence_length": int|null,               # --sequence_length     (omitted from argv when null)
   "tensor_parallel_size": int|null,          # --tensor_parallel_size(omitted from argv when null -> CLI default 1)
   "instance_type": "inf2"|"trn1"|"trn1n"|"trn2",   # --instance_type
   "dtype": "bfloat16"|"float16"|"float32"|null,    # --torch_dtype: accepted by argparse, then ignored by
                                                    # NxDPreTrainedModel._export (dtype comes from config.json)
   "task": "text-generation",                 # --task
   "model_id": "org/name"|null,      # hub id given as --model. null -> --model <local dir holding config.json>
   "checkpoint_revision": "<sha>"|null,  # what HfApi().repo_info(model_id).sha would return (no network here)
   "neuronxcc_version": str|null}    # neuronxcc.__version__ to assume (default ASSUMED_NEURONXCC_VERSION)

Output: one JSON object on stdout:
  {"neuron_config": ..., "compiler_args": ..., "cache": {...}, "versions": {...}, ...}
  or {"error": {"type": ..., "message": ...}, ...} when optimum-neuron rejects the request.

HOW IT WORKS
The probe drives the *real* CLI code path in-process:
  optimum.commands.export.neuronx.parse_args_neuronx       (argument parsing / CLI defaults / choices)
  optimum.commands.export.neuronx.NeuronxExportCommand.setup_target_instance  (parent `optimum-cli` process)
  optimum.exporters.neuron.__main__.main()                 (the `python -m optimum.exporters.neuron` subprocess)
    -> align_compilation_target -> AutoConfig.from_pretrained(...).get_text_config()
    -> maybe_export_from_neuron_model_class -> has_neuron_model_class / get_neuron_model_class (real registry)
    -> <ModelClass>.get_neuron_config -> <ModelClass>._get_neuron_config -> NxDNeuronConfig
    -> <ModelClass>.export -> NxDPreTrainedModel._export (target check, dtype override, head_dim fix,
       create_graph_builders, SingleModelCacheEntry, get_compiler_args)
and stops at the first step that needs the SDK (the actual neuronx-cc compilation).

WHAT IS NOT optimum-neuron CODE (reproduced / substituted by hand), and why:
  A. SDK import shim. optimum/neuron/models/inference/** and optimum/exporters/neuron/** import
     neuronx_distributed / neuronxcc / torch_neuronx / torch_xla / libneuronxla at module level, and
     those packages are not on PyPI. A meta-path finder serves inert stub modules for exactly those five
     top-level packages so the optimum-neuron modules can be imported. None of the functions the probe
     executes (get_neuron_config, _get_neuron_config, NxDNeuronConfig, get_compiler_args,
     create_graph_builders, SingleModelCacheEntry, align_compilation_target, ...) call into the SDK.
     Two stub members carry real values:
       - neuronx_distributed.parallel_layers.pad.get_number_of_extra_heads: NxD's padding rule (the
         heads to add to reach a multiple of the degree), restated; optimum-neuron's
         gqa.get_shardable_head_counts calls it.
       - neuronxcc.__version__ = the assumed compiler version (see B).
     The stubs are installed only after optimum.neuron / transformers are imported, and they expose no
     package metadata, so optimum.neuron.utils.import_utils.is_neuronx_available() stays False.
  B. Compiler version. get_neuronxcc_version() does `import neuronxcc; return neuronxcc.__version__` and
     raises ModuleNotFoundError without the compiler. NeuronConfig.to_dict() (neuron_config.json,
     cache entry hash) and the cache directory name need it. optimum-neuron's SDK-free helper
     get_pinned_version("neuronx-cc") returns only the pin "2.21.33363.0" (package metadata, no build
     hash). The installed compiler reports the extended version "2.21.33363.0+82129205" (local cache dirs
     are named neuronxcc-2.21.33363.0+82129205; optimum-neuron's own later test tests/decoder/
     test_cache_cleanup.py uses the same string). That extended string is the default here and can be
     overridden with "neuronxcc_version".
  C. Hub access. With a hub model id, get_neuron_config() calls HfApi().repo_info(id).sha (network):
     replaced by a stub returning request["checkpoint_revision"]. AutoConfig.from_pretrained(id) is served
     offline (HF_HUB_OFFLINE=1) from a throw-away HF cache that holds only the request's config.json.
  D. exporters/neuron/__main__.py defines `parse_args_neuron` / `NEURON_COMPILER` only under
     `if is_neuronx_available():`; the probe sets those two globals to what that branch assigns.
  E. NxDPreTrainedModel.compile (neuronx_distributed ModelBuilder.trace -> neuronx-cc) is replaced by a
     function that records its arguments (neuron_config, graph_builders, compiler_args) and stops.
  F. pretrained_model.hub_neuronx_cache (decorated @requires_torch_neuronx, uses libneuronxla's
     CompileCache) is replaced by a context manager that records the `entry` argument. The registry
     path it would write is rebuilt by hand from libneuronxla's layout:
       <cache root>/neuronxcc-<neuronxcc.__version__>/<REGISTRY_FOLDER>/<entry.arch_digest()>/<entry.hash>.json
     (REGISTRY_FOLDER, arch_digest() and hash are optimum-neuron's own; only the
     "neuronxcc-<version>" directory prefix, produced by libneuronxla's
     CompileCache.get_cache_dir_with_cache_key, is reproduced.)
"""

import contextlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import tempfile
import traceback
import types
import warnings

ASSUMED_NEURONXCC_VERSION = "2.21.33363.0+82129205"
SDK_PACKAGES = ("neuronx_distributed", "neuronxcc", "torch_neuronx", "torch_xla", "libneuronxla")
SUPPORTED_REQUEST_KEYS = {
    "config",
    "batch_size",
    "sequence_length",
    "tensor_parallel_size",
    "instance_type",
    "dtype",
    "task",
    "model_id",
    "checkpoint_revision",
    "neuronxcc_version",
}


# --------------------------------------------------------------------------------------------------
# A. SDK import shim
# --------------------------------------------------------------------------------------------------
class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub_class(f"{cls.__name__}.{name}")


def _stub_class(name):
    return _StubMeta(name, (_StubBase,), {})


class _StubBase(metaclass=_StubMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _stub_class("call")()

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub_class(name)()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _stub_class(name)
        setattr(self, name, value)
        return value


def _nxd_get_number_of_extra_heads(n_head, tp_degree):
    # NxD's padding rule (neuronx_distributed.parallel_layers.pad): the heads to add so that the count
    # is a multiple of the degree.
    return -n_head % tp_degree


class _SDKStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, neuronxcc_version):
        self.neuronxcc_version = neuronxcc_version

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in SDK_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        if spec.name == "neuronxcc":
            module.__version__ = self.neuronxcc_version
        if spec.name == "neuronx_distributed.parallel_layers.pad":
            module.get_number_of_extra_heads = _nxd_get_number_of_extra_heads
        return module

    def exec_module(self, module):
        pass


# --------------------------------------------------------------------------------------------------
# Sentinels / recorders for steps E and F
# --------------------------------------------------------------------------------------------------
class _CompileReached(Exception):
    """Raised by the replacement of NxDPreTrainedModel.compile: the plan is complete."""

    def __init__(self, neuron_config, graph_builders, compiler_args):
        super().__init__("compile reached")
        self.neuron_config = neuron_config
        self.graph_builders = graph_builders
        self.compiler_args = compiler_args


class _LegacyExportReached(Exception):
    """Raised if main() falls through to the legacy (non-NxD) main_export path."""


def _err(exc):
    return {"type": type(exc).__name__, "message": str(exc)}


def _write_hub_cache(hf_hub_cache, model_id, revision, config_dict):
    """Offline HF cache holding only config.json for `model_id` (substitution C)."""
    repo_dir = os.path.join(hf_hub_cache, "models--" + model_id.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", revision)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(revision)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(config_dict, f)


def run(req, workdir):
    result = {"request": req, "warnings": [], "log": []}
    unknown = set(req) - SUPPORTED_REQUEST_KEYS
    if unknown:
        result["ignored_request_keys"] = sorted(unknown)
    neuronxcc_version = req.get("neuronxcc_version") or ASSUMED_NEURONXCC_VERSION
    model_id = req.get("model_id")
    revision = req.get("checkpoint_revision")
    task = req.get("task") or "text-generation"

    # Offline, isolated HF environment (must be set before huggingface_hub is imported).
    hf_home = os.path.join(workdir, "hf_home")
    os.environ["HF_HOME"] = hf_home
    os.environ["HF_HUB_CACHE"] = os.path.join(hf_home, "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("NEURON_PLATFORM_TARGET_OVERRIDE", None)
    os.environ.pop("CUSTOM_CACHE_REPO", None)
    os.chdir(workdir)  # so that a hub id "org/name" never matches a relative local path

    if model_id:
        _write_hub_cache(os.environ["HF_HUB_CACHE"], model_id, revision or "0" * 40, req["config"])
        model_arg = model_id
    else:
        model_dir = os.path.join(workdir, "model")
        os.makedirs(model_dir)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(req["config"], f)
        model_arg = model_dir

    # ---- real optimum-neuron / transformers imports (no SDK needed) ----
    import huggingface_hub
    import optimum
    import optimum.neuron  # noqa: F401  (import-time align_compilation_target("trn1", override=False))
    import torch
    import transformers
    from optimum.commands.export.neuronx import NeuronxExportCommand, parse_args_neuronx
    from optimum.neuron.cache.entries.single_model import SingleModelCacheEntry
    from optimum.neuron.cache.hub_cache import REGISTRY_FOLDER
    from optimum.neuron.utils.cache_utils import get_hf_hub_cache_repo, get_neuron_cache_path
    from optimum.neuron.utils.import_utils import is_neuronx_available
    from optimum.neuron.utils.system import get_neuron_major
    from optimum.neuron.utils.version_utils import get_pinned_version
    from optimum.neuron.version import __sdk_version__, __version__

    def pinned(name):
        try:
            return get_pinned_version(name)
        except Exception as e:  # noqa: BLE001
            return f"<{type(e).__name__}: {e}>"

    versions = {
        "optimum_neuron": __version__,
        "optimum_neuron_sdk_version": __sdk_version__,
        "transformers": transformers.__version__,
        "optimum": getattr(optimum, "__version__", None) or _dist_version("optimum"),
        "huggingface_hub": huggingface_hub.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "neuronxcc_pinned": pinned("neuronx-cc"),  # optimum-neuron's get_pinned_version (metadata pin)
        "neuronxcc_assumed": neuronxcc_version,  # value used for neuronxcc.__version__ (note B)
        "torch_neuronx_pinned": pinned("torch-neuronx"),
        "neuronx_distributed_pinned": pinned("neuronx_distributed"),
        "libneuronxla_pinned": pinned("libneuronxla"),
    }
    result["versions"] = versions

    # ---- A. install the SDK stub finder, then import the SDK-dependent optimum-neuron modules ----
    sys.meta_path.insert(0, _SDKStubFinder(neuronxcc_version))
    assert not is_neuronx_available()
    import optimum.exporters.neuron.__main__ as exporter_main
    from optimum.neuron.models.auto_model import _REGISTERED_NEURON_MODELS, get_neuron_model_class
    from optimum.neuron.models.inference import (
        auto_models,  # noqa: F401  (fills the registry)
        modeling_utils,
    )
    from optimum.neuron.models.inference.backend import pretrained_model
    from optimum.neuron.models.inference.backend.modules.attention import gqa
    from optimum.neuron.models.inference.backend.pretrained_model import NxDPreTrainedModel
    from optimum.neuron.utils.version_utils import get_neuronxcc_version

    result["supported_model_types"] = sorted(
        mt for (mt, tsk, mode) in _REGISTERED_NEURON_MODELS if tsk == task and mode == "inference"
    )

    # ---- D. the globals exporters/neuron/__main__.py sets only when torch_neuronx is installed ----
    exporter_main.parse_args_neuron = parse_args_neuronx
    exporter_main.NEURON_COMPILER = "Neuronx"

    # ---- C. HfApi().repo_info(...).sha inside NeuronPreTrainedModel.get_neuron_config ----
    class _OfflineHfApi:
        def __init__(self, *args, **kwargs):
            pass

        def repo_info(self, repo_id, revision=None, **kwargs):
            return types.SimpleNamespace(sha=revision_for_hub)

    revision_for_hub = revision
    modeling_utils.HfApi = _OfflineHfApi

    # ---- F. hub_neuronx_cache recorder ----
    recorded = {}

    @contextlib.contextmanager
    def _recording_hub_neuronx_cache(entry=None, cache_repo_id=None, cache_dir=None):
        recorded["entry"] = entry
        yield

    pretrained_model.hub_neuronx_cache = _recording_hub_neuronx_cache

    # ---- E. compile recorder ----
    def _recording_compile(neuron_config, graph_builders, compiler_args, debug=False):
        raise _CompileReached(neuron_config, graph_builders, compiler_args)

    NxDPreTrainedModel.compile = staticmethod(_recording_compile)

    def _legacy_main_export(*args, **kwargs):
        raise _LegacyExportReached("main() fell through to the legacy optimum.exporters.neuron main_export path")

    exporter_main.main_export = _legacy_main_export

    # ---- build the CLI argv exactly as `optimum-cli export neuron ...` would receive it ----
    argv = ["--model", model_arg, "--task", task]
    for key, flag in (
        ("batch_size", "--batch_size"),
        ("sequence_length", "--sequence_length"),
        ("tensor_parallel_size", "--tensor_parallel_size"),
        ("instance_type", "--instance_type"),
        ("dtype", "--torch_dtype"),
    ):
        if req.get(key) is not None:
            argv += [flag, str(req[key])]
    argv.append(os.path.join(workdir, "out"))
    shown = ["<local model dir>" if a == model_arg and not model_id else a for a in argv[:-1]]
    result["cli_argv"] = ["optimum-cli", "export", "neuron"] + shown + ["OUT"]

    # Capture warnings.warn(...) and optimum-neuron logger records during the run.
    class _ListHandler(logging.Handler):
        def emit(self, record):
            if record.name.startswith(("Neuron", "optimum")) and record.levelno >= logging.INFO:
                result["log"].append(f"{record.levelname}:{record.name}:{record.getMessage()}")

    handler = _ListHandler(level=logging.INFO)
    for name in ("Neuron", "optimum", "optimum.neuron", "optimum.exporters.neuron"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("Neuron").setLevel(logging.INFO)
    logging.getLogger("optimum.neuron").setLevel(logging.INFO)

    captured = None
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        try:
            # Parent process (`optimum-cli export neuron`): argparse + setup_target_instance.
            import argparse

            parent_parser = argparse.ArgumentParser("optimum-cli export neuron")
            parse_args_neuronx(parent_parser)
            try:
                parent_args = parent_parser.parse_args(argv)
            except SystemExit as e:
                raise _ArgparseError(parent_parser, e) from None
            if get_neuron_major() == -1:
                NeuronxExportCommand.setup_target_instance(types.SimpleNamespace(args=parent_args))
            # Subprocess: `python3 -m optimum.exporters.neuron <same args>`
            saved_argv = sys.argv
            sys.argv = ["optimum.exporters.neuron"] + argv
            try:
                exporter_main.main()
            finally:
                sys.argv = saved_argv
            result["error"] = {"type": "ProbeError", "message": "main() returned without reaching compile"}
        except _CompileReached as c:
            captured = c
        except _LegacyExportReached as e:
            result["error"] = {"type": "NoNeuronModelClass", "message": str(e)}
        except _ArgparseError as e:
            result["error"] = {"type": "ArgumentError", "message": e.message}
        except Exception as e:  # noqa: BLE001  -- optimum-neuron (or transformers) rejected the request
            result["error"] = _err(e)
            result["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in wlist if _relevant_warning(w)]

    result["env_NEURON_PLATFORM_TARGET_OVERRIDE"] = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE")
    if captured is None:
        return result

    nc = captured.neuron_config
    graph_builders = captured.graph_builders
    config = next(iter(graph_builders.values())).config  # the config object _export worked on

    # What would be written to OUT/neuron_config.json (NeuronConfig.save_pretrained -> to_json_string)
    result["neuron_config"] = json.loads(nc.to_json_string())
    result["neuron_config_class"] = type(nc).__name__
    model_cls = get_neuron_model_class(config.model_type, task, "inference")
    result["model_class"] = [c.__name__ for c in model_cls.__mro__[:2]]
    result["compiler_args"] = captured.compiler_args
    result["derived"] = {
        "ctx_batch_size": nc.ctx_batch_size,
        "tkg_batch_size": nc.tkg_batch_size,
        "world_size": nc.world_size,
        "logical_nc_config": nc.logical_nc_config,
    }
    result["graphs"] = {
        tag: {
            "batch_size": gb.neuron_config.batch_size,
            "max_tokens": gb.max_tokens,
            "active_tokens": gb.active_tokens,
            "priority_model_idx": gb.priority_model_idx,
        }
        for tag, gb in graph_builders.items()
    }
    # Head sharding, with optimum-neuron's gqa.get_shardable_head_counts (what NxDDecoderModelForCausalLM
    # and NeuronAttentionBase evaluate when the graphs are traced).
    try:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        strategy, heads, kv_heads = gqa.get_shardable_head_counts(nc.tp_degree, n_heads, n_kv)
        result["attention_sharding"] = {
            "strategy": strategy.value,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "heads_per_rank": heads // nc.tp_degree,
            "kv_heads_per_rank": kv_heads // nc.tp_degree,
        }
    except Exception as e:  # noqa: BLE001
        result["attention_sharding"] = {"error": _err(e)}
    result["exported_config_json"] = json.loads(config.to_json_string(use_diff=True))

    # ---- cache registry key ----
    entry = recorded.get("entry")
    compiler_dir = "neuronxcc-" + get_neuronxcc_version()
    registry_root = f"{compiler_dir}/{REGISTRY_FOLDER}"
    cache = {
        "registry_folder": REGISTRY_FOLDER,
        "hub_cache_repo": get_hf_hub_cache_repo(),
        "local_cache_root": str(get_neuron_cache_path()),
    }
    if entry is None:
        # _export only creates an entry when model_id is not a local path.
        probe_entry = SingleModelCacheEntry(model_arg, task=task, config=config, neuron_config=nc)
        cache.update(
            {
                "entry_written": False,
                "reason": "model is a local directory: NxDPreTrainedModel._export passes entry=None",
                "arch_digest": probe_entry.arch_digest(),
                "entry_hash": None,
                "registry_path": None,
            }
        )
    else:
        arch = entry.arch_digest()
        cache.update(
            {
                "entry_written": True,
                "arch_digest": arch,
                "entry_hash": entry.hash,
                "registry_path": f"{registry_root}/{arch}/{entry.hash}.json",
                "alias_path": f"{registry_root}/{entry.model_type}/{entry.model_id}/{entry.hash}.json",
                "entry": json.loads(entry.serialize()),
            }
        )
    # Digest used on the *lookup* side (get_hub_cached_entries / vLLM plugin / cache lookup CLI):
    # ModelCacheEntry.create(model_id, task) -> SingleModelCacheEntry.from_hub (config as loaded, no neuron
    # config, no dtype/head_dim overrides).
    lookup = SingleModelCacheEntry.from_hub(model_arg, task)
    cache["lookup_arch_digest"] = lookup.arch_digest()
    cache["lookup_path_prefix"] = f"{registry_root}/{lookup.arch_digest()}/"
    cache["lookup_matches_export"] = cache["lookup_arch_digest"] == cache["arch_digest"]
    result["cache"] = cache
    return result


class _ArgparseError(Exception):
    def __init__(self, parser, exit_exc):
        self.message = getattr(parser, "_probe_last_error", None) or f"argparse exit {exit_exc.code}"
        super().__init__(self.message)


def _relevant_warning(w):
    text = str(w.message)
    return "torch_dtype` is deprecated" not in text


def _dist_version(name):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _patch_argparse_error_capture():
    import argparse

    original = argparse.ArgumentParser.error

    def error(self, message):
        self._probe_last_error = message
        return original(self, message)

    argparse.ArgumentParser.error = error


def main():
    req = json.load(sys.stdin)
    if not isinstance(req, dict) or "config" not in req:
        print(json.dumps({"error": {"type": "ProbeError", "message": "request must be an object with 'config'"}}))
        return 1
    _patch_argparse_error_capture()
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory(prefix="plan_probe_") as workdir:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(req, workdir)
        text = json.dumps(result, indent=2, sort_keys=True).replace(workdir, "<workdir>")
    real_stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
