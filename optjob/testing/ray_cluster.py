"""A real multi-node Ray cluster on loopback, for tests and benchmarks: ``LoopbackRayCluster``.

Ray's own multi-node helper (``ray.cluster_utils.Cluster``) runs in a child process (this module's
``main``), so the test process never becomes a Ray driver and each node is a real raylet with its
own processes. Every node listens on 127.0.0.2: Ray rewrites 127.0.0.1 to the host's interface
address, and only loopback may be contacted here. Ray's temp dir lives under the caller's work
dir, usage stats are off, object stores are tiny, and node-death detection is tightened so a lost
node is noticed in seconds.

Stopping is by PID only: the child shuts its own nodes down, and whatever it reported and is still
alive afterwards is killed by the pid it reported (``ray stop`` would end every Ray process on the
machine, other people's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil

NODE_IP = "127.0.0.2"
OBJECT_STORE_BYTES = 80 * 2**20
NODE_MEMORY_BYTES = 6 * 2**30  # Ray's logical memory resource per node (what jobs are placed by)
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}


def ray_environment(temp_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1", RAY_TMPDIR=str(temp_dir))
    return env


class LoopbackRayCluster:
    """``nodes``: name -> {"num_cpus": N, "resources": {...}}; the first is the head."""

    def __init__(self, work_dir: Path, nodes: dict[str, dict[str, Any]], *, timeout_s: float = 120) -> None:
        self.temp_dir = Path(work_dir) / "ray"
        (self.temp_dir / "ray").mkdir(parents=True, exist_ok=True)  # Ray writes its address file there
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "optjob.testing.ray_cluster", str(self.temp_dir), json.dumps(nodes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.temp_dir / "cluster.log", "ab"),  # noqa: SIM115 - the child owns it
            env=ray_environment(self.temp_dir),
            text=True,
        )
        self.nodes: dict[str, dict[str, Any]] = {}
        self.address = ""
        self._pids: set[int] = set()
        reply = self._reply(timeout_s)
        self.address = reply["address"]
        self._record(reply["nodes"])

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the Ray cluster helper exited; see {self.temp_dir / 'cluster.log'}")
            if line.startswith("{"):
                return json.loads(line)
        raise TimeoutError("the Ray cluster helper did not answer")

    def _record(self, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            self.nodes[node["name"]] = node
            self._pids.update(node["pids"])

    def _command(self, command: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._reply(timeout_s)

    def add_node(self, name: str, **spec: Any) -> dict[str, Any]:
        reply = self._command({"add": name, "spec": spec})
        self._record(reply["nodes"])
        return self.nodes[name]

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet by its pid: the node dies as if its machine had."""
        os.kill(self.nodes[name]["raylet_pid"], signal.SIGKILL)

    def environment(self) -> dict[str, str]:
        """What a control process needs to use this cluster (``OPTJOB_EXECUTOR=ray``)."""
        return {
            "OPTJOB_EXECUTOR": "ray",
            "RAY_ADDRESS": self.address,
            "OPTJOB_RAY_NODE_IP": NODE_IP,
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def shutdown(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(Exception):
                self._command({"shutdown": True}, timeout_s=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pid in self._pids:  # whatever the helper reported and is still ours
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()

    def __enter__(self) -> LoopbackRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# --- the helper process -------------------------------------------------------------------------


def _node_args(temp_dir: Path, spec: dict[str, Any], *, head: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "node_ip_address": NODE_IP,
        "num_cpus": spec.get("num_cpus", 1),
        "resources": spec.get("resources", {}),
        "memory": spec.get("memory", NODE_MEMORY_BYTES),
        "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False,
    }
    if head:
        args.update(temp_dir=str(temp_dir / "ray"), _system_config=HEALTH)
    return args


def _describe(name: str, node: Any) -> dict[str, Any]:
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    raylet = node.all_processes["raylet"][0].process.pid
    return {"name": name, "node_id": node.node_id, "raylet_pid": raylet, "pids": pids}


def _say(out: IO[str], payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    from ray.cluster_utils import Cluster

    temp_dir, spec_json = argv or sys.argv[1:]
    specs: dict[str, dict[str, Any]] = json.loads(spec_json)
    names = list(specs)
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(Path(temp_dir), specs[names[0]], head=True))
    described = [_describe(names[0], cluster.head_node)]
    for name in names[1:]:
        described.append(_describe(name, cluster.add_node(**_node_args(Path(temp_dir), specs[name], head=False))))
    cluster.wait_for_nodes()
    _say(sys.stdout, {"address": cluster.address, "nodes": described})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("shutdown"):
            cluster.shutdown()
            _say(sys.stdout, {"nodes": []})
            return 0
        node = cluster.add_node(**_node_args(Path(temp_dir), command["spec"], head=False))
        _say(sys.stdout, {"nodes": [_describe(command["add"], node)]})
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
