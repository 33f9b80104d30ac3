"""`ray job submit` of a ray_jobs entrypoint against a real head node on loopback.

The head runs with ``--block`` in its own process group, so the test stops exactly that cluster
(``ray stop`` would also kill the session's local Ray).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegen import blocks as blk

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"dashboard on 127.0.0.1:{port} did not come up")


@pytest.fixture(scope="module")
def head_node():
    bin_dir = Path(sys.executable).parent
    gcs_port, dashboard_port, agent_port, client_port = (_free_port() for _ in range(4))
    # the job's `python` must be this environment's interpreter, as on a cluster where facegen is installed
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps this head, its GCS and its jobs on 127.0.0.1
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2", "--include-dashboard=true",
         # the session's local Ray already holds the fixed defaults (agent 52365, client 10001):
         # without free ports here this head's job agent cannot start and submissions are refused
         f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(dashboard_port, 90)
        yield dashboard_port, env, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _submit(port: int, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{port}",
           "--working-dir", str(REPO), "--", "python", *args]
    deadline = time.time() + 120
    while True:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
        # the dashboard answers before the node's job agent has registered: a refused submission
        # ("No available agent") is transient at start-up, so it is retried within the deadline
        if result.returncode == 0 or "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


def test_whole_pipeline_job_submitted_to_a_running_cluster(head_node, tmp_path):
    import yaml

    from facegen import storage
    from facegen.shards import load_manifest, verify_shards
    from tiny_pipeline import tiny_embedder, tiny_settings

    port, env, _ = head_node
    out = tmp_path / "run"
    settings = tiny_settings(str(out), tiny_embedder(tmp_path), name="job-tiny")
    settings["tracking"] = {"mode": "disabled"}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = _submit(port, env, ["ray_jobs/pipeline.py", "--config", str(config), "--no-progress"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout and "facegen pipeline summary" in result.stdout
    assert "Traceback" not in result.stdout

    assert blk.done_block_ids(str(out / "raw")) == [0, 1] == blk.done_block_ids(str(out / "clean"))
    assert verify_shards(str(out / "shards")) == [] and load_manifest(str(out / "shards"))["num_rows"] > 0
    trained = storage.read_json(str(out / "train" / "job-tiny" / "result.json"))
    assert trained["epochs_completed"] == 1
    assert (Path(trained["backbone_dir"]) / "backbone.safetensors").is_file()
    summary = storage.read_json(str(out / "summary.json"))
    assert summary["verification"][0]["pairs"] == 40


def test_head_node_listens_and_reports_only_loopback(head_node):
    import psutil
    from ray.util.state import list_nodes
    from test_ray_loopback import is_loopback

    port, _, pid = head_node
    nodes = list_nodes(address=f"http://127.0.0.1:{port}")
    assert nodes and all(is_loopback(n.node_ip) for n in nodes), nodes
    listening = set()
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            listening.update(c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    # the GCS, raylet, dashboard and job agent: none on 0.0.0.0 / "::" or the machine's other address
    assert listening and all(is_loopback(ip) for ip in listening), listening
