"""A local Ray started by facegen stays on loopback: node, GCS, every listening socket, MASTER_ADDR.

Run in a fresh interpreter whose environment lacks ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, with
``ray`` imported before ``init_ray``: the guard must hold whatever the import order.
"""

import ipaddress
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CHECK = r"""
import json, os
import ray  # imported first on purpose
import psutil
from facegen.config import RaySettings
from facegen.ray_utils import init_ray

how = init_ray(RaySettings(num_cpus=2))
nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
gcs = ray.get_runtime_context().gcs_address

listening = set()
for proc in psutil.Process().children(recursive=True):
    try:
        conns = proc.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        continue
    listening.update(c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN)

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def report_master_addr(config):
    import os
    with open(os.path.join(config["out"], "master_addr"), "w") as f:
        f.write(os.environ.get("MASTER_ADDR", ""))

TorchTrainer(
    report_master_addr,
    train_loop_config={"out": os.environ["CHECK_STORAGE"]},
    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
    run_config=RunConfig(name="loopback", storage_path=os.environ["CHECK_STORAGE"]),
).fit()
print("RESULT " + json.dumps({"how": how, "env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), "nodes": nodes,
                              "gcs": gcs, "listening": sorted(listening), "master_addr": open(os.path.join(os.environ["CHECK_STORAGE"], "master_addr")).read()}))
ray.shutdown()
"""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped IPv6 loopback (``::ffff:127.0.0.1``)."""
    ip = ipaddress.ip_address(host)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_local_init_ray_keeps_node_gcs_sockets_and_master_addr_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env.update(CHECK_STORAGE=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["how"] == "local"
    assert got["env"] == "0"
    assert got["nodes"] and all(is_loopback(n) for n in got["nodes"]), got
    assert is_loopback(got["gcs"].rsplit(":", 1)[0]), got
    # 0.0.0.0 or "::" would also mean "every interface": only loopback addresses may listen
    assert got["listening"] and all(is_loopback(ip) for ip in got["listening"]), got
    assert is_loopback(got["master_addr"]), got


def test_init_ray_leaves_a_cluster_run_untouched(monkeypatch):
    from facegen.config import RaySettings
    from facegen.ray_utils import LOOPBACK_ENV, keep_local_ray_on_loopback

    # Ray's own connect is refused at once: a real attempt waits out the client's 30 s timeout, and
    # with the guard lifted it would send its packets to the machine's other address
    code = (
        "import os\nimport ray\nfrom facegen.config import RaySettings\nfrom facegen.ray_utils import init_ray\n"
        "def refuse(*args, **kwargs):\n    raise ConnectionError(kwargs.get('address'))\n"
        "ray.init = refuse\n"
        "try:\n    init_ray(RaySettings(address='ray://127.0.0.1:1'))\nexcept ConnectionError as exc:\n"
        "    print('JOINED', exc)\n"
        f"print('ENV', os.environ.get({LOOPBACK_ENV!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != LOOPBACK_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "JOINED ray://127.0.0.1:1" in out and "ENV None" in out, out
    assert callable(keep_local_ray_on_loopback) and RaySettings().address is None
