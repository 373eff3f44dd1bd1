"""The Ray backend: each job attempt is a detached, named Ray actor that runs the ordinary worker process.

Why an actor around a process, not the pipeline inside a Ray task:

* **Stop is a real signal.** ``ray.cancel`` raises KeyboardInterrupt in the task's main thread at
  a bytecode boundary; it never reaches a stage blocked in C or running a compiler subprocess. The
  actor instead sends SIGTERM to the worker process, which takes the same path as on one host
  (stop at the next unit of work, publish nothing, remove scratch); after the grace period the
  actor is killed, and the worker with it (it is started with ``PR_SET_PDEATHSIG``).
* **A restarted control process adopts running jobs.** Ray kills a driver's tasks when the driver
  exits; a *detached* actor outlives it, and its name, recorded in the store (``executor_ref``),
  finds it again.
* **Placement is Ray's.** The actor is created with the job's resource request
  (``optjob.jobs.placement``); Ray queues it until a node has room. A request no live node could
  ever meet fails at once; one still unplaced after MaxPendingTimeInSeconds fails with
  SageMaker's capacity reason.
* **A lost node is retried.** An actor whose node died is reported dead by Ray; the executor then
  starts attempt N+1 (a new actor, ``optjob-job.<key>.<N+1>``) elsewhere, which resumes from the
  job's recorded progress. The previous attempt is dead before the next starts, and the store's
  compare-and-set claim keeps a straggler from owning the job.

Every node must see the optjob data directory (``OPTJOB_HOME``: the SQLite store and the job
logs) at the same path, as on one host or a shared filesystem; a node that cannot fails the job
at once, saying so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optjob.jobs.environment import worker_environment
from optjob.jobs.logs import JobLog
from optjob.jobs.placement import RayRules, ResourceRequest, job_request, missing, ray_rules
from optjob.jobs.store import JobRecord, Store
from optjob.pipeline.plan import Plan
from optjob.settings import Settings

ACTOR_PREFIX = "optjob-job"
_PR_SET_PDEATHSIG = 1


def actor_name(key: str, attempt: int) -> str:
    return f"{ACTOR_PREFIX}.{key}.{attempt}"


def connect(settings: Settings, rules: RayRules) -> None:
    """Join the cluster at ``RAY_ADDRESS`` as a driver (once per process), from this host's own address."""
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray_address, namespace=rules.namespace, _node_ip_address=settings.ray_node_ip,
                 log_to_driver=False, configure_logging=False)  # fmt: skip


def _die_with_parent() -> None:  # runs in the forked worker before exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class JobActor:
    """Runs on a Ray node: starts ``python -m optjob.jobs.worker KEY`` and answers status and signals.

    Every method returns at once, so the actor's one thread is never busy and a Stop is never
    queued behind a running call.
    """

    def __init__(self) -> None:
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, key: str, env: dict[str, str], db_path: str, out_path: str) -> dict[str, Any]:
        import ray

        node = {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
        }
        if not Path(db_path).is_file():
            return {**node, "error": f"this node cannot see the optjob data directory (no {db_path})"}
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "optjob.jobs.worker", key],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return {**node, "pid": self.popen.pid}

    def poll(self) -> int | None:
        """The worker's exit status, None while it runs (or before ``start``)."""
        return None if self.popen is None else self.popen.poll()

    def signal(self, number: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, number)


@dataclass
class RayHandle:
    """One attempt: the actor, and what ``start`` reported (its node and the worker's pid)."""

    key: str
    log_path: str
    name: str
    actor: Any
    rules: RayRules
    start_ref: Any = None  # None for an actor adopted after a restart (it had started)
    started: dict[str, Any] = field(default_factory=dict)
    term_sent_at: float | None = None
    kill_sent_at: float | None = None
    _returncode: int | None = None
    _lost: str | None = None
    _ended: bool = False

    @property
    def label(self) -> str:
        where = f"worker pid {self.started['pid']} on node {self.started['node_ip']}" if "pid" in self.started else ""
        return f"Ray actor {self.name}" + (f" ({where})" if where else "")

    @property
    def who(self) -> str:
        if "pid" in self.started:
            return f"pid {self.started['pid']} on Ray node {self.started['node_ip']}"
        return f"Ray actor {self.name}"

    def owns(self, record: JobRecord) -> bool:
        return record.executor_ref in (None, self.name)

    def waiting(self) -> bool:
        import ray

        return self.start_ref is not None and not self.started and not ray.wait([self.start_ref], timeout=0)[0]

    def alive(self) -> bool:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._ended:
            return False
        try:
            if self.waiting():
                return True
            if self.start_ref is not None and not self.started:
                self.started = ray.get(self.start_ref)
                self._log_start()
                if "error" in self.started:
                    self._lost = self.started["error"]
                    self._ended = True
                    return False
            returncode = ray.get(self.actor.poll.remote(), timeout=self.rules.poll_timeout_s)
        except GetTimeoutError:
            return True  # a slow node is not a dead one; Ray says when it is
        except RayActorError as exc:
            self._lost = _death(exc, self.started)
            self._ended = True
            return False
        if returncode is None:
            return True
        self._returncode, self._ended = returncode, True
        return False

    def returncode(self) -> int | None:
        return self._returncode

    def lost(self) -> str | None:
        return self._lost

    def terminate(self) -> None:
        self.actor.signal.remote(signal.SIGTERM)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)  # the worker dies with it (PR_SET_PDEATHSIG)

    def _log_start(self) -> None:
        where = f"node {self.started.get('node_ip')} (id {str(self.started.get('node_id'))[:12]})"
        if "error" in self.started:
            JobLog(self.log_path).write("executor", "refused", f"{self.name} on {where}: {self.started['error']}")
        else:
            JobLog(self.log_path).write(
                "executor", "started", f"{self.name} on {where}: worker pid {self.started['pid']}"
            )


