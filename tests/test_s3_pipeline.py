"""generate -> clean -> shard -> train -> eval against a real S3-compatible server on loopback.

The server is moto's (``moto.server.ThreadedMotoServer``), started and stopped by the test. The
pipeline runs as a user runs it (``facegen pipeline --config``) with ``output_dir: s3://...`` and
the endpoint in the config's ``storage`` section; the test then reads what it wrote through the
same pyarrow path with the endpoint in the usual ``AWS_ENDPOINT_URL`` variable.
"""

import os
import subprocess
import sys

import pytest
import yaml

from facegen import blocks as blk
from facegen import storage
from tiny_pipeline import tiny_embedder, tiny_settings

pytestmark = pytest.mark.slow
BUCKET = "facegen-test"
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


def test_pipeline_writes_and_reads_everything_on_s3(s3_server, tmp_path, monkeypatch):
    settings = tiny_settings(f"s3://{BUCKET}/run", tiny_embedder(tmp_path), name="s3-tiny")
    settings["storage"] = {"s3_endpoint": s3_server, "s3_region": "us-east-1"}
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, **CREDENTIALS, "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)  # the endpoint comes from the config only
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-m", "facegen", "pipeline", "--config", str(config), "--no-progress"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "facegen pipeline summary" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    from facegen.shards import load_manifest, verify_shards

    run = f"s3://{BUCKET}/run"
    assert blk.done_block_ids(f"{run}/raw") == [0, 1] == blk.done_block_ids(f"{run}/clean")
    assert blk.check_blocks(f"{run}/raw", checksum=lambda paths: [storage.sha256_of(p) for p in paths]).invalid == {}
    manifest = load_manifest(f"{run}/shards")
    assert verify_shards(f"{run}/shards") == [] and manifest["num_rows"] > 0
    summary = storage.read_json(f"{run}/summary.json")
    assert summary["train"]["epochs_completed"] == 1
    assert storage.exists(f"{summary['train']['backbone_dir']}/backbone.safetensors")
    assert summary["train"]["backbone_dir"].startswith(f"{run}/train/s3-tiny")
    assert storage.read_json(f"{run}/train/s3-tiny/dataset.json")["manifest_digest"] == manifest["digest"]
    [heldout] = summary["verification"]
    assert heldout["pairs"] == 40 and storage.exists(f"{run}/heldout/heldout.bin")
    assert not list(work.glob("s3*")), "an s3:// path was written as a local folder"
