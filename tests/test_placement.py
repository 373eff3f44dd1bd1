"""How a plan becomes a Ray resource request, and why no node fits (configs/ray.yaml as data)."""

from __future__ import annotations

from typing import Any

from optjob.jobs.placement import RayRules, job_request, missing, ray_rules
from optjob.pipeline.plan import Plan, build_plan
from optjob.pipeline.stage import StageNeeds
from tests.support.jobs import make_request

FP8 = {
    "ModelQuantizationConfig": {"OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}}
}
AWQ = {"ModelQuantizationConfig": {"OverrideEnvironment": {"OPTION_QUANTIZE": "awq"}}}
NEURON = {"ModelCompilationConfig": {"OverrideEnvironment": {"OPTION_TENSOR_PARALLEL_DEGREE": "2"}}}


def plan_of(*configs: dict[str, Any], instance: str = "ml.g6.12xlarge") -> Plan:
    request = make_request("p", DeploymentInstanceType=instance, OptimizationConfigs=list(configs))
    return build_plan(request, region="us-east-1", resolve_image=False)


def node(address: str, **resources: float) -> dict[str, Any]:
    return {"Alive": True, "NodeManagerAddress": address, "Resources": resources}


def test_streaming_jobs_ask_for_a_cpu_and_buffer_memory_only() -> None:
    request = job_request(plan_of(FP8))
    assert request.amounts == {"CPU": 1.0, "memory": 1024 * 2**20}
    assert request.actor_options() == {"num_cpus": 1.0, "num_gpus": 0, "memory": 1024 * 2**20}


def test_whole_model_stages_ask_for_more_memory_and_toolchains_for_their_resource() -> None:
    assert job_request(plan_of(AWQ)).amounts["memory"] == 4096 * 2**20
    neuron = job_request(plan_of(NEURON, instance="ml.inf2.48xlarge"))
    assert neuron.amounts == {"CPU": 1.0, "memory": 4096 * 2**20, "neuron_sdk": 1.0}
    assert neuron.actor_options()["resources"] == {"neuron_sdk": 1.0}
    assert neuron.why["neuron_sdk"] == "Compilation drives neuron_env"


def test_a_stage_that_needs_an_accelerator_asks_for_a_gpu_of_the_targets_type() -> None:
    plan = plan_of(FP8)
    stage = plan.stages[0].model_copy(update={"needs": StageNeeds(accelerator=True, whole_model_in_memory=False)})
    request = job_request(plan.model_copy(update={"stages": (stage,)}))
    assert request.amounts["GPU"] == 1 and request.amounts["accelerator_type:L4"] == 0.001
    assert request.actor_options()["num_gpus"] == 1
    rules = RayRules.model_validate(
        {**ray_rules().model_dump(), "accelerator": {"num_gpus": 1, "by_target_type": False}}
    )
    assert "accelerator_type:L4" not in job_request(plan.model_copy(update={"stages": (stage,)}), rules).amounts


def test_missing_names_what_no_live_node_has() -> None:
    request = job_request(plan_of(NEURON, instance="ml.inf2.48xlarge"))
    big = 8 * 2**30
    assert (
        missing(request, [node("10.0.0.1", CPU=4, memory=big), node("10.0.0.2", CPU=1, memory=big, neuron_sdk=1)])
        is None
    )
    reason = missing(request, [node("10.0.0.1", CPU=4, memory=big), {**node("10.0.0.9", neuron_sdk=1), "Alive": False}])
    assert reason.startswith("no node of the Ray cluster has {CPU: 1, memory: 4 GiB, neuron_sdk: 1}")
    assert "missing everywhere: neuron_sdk (Compilation drives neuron_env)" in reason
    assert "10.0.0.1 lacks neuron_sdk" in reason and "10.0.0.9" not in reason  # dead nodes do not count
    # Each resource exists somewhere, but never together on one node.
    split = missing(request, [node("a", CPU=1, memory=big), node("b", neuron_sdk=1)])
    assert "one node with all of them" in split and "a lacks neuron_sdk" in split and "b lacks CPU, memory" in split
    assert missing(request, []) == "the Ray cluster has no live node"


def test_serve_on_ray_needs_a_cluster_address_and_help_says_how(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    import optjob.cli.serve  # noqa: F401  (registers the command on the app)
    from optjob.cli import app

    monkeypatch.setenv("OPTJOB_HOME", str(tmp_path / "home"))
    for name in ("RAY_ADDRESS", "OPTJOB_EXECUTOR", "OPTJOB_AUDIT_LOG", "OPTJOB_NO_AUTH"):
        monkeypatch.setenv(name, "")  # recorded so that what serve sets is restored afterwards
        monkeypatch.delenv(name)
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--no-auth", "--executor", "ray"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "set RAY_ADDRESS" in text and "ray start --head" in text, text
    result = runner.invoke(app, ["serve", "--no-auth", "--executor", "slurm"])
    assert result.exit_code == 2 and "'local' or 'ray'" in result.output
    help_text = " ".join(runner.invoke(app, ["serve", "--help"]).output.split())
    assert "--executor" in help_text and "RAY_ADDRESS" in help_text
