"""Helper workers on Ray for a streaming job with MaxInstanceCount > 1 (``pipeline.shard_farm.ShardFarm``).

Each handed-out shard is one Ray task asking for what a streaming job asks for (``placement``), so
Ray puts it on any node with a free CPU, usually not the one the job's own worker holds. At most
MaxInstanceCount - 1 run at once: the job's worker is the first instance. The tasks belong to the
job's worker process (it connects to the cluster as a Ray driver): if that process dies, Ray ends
its helpers with it, so a helper never outlives its job. A helper gets the job's S3 settings and
the AWS variables of the worker's environment (Ray starts its worker processes with the cluster's
environment, not ours).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

from optjob.jobs.placement import job_request, ray_rules
from optjob.jobs.ray_backend import connect
from optjob.pipeline.plan import Plan
from optjob.pipeline.shard_farm import HelperResult
from optjob.pipeline.shard_helper import helper_result, timed_unit
from optjob.settings import Settings

_PASSED_VARIABLES = ("AWS_", "OPTJOB_CONFIG_DIR", "OPTJOB_STREAM_")


def _make_shard(plan_json: str, job_arn: str, rel: str, etag: str, storage: Any) -> dict:
    """Runs on a Ray node: one output shard of the job (``shard_helper.run_shard_unit``)."""
    import ray

    node = f"{ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:12]})"
    work_dir = os.path.join(tempfile.gettempdir(), f"optjob-helper-{uuid.uuid4().hex[:12]}")
    return timed_unit(plan_json, job_arn, rel, etag, work_dir, storage, node)


class RayShardFarm:
    def __init__(self, settings: Settings, plan: Plan, *, job_arn: str, storage: Any, instances: int) -> None:
        import ray

        rules = ray_rules()
        connect(settings, rules)
        self.slots = max(instances - 1, 0)
        self.plan_json, self.job_arn, self.storage = plan.model_dump_json(), job_arn, storage
        env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_VARIABLES)}
        options = job_request(plan, rules).actor_options()
        self._task = ray.remote(_make_shard).options(max_retries=0, runtime_env={"env_vars": env}, **options)

    def submit(self, rel: str, etag: str) -> tuple[str, Any]:
        return rel, self._task.remote(self.plan_json, self.job_arn, rel, etag, self.storage)

    def ready(self, ticket: tuple[str, Any]) -> bool:
        import ray

        return bool(ray.wait([ticket[1]], timeout=0)[0])

    def result(self, ticket: tuple[str, Any]) -> HelperResult:
        import ray

        rel, ref = ticket
        try:
            return helper_result(ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - a lost node or a dead task: the job's worker does the shard
            return HelperResult(rel=rel, node="a Ray node", seconds=0.0, error=f"{type(exc).__name__}: {exc}"[:300])

    def cancel(self, ticket: tuple[str, Any]) -> None:
        import ray

        ray.cancel(ticket[1], force=True)