def _death(exc: Exception, started: dict[str, Any]) -> str:
    node = f"node {started['node_ip']} (id {str(started.get('node_id'))[:12]})" if started else "its node"
    first = str(exc).strip().splitlines()
    detail = next((line.strip() for line in first if "died" in line.lower() or "node" in line.lower()), "")
    return f"the Ray actor on {node} died" + (f" ({detail[:200]})" if detail else "")


class RayBackend:
    """Jobs as detached actors on the Ray cluster at ``RAY_ADDRESS``; Ray queues them (no slot count)."""

    name = "ray"
    slots = None

    def __init__(self, settings: Settings, store: Store, *, rules: RayRules | None = None) -> None:
        import ray

        if not settings.ray_address:
            raise RuntimeError(
                "the Ray executor needs a cluster: set RAY_ADDRESS to its GCS address (what `ray start --head` "
                "prints, e.g. 127.0.0.2:6379) or to 'auto' for a cluster started on this host"
            )
        self.settings = settings
        self.store = store
        self.rules = rules or ray_rules()
        self.max_attempts = self.rules.max_attempts
        connect(settings, self.rules)
        self._actor_class = ray.remote(JobActor)

    def recorded(self, job: JobRecord) -> bool:
        return job.executor_ref is not None

    def request(self, job: JobRecord) -> ResourceRequest:
        return job_request(Plan.model_validate_json(job.plan_json), self.rules)

    def infeasible(self, job: JobRecord) -> str | None:
        import ray

        return missing(self.request(job), ray.nodes())

    def pending_reason(self, job: JobRecord) -> str:
        return (
            f"CapacityError: no Ray node with {self.request(job).describe()} became free within "
            f"StoppingCondition.MaxPendingTimeInSeconds ({job.max_pending_s or 0:g} s): the nodes that have these "
            "resources are busy with other jobs. Retry later, add nodes, or raise MaxPendingTimeInSeconds"
        )

    def launch(self, job: JobRecord) -> RayHandle | None:
        attempt = job.attempts + 1
        name = actor_name(job.job_key, attempt)
        if not self.store.transition(
            job.job_key,
            expect=("STARTING", "INPROGRESS"),
            executor_ref=name,
            attempts=attempt,
            where_pid=(None,),
        ):
            return None
        request = self.request(job)
        actor = self._actor_class.options(
            name=name,
            namespace=self.rules.namespace,
            lifetime="detached",
            max_restarts=0,
            **request.actor_options(),
        ).remote()
        env = worker_environment(self.settings, job)
        out_path = str(Path(job.log_path).with_suffix(".out"))
        start_ref = actor.start.remote(job.job_key, env, str(self.settings.db_path), out_path)
        JobLog(job.log_path).write(
            "executor",
            "placed",
            f"attempt {attempt} of {self.max_attempts}: Ray actor {name} asks for {request.describe()}",
        )
        return RayHandle(job.job_key, job.log_path, name, actor, self.rules, start_ref=start_ref)

    def adopt(self, job: JobRecord) -> RayHandle | None:
        import ray

        assert job.executor_ref is not None
        try:
            actor = ray.get_actor(job.executor_ref, namespace=self.rules.namespace)
        except ValueError:
            return None  # gone: it ended (or its node died) while no executor watched
        handle = RayHandle(job.job_key, job.log_path, job.executor_ref, actor, self.rules)
        if job.worker_pid is not None:
            handle.started = {"pid": job.worker_pid, "node_ip": "?"}
        return handle

    def sweep(self) -> list[str]:
        """Kill job actors the store no longer names: attempts of ended jobs whose end no executor saw.

        A control process that stops between a worker's end and the next poll leaves that actor
        idle, holding its node's resources; the next executor frees it here.
        """
        import ray

        wanted = {job.executor_ref for job in self.store.active() if job.executor_ref}
        freed = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name, namespace = entry["name"], entry["namespace"]
            if namespace != self.rules.namespace or not name.startswith(ACTOR_PREFIX + ".") or name in wanted:
                continue
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
                freed.append(name)
        return freed

    def release(self, handle: RayHandle) -> None:
        """An ended attempt's actor still holds its resources: free them."""
        import ray

        with contextlib.suppress(Exception):  # already gone is the goal
            ray.kill(handle.actor, no_restart=True)
