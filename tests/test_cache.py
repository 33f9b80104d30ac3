"""Inputs from storage: metadata digests, the node-local cache (once per node, locked, never partial),
and the one-line errors of bad inputs (a missing s3:// model, an unreachable endpoint, a GPU pool on
a CPU-only cluster) before any work."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from typer.testing import CliRunner

from facegen import cache
from s3 import BUCKET, moto_server, s3_env, upload


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint, s3_env(endpoint):
        yield endpoint


@pytest.fixture()
def model_uri(tmp_path, s3_endpoint):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(300_000))
    (folder / "sub" / "config.json").write_text('{"width": 8}')
    uri = f"s3://{BUCKET}/models/{tmp_path.name}/model"
    upload(str(folder), uri)
    return uri, folder


def _fetch_in_process(args):
    uri, root = args
    os.environ[cache.CACHE_ENV] = root
    return cache.fetch(uri, "faces.embedder.path")


def test_a_model_on_s3_is_fetched_once_per_node_even_by_concurrent_actors(model_uri, tmp_path):
    uri, local = model_uri
    root = str(tmp_path / "node-cache")
    # four processes of one node (four actors) ask at once: one downloads, the others wait on the lock
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_fetch_in_process, [(uri, root)] * 4)
    assert len(set(paths)) == 1 and paths[0].endswith("/model")
    assert (local / "weights.bin").read_bytes() == open(f"{paths[0]}/weights.bin", "rb").read()
    assert open(f"{paths[0]}/sub/config.json").read() == '{"width": 8}'
    log = cache.fetch_log(root)
    assert [entry["uri"] for entry in log] == [uri] and log[0]["bytes"] == 300_000 + len('{"width": 8}')
    os.environ[cache.CACHE_ENV] = root
    try:
        assert cache.fetch(uri) == paths[0] and len(cache.fetch_log(root)) == 1  # cached: no second download
        # another node (its own cache) downloads it once too
        os.environ[cache.CACHE_ENV] = str(tmp_path / "other-node")
        assert cache.fetch(uri).startswith(str(tmp_path / "other-node")) and len(cache.fetch_log()) == 1
    finally:
        os.environ.pop(cache.CACHE_ENV)


def test_a_partial_download_is_never_used_and_a_changed_object_is_fetched_again(model_uri, tmp_path, monkeypatch):
    uri, local = model_uri
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    real_copy = cache._copy_file
    calls = []

    def dies_after_the_first_file(fs, source, target):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt("node killed mid-download")
        return real_copy(fs, source, target)

    monkeypatch.setattr(cache, "_copy_file", dies_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        cache.fetch(uri)
    assert not list((tmp_path / "cache").glob(".partial-*"))  # cleaned up on the way out
    # a partial copy left by a process killed outright is ignored and removed by the next fetch
    key_dir = next(iter((tmp_path / "cache").glob(".*.lock"))).name[1:-5]
    (tmp_path / "cache" / f".partial-{key_dir}-dead").mkdir()
    monkeypatch.setattr(cache, "_copy_file", real_copy)
    path = cache.fetch(uri)
    assert open(f"{path}/weights.bin", "rb").read() == (local / "weights.bin").read_bytes()
    assert not list((tmp_path / "cache").glob(".partial-*"))
    time.sleep(1.1)  # S3 times are seconds: a re-upload must be able to differ
    (local / "weights.bin").write_bytes(b"retrained")
    upload(str(local / "weights.bin"), f"{uri}/weights.bin")
    again = cache.fetch(uri)
    assert again != path and open(f"{again}/weights.bin", "rb").read() == b"retrained"


def test_digests_come_from_metadata_or_a_sidecar_without_reading_the_bytes(model_uri, tmp_path, monkeypatch):
    uri, local = model_uri
    first = cache.input_digest(uri)
    assert first.startswith("meta:") and cache.input_digest(uri) == first
    assert cache.input_digest(str(local)) == cache.input_digest(str(local))
    upload_sidecar = f"{uri}.sha256"
    from facegen import storage

    storage.write_bytes_atomic(b"0123456789abcdef0123 model\n", upload_sidecar)
    assert cache.input_digest(uri) == "sha256:0123456789abcdef"

    def no_reads(*args, **kwargs):
        raise AssertionError("a model's bytes were read for its digest")

    monkeypatch.setattr(storage, "sha256_of", no_reads)
    monkeypatch.setattr(cache, "_copy_file", no_reads)
    from facegen.lineage import settings_digest
    from facegen.config import config_from_dict

    cfg = config_from_dict({"faces": {"embedder": {"path": uri}}})
    assert settings_digest(cfg.faces) == settings_digest(cfg.faces)
    with pytest.raises(FileNotFoundError, match=r"^faces.embedder.path: s3://.*/nope: no such file or folder$"):
        cache.fetch(f"s3://{BUCKET}/nope", "faces.embedder.path")
    with pytest.raises(FileNotFoundError, match=r"^x.path: /nowhere/model: not found on this node"):
        cache.fetch("/nowhere/model", "x.path")


def test_localized_settings_point_at_the_node_copies_and_leave_hub_ids_and_image_folders(model_uri, tmp_path, monkeypatch):
    from facegen.config import config_from_dict

    uri, _ = model_uri
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    cfg = config_from_dict({"faces": {"embedder": {"path": uri}}, "generator": {"diffusion": {"model": "org/sd-hub-id"}},
                            "ingest": {"images_dir": f"s3://{BUCKET}/faces"}})
    faces = cache.localized(cfg.faces, "faces")
    assert faces.embedder.path.startswith(str(tmp_path / "cache")) and cfg.faces.embedder.path == uri
    assert cache.localized(cfg.generator).diffusion.model == "org/sd-hub-id"
    assert cache.localized(cfg.ingest).images_dir == f"s3://{BUCKET}/faces"


def test_bad_inputs_fail_in_one_line_before_ray_starts(s3_endpoint, monkeypatch):
    import ray

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the CLI points it at each run's endpoint
    from facegen.cli import app

    started_before = ray.is_initialized()
    common = ["--set", f"storage.s3_endpoint={s3_endpoint}", "--set", "tracking.mode=disabled"]
    missing = CliRunner().invoke(app, ["generate", "--set", f"faces.embedder.path=s3://{BUCKET}/models/absent", *common],
                                 terminal_width=300)
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: --set faces.embedder.path=s3://{BUCKET}/models/absent: faces.embedder.path: s3://{BUCKET}/models/absent: no such file or folder"
    unreachable = CliRunner().invoke(app, ["generate", "--set", f"faces.embedder.path=s3://{BUCKET}/models/x",
                                           "--set", "storage.s3_endpoint=http://127.0.0.1:9"], terminal_width=300)
    assert unreachable.exit_code == 2 and len(unreachable.output.strip().splitlines()) == 1
    assert unreachable.output.startswith(f"error: --set faces.embedder.path=s3://{BUCKET}/models/x: faces.embedder.path: s3://{BUCKET}/models/x: storage not reachable (")
    assert ray.is_initialized() == started_before


def test_a_pool_asking_for_a_gpu_no_node_has_fails_in_one_line_before_work(ray_local, tmp_path):
    from facegen.cli import app

    result = CliRunner().invoke(app, ["generate", "--set", f"run.output_dir={tmp_path}/run", "--set", "tracking.mode=disabled",
                                      "--set", "generator.pool.num_gpus=1"], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: generator.pool: one actor or task asks for CPU 0.5, GPU 1, "
                                            "but no node of this cluster offers that (nodes: CPU 4")
    assert not (tmp_path / "run").exists()  # nothing was started for it
