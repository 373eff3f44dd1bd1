"""The images and scheduler manifests, checked statically: no Docker engine or cluster is needed.

Each manifest must parse, run the worker image with a GPU, keep its time limits consistent with the
example spec's StoppingCondition and the stop grace period, and retry exactly the exit codes the
worker documents as retryable. The Dockerfiles are parsed instruction by instruction (they cannot
be built here): multi-stage, non-root, optjob-worker as the entrypoint, version labels, no
HEALTHCHECK, and a build context that .dockerignore does not empty.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers import exitcodes
from workers.spec import no_registry, validate

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NOT_RETRIED = {row[0] for row in exitcodes.TABLE} - {exitcodes.EXIT_COMPLETED} - exitcodes.RETRYABLE


def example_spec() -> dict[str, Any]:
    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    return json.loads(configmap["data"]["spec.json"])


def max_runtime() -> int:
    return int(example_spec()["StoppingCondition"]["MaxRuntimeInSeconds"])


def test_example_spec_is_a_valid_job() -> None:
    request, plan = validate(example_spec(), region="us-east-1", resolve_model=no_registry)
    assert request.stopping_condition.max_runtime_in_seconds == max_runtime()
    assert all(not stage.needs.accelerator for stage in plan.stages)  # data-free FP8: runs on any host


# --- Kubernetes ----------------------------------------------------------------------------------


def kubernetes_job() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kubernetes" / "job.yaml").read_text())


def test_kubernetes_job() -> None:
    job = kubernetes_job()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it; one attempt per pod
    (container,) = pod["containers"]
    assert container["image"].endswith(f"/optjob-worker:{VERSION}")
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    grace = int(env["OPTJOB_STOP_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] == grace
    assert job["spec"]["activeDeadlineSeconds"] >= max_runtime() + grace
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0


def test_kubernetes_spec_comes_from_the_configmap() -> None:
    configmap = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    pod = kubernetes_job()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    spec_arg = container["args"][container["args"].index("--spec") + 1]
    assert spec_arg == f"{mount['mountPath']}/spec.json" and "spec.json" in configmap["data"]
    # readOnlyRootFilesystem: everything the worker writes must be a volume.
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/work", "/tmp", "/home/optjob"} <= mounted


def test_kubernetes_retries_follow_exit_codes() -> None:
    rules = kubernetes_job()["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    fail = next(rule for rule in rules if rule["action"] == "FailJob")
    assert fail["onExitCodes"]["operator"] == "In" and fail["onExitCodes"]["containerName"] == "worker"
    assert set(fail["onExitCodes"]["values"]) == NOT_RETRIED


# --- AWS Batch -----------------------------------------------------------------------------------


def batch_definition() -> dict[str, Any]:
    return json.loads((DEPLOY / "batch" / "job-definition.json").read_text())


def test_batch_job_definition() -> None:
    definition = batch_definition()
    container = definition["containerProperties"]
    assert container["image"].endswith(f"/optjob-worker:{VERSION}")
    resources = {item["type"]: item["value"] for item in container["resourceRequirements"]}
    assert int(resources["GPU"]) >= 1
    assert container["user"] != "0" and container["user"] != "root"
    command = container["command"]
    assert command[0] == "--spec" and command[1] == "Ref::spec_uri" and "spec_uri" in definition["parameters"]
    env = {item["name"]: item["value"] for item in container["environment"]}
    grace = int(env["OPTJOB_STOP_GRACE_SECONDS"])  # ECS's default stop timeout is 30 s
    assert definition["timeout"]["attemptDurationSeconds"] == max_runtime() + grace + 60


def test_batch_retries_follow_exit_codes() -> None:
    strategy = batch_definition()["retryStrategy"]
    assert 1 < strategy["attempts"] <= 10
    conditions = strategy["evaluateOnExit"]
    assert len(conditions) <= 5  # the Batch API limit
    retried = {int(c["onExitCode"]) for c in conditions if c["action"] == "RETRY" and "onExitCode" in c}
    assert retried == exitcodes.RETRYABLE
    # Batch retries when no condition matches, so the last one must end everything else.
    assert conditions[-1] == {"onReason": "*", "action": "EXIT"}
    assert all(set(c) <= {"onExitCode", "onReason", "onStatusReason", "action"} for c in conditions)


# --- Slurm ---------------------------------------------------------------------------------------


def sbatch_options() -> dict[str, str]:
    options = {}
    for line in (DEPLOY / "slurm" / "optjob.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].strip().partition("=")
            options[key] = value
    return options


def slurm_seconds(text: str) -> int:
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, parts[0], parts[1])
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def test_slurm_script() -> None:
    path = DEPLOY / "slurm" / "optjob.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    options = sbatch_options()
    assert options["--gres"].startswith("gpu:")
    grace = int(re.search(r"^export OPTJOB_STOP_GRACE_SECONDS=(\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    signal_spec = re.fullmatch(r"B:TERM@(\d+)", options["--signal"])
    assert signal_spec is not None and int(signal_spec.group(1)) == grace
    limit = slurm_seconds(options["--time"])
    assert limit >= max_runtime() + grace
    assert limit - grace > max_runtime()  # the SIGTERM comes after the worker's own MaxRuntime stop
    assert "exec optjob-worker --spec" in text


# --- Dockerfiles ---------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


DOCKERFILES = [REPO / "Dockerfile", REPO / "Dockerfile.neuron"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=["cuda", "neuron"])
def test_dockerfile_shape(path: Path) -> None:
    all_instructions = instructions(path)
    assert not any(keyword == "HEALTHCHECK" for keyword, _ in all_instructions)  # one-shot container
    built = stages(path)
    assert len(built) >= 2 and all(" AS " in stage[0][1] for stage in built)  # multi-stage, named
    final = built[-1]
    assert any(k == "COPY" and rest.startswith("--from=build ") for k, rest in final)
    users = [rest for k, rest in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entrypoints = [rest for k, rest in final if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["optjob-worker"]
    labels = " ".join(rest for k, rest in final if k == "LABEL")
    assert 'org.opencontainers.image.version="${OPTJOB_VERSION}"' in labels
    args = {rest.split("=")[0]: rest.partition("=")[2] for k, rest in all_instructions if k == "ARG"}
    assert args["OPTJOB_VERSION"] == VERSION
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "OPTJOB_CONFIG_DIR=/opt/optjob/configs" in env and "OPTJOB_WORK_DIR=/work" in env
    assert any(k == "COPY" and rest == "configs /opt/optjob/configs" for k, rest in final)


def test_cuda_image_pins_torch_and_uses_a_runtime_base() -> None:
    path = REPO / "Dockerfile"
    args = {rest.split("=")[0]: rest.partition("=")[2] for k, rest in instructions(path) if k == "ARG"}
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", args["CUDA_BASE"])
    pinned = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                  if d.startswith("torch=="))  # fmt: skip
    assert args["TORCH_VERSION"] == pinned.removeprefix("torch==")
    assert args["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    run = " ".join(rest for k, rest in instructions(path) if k == "RUN")
    assert "--constraint requirements.lock" in run


def test_neuron_image_documents_the_neuron_repository() -> None:
    path = REPO / "Dockerfile.neuron"
    text = path.read_text()
    assert "pip.repos.neuron.amazonaws.com" in text and "Neuron repository" in text
    args = {rest.split("=")[0]: rest.partition("=")[2] for k, rest in instructions(path) if k == "ARG"}
    assert args["NEURON_BASE"].startswith("public.ecr.aws/neuron/")


def test_neuron_image_pins_what_the_neuron_plans_name() -> None:
    """optimum-neuron refuses a neuron_config.json naming another optimum-neuron or compiler, so the worker
    image, its base's SDK release and the serving image must all be the releases configs/neuron.yaml plans."""
    import yaml

    rules = yaml.safe_load((REPO / "configs" / "neuron.yaml").read_text())
    pins = dict(
        line.split("==") for line in (REPO / "envs" / "neuron-worker.in").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    assert pins["optimum-neuron[neuronx]"] == rules["optimum_neuron"]
    assert rules["neuronx_cc"].split("+")[0] == pins["neuronx-cc"]
    path = REPO / "Dockerfile.neuron"
    args = {rest.split("=")[0]: rest.partition("=")[2] for k, rest in instructions(path) if k == "ARG"}
    assert args["NEURON_BASE"].endswith(f"-sdk{rules['neuron_sdk']}-ubuntu22.04")
    serving = yaml.safe_load((REPO / "configs" / "images.yaml").read_text())["frameworks"]["neuronx"]["tag"]
    assert f"optimum{rules['optimum_neuron']}-neuronx" in serving and f"sdk{rules['neuron_sdk']}" in serving
    final = stages(path)[-1]
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "OPTJOB_NEURON_ENV=/opt/neuron" in env
    assert any(k == "COPY" and rest == "--from=build /opt/neuron /opt/neuron" for k, rest in final)


def test_dockerignore_keeps_what_the_images_copy() -> None:
    kept = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for path in DOCKERFILES:
        for keyword, rest in instructions(path):
            if keyword == "COPY" and not rest.startswith("--from="):
                sources = shlex.split(rest)[:-1]
                assert set(sources) <= kept, (path, sources)
                assert all((REPO / source).exists() for source in sources)


def test_docs_list_every_exit_code() -> None:
    docs = (REPO / "docs" / "workers.md").read_text()
    for code, status, _, _ in exitcodes.TABLE:
        assert re.search(rf"^\|\s*{code}\s*\|\s*{re.escape(status)}\s*\|", docs, re.MULTILINE), code
