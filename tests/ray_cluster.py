"""A real multi-node Ray cluster on loopback for tests: a CPU-less head and worker nodes.

Every node is started with ``ray start --block`` in its own session (process group), with the
loopback setting (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) inherited by every Ray process it
starts. Ray's CLI refuses to add a worker node under that setting; :data:`CLI` lifts that one
check for the CLI process only (``ray.scripts.scripts`` reads ``ENABLE_RAY_CLUSTER`` in that guard
and in the head's hint; ``services`` keeps the real constant, so every address stays 127.0.0.1).

Each worker node has a private view of the disk, as on a real cluster: it runs under ``unshare
--mount`` with a tmpfs over ``/tmp/ray`` (its own session folder) and over ``hidden`` (a folder only
the head and the test see), so a file the worker needs must come through object storage. Each node
has its own ports and its own ``FACEGEN_CACHE_DIR``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loopback import free_port

#: ``python -c CLI start ...`` == ``ray start ...`` with the multi-node guard lifted for the CLI only.
CLI = r"""
import os, sys, types
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray._private.ray_constants as real
from ray.scripts import scripts

class _Constants(types.ModuleType):
    def __getattr__(self, name):
        return getattr(real, name)

cli_constants = _Constants("ray_constants_for_the_cli")
cli_constants.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = cli_constants
sys.argv = ["ray", *sys.argv[1:]]
scripts.main()
"""

#: How fast the GCS declares a killed node dead (Ray's defaults take up to about 30 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Node:
    """One started node: its ``ray start`` process, cache folder and custom resource name."""

    name: str
    process: subprocess.Popen
    cache_dir: Path
    resource: str
    node_id: str = ""
    extra_pids: list[int] = field(default_factory=list)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


class LoopbackCluster:
    """Head (``--num-cpus=0``) plus ``workers`` nodes of ``worker_cpus`` CPUs, all on 127.0.0.1."""

    def __init__(self, root: Path, workers: int = 2, worker_cpus: int = 2, hidden: Path | None = None,
                 env: dict[str, str] | None = None, object_store_mb: int = 300):
        self.root, self.workers_wanted, self.worker_cpus, self.hidden = Path(root), workers, worker_cpus, hidden
        self.object_store = object_store_mb << 20
        bin_dir = Path(sys.executable).parent
        self.env = {**os.environ, **(env or {}), **FAST_HEALTH_CHECKS,
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FACEGEN_CACHE_DIR"):
            self.env.pop(name, None)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.head: Node | None = None
        self.workers: list[Node] = []

    @property
    def address(self) -> str:
        """The GCS address (for ``ray.init``)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The job-submission / state API address."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], resource: str, private: bool) -> Node:
        cache = self.root / name / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FACEGEN_CACHE_DIR": str(cache)}
        cmd = [sys.executable, "-c", CLI, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--object-store-memory={self.object_store}", f"--resources={{\"{resource}\": 1}}", *args]
        if private:
            # a node's own disk: its Ray temp folder (session, sockets, unpacked runtime envs) and no
            # view of the head-only folder; nodes sharing /tmp/ray race for socket names and delete
            # each other's unpacked working directories
            hide = f' && mount -t tmpfs -o size=4m tmpfs "{self.hidden}"' if self.hidden is not None else ""
            script = f'mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray{hide} && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return Node(name, proc, cache, resource)

    def start(self) -> "LoopbackCluster":
        """Start the head, then the workers; returns when every node is alive in the GCS."""
        import urllib.request

        self.head = self._start("head", ["--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                                          "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                          f"--dashboard-agent-listen-port={free_port()}",
                                          f"--ray-client-server-port={free_port()}"], "node_head", private=False)

        def dashboard_up() -> bool:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return True
            except OSError:
                return False

        _wait(dashboard_up, 90, "the head's dashboard did not come up")
        for k in range(self.workers_wanted):
            # one after the other: nodes starting at once in one session folder race for the same
            # socket names (raylet.1, plasma_store.1) and one of them fails to bind
            self.workers.append(self._start(f"worker{k}", self.worker_args(k), f"node_worker{k}", private=True))
            _wait(lambda: len(self.alive_nodes()) == 2 + k, 90, f"worker node {k} did not join")
        for node in [self.head, *self.workers]:
            node.node_id = next(n["node_id"] for n in self.alive_nodes() if node.resource in n["resources_total"])
        return self

    def worker_args(self, k: int) -> list[str]:
        """``ray start`` arguments of worker node ``k``: its own ports and worker-port range."""
        low = 20000 + 2000 * k
        return [f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--min-worker-port={low}", f"--max-worker-port={low + 1999}"]

    def restart_worker(self, k: int) -> None:
        """Start worker node ``k`` again after :meth:`kill_worker` (it joins with a new node id)."""
        old = self.workers[k]
        node = self._start(old.name, self.worker_args(k), old.resource, private=True)
        self.workers[k] = node
        _wait(lambda: any(node.resource in n["resources_total"] for n in self.alive_nodes()), 90, f"{old.name} did not rejoin")
        node.node_id = next(n["node_id"] for n in self.alive_nodes() if node.resource in n["resources_total"])

    def alive_nodes(self) -> list[dict]:
        """The GCS's alive nodes (node_id, node_ip, resources_total) through the state API."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            return []
        return [{"node_id": n.node_id, "node_ip": n.node_ip, "resources_total": n.resources_total}
                for n in nodes if n.state == "ALIVE"]

    def node_of(self, node_id: str) -> str:
        """``head`` / ``worker0`` / ... of a node id."""
        return next(n.name for n in [self.head, *self.workers] if n.node_id == node_id)

    @staticmethod
    def _processes(node: Node) -> list:
        """Every process of a node: its ``ray start`` session (raylet, agents, GCS on the head, even
        when ``ray start`` itself has exited) and their descendants (the workers, each in its own group)."""
        import psutil

        found = {}
        for proc in psutil.process_iter():
            try:
                if proc.pid == node.process.pid or os.getpgid(proc.pid) == node.process.pid:
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                continue
        for proc in list(found.values()):
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    @classmethod
    def _kill(cls, node: Node) -> int:
        import psutil

        procs = cls._processes(node)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        if node.process.poll() is None:
            node.process.wait(timeout=10)
        return len(procs)

    def kill_worker(self, k: int) -> int:
        """SIGKILL every process of worker node ``k``; returns how many processes were killed."""
        return self._kill(self.workers[k])

    def stop(self) -> None:
        """Stop every node (workers first): SIGTERM to each session, then SIGKILL to what is left."""
        for node in [*self.workers, *([self.head] if self.head else [])]:
            try:
                os.killpg(node.process.pid, signal.SIGTERM)
                node.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            self._kill(node)
        self._forget_address()

    def _forget_address(self) -> None:
        """Remove the head's entry in ``/tmp/ray/ray_current_cluster`` as ``ray stop`` does, so no
        later process takes this stopped cluster for the machine's running one."""
        from ray._common.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
        try:
            if path.read_text().strip() == self.address:
                path.unlink()
        except FileNotFoundError:
            pass
