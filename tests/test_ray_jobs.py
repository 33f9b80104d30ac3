"""`ray job submit` of the whole pipeline against a real head node on loopback, writing to S3.

The head runs with ``--block`` in its own process group, so the test stops exactly that cluster
(``ray stop`` would also kill the session's local Ray). The storage is a real S3-compatible
server on loopback (moto's, started and stopped here): the job reaches it through the same
pyarrow code path as a user's ``s3://bucket/...``, the endpoint coming from the job's config;
the test reads the results back with the endpoint in the usual ``AWS_ENDPOINT_URL`` variable.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegen import blocks as blk
from loopback import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


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


BUCKET = "facegen-test"
#: what the nodes of a real cluster get from their instance role; moto accepts any
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                               region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def head_node():
    bin_dir = Path(sys.executable).parent
    gcs_port, dashboard_port, agent_port, client_port = (free_port() for _ in range(4))
    # the job's `python` must be this environment's interpreter, as on a cluster where facegen is installed
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps this head, its GCS and its jobs on 127.0.0.1
    env = {**os.environ, **CREDENTIALS, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)  # the job's config names the endpoint
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
            proc.wait(timeout=8)
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


def test_whole_pipeline_job_on_a_running_cluster_writes_everything_to_s3(head_node, s3_server, tmp_path, monkeypatch):
    import yaml

    from facegen import storage
    from facegen.shards import load_manifest, verify_shards
    from tiny_pipeline import tiny_embedder, tiny_settings

    port, env, _ = head_node
    run = f"s3://{BUCKET}/job-run"
    settings = tiny_settings(run, tiny_embedder(tmp_path), name="job-tiny")
    settings["storage"] = {"s3_endpoint": s3_server, "s3_region": "us-east-1"}
    settings["tracking"] = {"mode": "disabled"}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(settings))
    result = _submit(port, env, ["ray_jobs/pipeline.py", "--config", str(config), "--no-progress"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout and "facegen pipeline summary" in result.stdout
    assert "Traceback" not in result.stdout

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    assert blk.done_block_ids(f"{run}/raw") == [0, 1] == blk.done_block_ids(f"{run}/clean")
    assert blk.check_blocks(f"{run}/raw", checksum=lambda paths: [storage.sha256_of(p) for p in paths]).invalid == {}
    manifest = load_manifest(f"{run}/shards")
    assert verify_shards(f"{run}/shards") == [] and manifest["num_rows"] > 0
    trained = storage.read_json(f"{run}/train/job-tiny/result.json")
    assert trained["epochs_completed"] == 1 and trained["backbone_dir"].startswith(f"{run}/train/job-tiny")
    assert storage.exists(f"{trained['backbone_dir']}/backbone.safetensors")
    assert storage.read_json(f"{run}/train/job-tiny/dataset.json")["manifest_digest"] == manifest["digest"]
    summary = storage.read_json(f"{run}/summary.json")
    assert summary["verification"][0]["pairs"] == 40 and storage.exists(f"{run}/heldout/heldout.bin")


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
