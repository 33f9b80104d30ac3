"""facegen on a real multi-node Ray cluster on loopback, submitted with ``ray job submit``.

A head started with ``--num-cpus=0`` and two 2-CPU worker nodes (``ray start``), each worker under
``unshare --mount`` with a tmpfs over a folder only the head sees (the job's config and the local
copy of the models live there). Output and models are on a real S3 server on loopback (moto's).
Shown here: the whole pipeline completes, its blocks were made on both workers and none on the head,
each node fetched each model once, Ray's state API shows the stages' Ray Data actors on the worker
nodes; and a worker node killed (SIGKILL of all its processes) during ``generate`` and during
``clean`` does not fail the job: every identity is made exactly once, byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from facegen import blocks as blk
from facegen import storage
from ray_cluster import LoopbackCluster
from s3 import BUCKET, CREDENTIALS, moto_server, s3_env, upload

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: Ray's own coordination actors, placed on the driver's node by Ray (no CPU, no stage work): the
#: job's supervisor, Ray Data's statistics / locality / autoscaling actors, Ray Train's controller.
RAY_CONTROL_ACTORS = {"JobSupervisor", "_StatsActor", "ActorLocationTracker", "_AutoscalingCoordinatorActor",
                      "AutoscalingRequester", "TrainController", "SynchronizationActor", "PlacementGroupCleaner",
                      "DatasetManager"}


@pytest.fixture(scope="module")
def s3_server():
    with moto_server() as endpoint, s3_env(endpoint):
        yield endpoint


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    hidden = tmp_path_factory.mktemp("head_only")
    started = LoopbackCluster(tmp_path_factory.mktemp("cluster"), workers=2, worker_cpus=2, hidden=hidden,
                              env=CREDENTIALS).start()
    try:
        yield started, hidden
    finally:
        started.stop()


@pytest.fixture(scope="module")
def embedder_uri(cluster):
    """The tiny embedder, saved where only the head sees it and uploaded to S3."""
    from tiny_pipeline import tiny_embedder

    _, hidden = cluster
    local = tiny_embedder(hidden)
    uri = f"s3://{BUCKET}/models/embedder"
    upload(local, uri)
    return uri


def _job(cluster: LoopbackCluster, hidden: Path, name: str, settings: dict, command: str) -> str:
    """Submit ``python ray_jobs/<command>.py --config <hidden>/<name>.yaml`` without waiting; its job id."""
    from ray.job_submission import JobSubmissionClient

    config = hidden / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(entrypoint=f"python ray_jobs/{command}.py --config {config} --no-progress",
                                     runtime_env={"working_dir": str(REPO)})
        except RuntimeError as exc:  # the dashboard answers before the head's job agent has registered
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _finish(cluster: LoopbackCluster, job: str, timeout: float = 480) -> tuple[str, str]:
    """Wait for a job to end; returns its status and logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.time() + timeout
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job} did not finish in {timeout} s"
        time.sleep(1)
    return client.get_job_status(job).value, client.get_job_logs(job)


def _wait(cluster: LoopbackCluster, job: str, timeout: float = 480) -> str:
    """Wait for a job; returns its logs, asserting it succeeded without a traceback."""
    status, logs = _finish(cluster, job, timeout)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    return logs


def _settings(endpoint: str, run: str, embedder: str, identities: int, per_identity: int, size: int = 64) -> dict:
    from tiny_pipeline import tiny_settings

    settings = tiny_settings(run, embedder, name=run.rsplit("/", 1)[-1])
    settings["identities"] = {"num_identities": identities, "block_size": 2}
    settings["generator"].update(images_per_identity=per_identity, pool={"min_size": 4, "num_cpus": 1.0})
    settings["generator"]["parametric"]["image_size"] = size
    settings["clean"].update(pool={"min_size": 4, "num_cpus": 1.0}, target_images=per_identity)
    settings["shards"]["pool"] = {"min_size": 2, "num_cpus": 0.5}
    settings["train"]["cpus_per_worker"] = 1.0
    settings["storage"] = {"s3_endpoint": endpoint, "s3_region": "us-east-1"}
    return settings


def _block_nodes(stage_dir: str) -> dict[int, str]:
    return {int(r["block_id"]): r.get("node_id", "") for r in blk.read_stats(stage_dir)}


def _checksums(stage_dir: str) -> dict[int, str]:
    return {b: storage.sha256_of(blk.block_path(stage_dir, b)) for b in blk.done_block_ids(stage_dir)}


#: Identities of the pipeline run and of the node-loss runs, which compare their blocks with its.
IDENTITIES = 16


def _loss_settings(endpoint: str, run: str, embedder: str) -> dict:
    """The settings the node-loss runs share with the whole-pipeline run (whose blocks are theirs
    uninterrupted): 16 images per identity, topped up to 40 (top-up augmentation and its embedding
    make the final cleaning pass last long enough to lose a node in it)."""
    settings = _settings(endpoint, run, embedder, identities=IDENTITIES, per_identity=16, size=96)
    settings["clean"]["target_images"] = 40
    return settings


@pytest.fixture(scope="module")
def pipeline_run(cluster, s3_server, embedder_uri) -> tuple[str, str]:
    """``ray_jobs/pipeline.py`` submitted once: (its output on S3, its logs)."""
    nodes, hidden = cluster
    run = f"s3://{BUCKET}/pipeline"
    settings = _loss_settings(s3_server, run, embedder_uri)
    # one 2-CPU actor per worker node, one block at a time: both nodes make blocks, whichever starts first
    settings["generator"]["pool"] = {"min_size": 2, "num_cpus": 2.0, "max_tasks_in_flight": 1}
    return run, _wait(nodes, _job(nodes, hidden, "pipeline", settings, "pipeline"))


def test_the_whole_pipeline_runs_on_the_workers_with_models_from_s3(cluster, embedder_uri, pipeline_run):
    from ray.util.state import list_actors, list_tasks

    from facegen.cache import fetch_log
    from facegen.shards import verify_shards

    nodes, _ = cluster
    run, logs = pipeline_run
    assert "facegen pipeline summary" in logs

    workers = {w.node_id for w in nodes.workers}
    assert set(_block_nodes(f"{run}/raw").values()) == workers  # generation used both workers
    for stage in ("raw", "clean", "clean_votes"):
        made_on = _block_nodes(f"{run}/{stage}")
        assert len(made_on) == 8 and set(made_on.values()) <= workers, (stage, made_on)  # never the head
    assert verify_shards(f"{run}/shards") == []
    assert storage.read_json(f"{run}/train/pipeline/result.json")["epochs_completed"] == 1
    assert storage.read_json(f"{run}/summary.json")["verification"][0]["pairs"] == 40
    # W&B's offline runs end up under the output on S3, not in a node's working directory
    assert [n for n in storage.list_dirs(f"{run}/wandb") if n.startswith("offline-run-")]

    # each node copied each model once into its own cache; the head none
    assert not (nodes.head.cache_dir / "fetches.jsonl").exists()
    for worker in nodes.workers:
        uris = [f["uri"] for f in fetch_log(worker.cache_dir)]
        assert uris.count(embedder_uri) == 1 and len(uris) == len(set(uris)), (worker.name, uris)

    # the stages' Ray Data actors lived on the worker nodes; the head ran only the job's supervisor
    actors = list_actors(address=nodes.dashboard, filters=[("class_name", "=", "MapWorker(MapBatches(BlockGenerator))")],
                         detail=True, limit=1000)
    assert {a.node_id for a in actors if a.node_id} == workers  # (an actor the pool never placed has no node)
    voters = list_actors(address=nodes.dashboard, filters=[("class_name", "=", "MapWorker(MapBatches(BlockVoter))")],
                         detail=True, limit=1000)
    assert voters and {a.node_id for a in voters if a.node_id} <= workers
    on_head = list_tasks(address=nodes.dashboard, filters=[("node_id", "=", nodes.head.node_id)], detail=True, limit=10000)
    classes = {t.name.split(".")[0] for t in on_head}
    assert classes <= RAY_CONTROL_ACTORS, sorted(classes - RAY_CONTROL_ACTORS)


def _kill_when(cluster: LoopbackCluster, stage_dir: str, done: int, total: int, timeout: float = 240) -> int:
    """Kill worker node 1 once ``done`` blocks of ``stage_dir`` exist; returns how many existed then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = len(blk.done_block_ids(stage_dir))
        if found >= done:
            assert found < total, "the stage finished before the node could be killed"
            cluster.kill_worker(1)
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{stage_dir}: {done} blocks not done in {timeout} s")


def test_a_worker_node_killed_during_generate_and_clean_does_not_fail_the_job(cluster, s3_server, embedder_uri,
                                                                              pipeline_run):
    nodes, hidden = cluster
    reference, _ = pipeline_run  # the same blocks, made without losing a node
    interrupted, identities = f"s3://{BUCKET}/loss-interrupted", IDENTITIES

    def settings(run: str) -> dict:
        s = _loss_settings(s3_server, run, embedder_uri)
        s["tracking"] = {"mode": "disabled"}
        return s

    job = _job(nodes, hidden, "interrupted-generate", settings(interrupted), "generate")
    _kill_when(nodes, f"{interrupted}/raw", done=2, total=identities // 2)
    _wait(nodes, job)
    raw = f"{interrupted}/raw"
    assert _checksums(raw) == _checksums(f"{reference}/raw") and len(_checksums(raw)) == identities // 2
    ids = [i for b in blk.done_block_ids(raw) for i in storage.read_table(blk.block_path(raw, b), columns=["identity_id"])
           .column("identity_id").unique().to_pylist()]
    assert sorted(ids) == list(range(identities))  # every identity exactly once

    nodes.restart_worker(1)
    job = _job(nodes, hidden, "interrupted-clean", settings(interrupted), "clean")
    _kill_when(nodes, f"{interrupted}/clean", done=1, total=identities // 2)
    _wait(nodes, job)
    assert _checksums(f"{interrupted}/clean") == _checksums(f"{reference}/clean")
    assert len(_checksums(f"{interrupted}/clean")) == identities // 2
    nodes.restart_worker(1)


def test_a_local_output_dir_is_refused_on_a_cluster_unless_every_node_sees_it(cluster, s3_server, embedder_uri, tmp_path):
    nodes, hidden = cluster
    settings = _settings(s3_server, str(hidden / "local-out"), embedder_uri, identities=2, per_identity=2)
    settings["tracking"] = {"mode": "disabled"}
    status, logs = _finish(nodes, _job(nodes, hidden, "local-output", settings, "generate"))
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert status == "FAILED" and "Traceback" not in logs and errors == [
        f"error: run.output_dir: {hidden / 'local-out'} is a local path and this cluster has 3 nodes, each of which "
        "would write its own copy: use s3://... or, if every node mounts it (NFS), set storage.shared: true"]

    settings["storage"]["shared"] = True  # declared shared, but the workers do not see the head's folder
    status, logs = _finish(nodes, _job(nodes, hidden, "local-output-shared", settings, "generate"))
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert status == "FAILED" and len(errors) == 1 and "is declared shared (storage.shared) but node(s)" in errors[0]
    assert all(w.node_id[:8] in errors[0] for w in nodes.workers) and nodes.head.node_id[:8] not in errors[0]

    settings["run"]["output_dir"] = str(tmp_path / "shared-out")  # a folder every node sees: accepted
    _wait(nodes, _job(nodes, hidden, "shared-output", settings, "generate"))
    assert len(list((tmp_path / "shared-out" / "raw").glob("block-*.stats.json"))) == 1


def test_a_stage_held_by_a_live_run_refuses_other_settings_and_makes_the_same_wait(cluster, s3_server, embedder_uri):
    """Two jobs on one stage that a live run holds (the test process's own claim, the runner's code):
    the one with other settings fails in one line naming that run; the one with the same settings
    waits, writing nothing, and makes every block once the run ends."""
    import os
    import socket

    from facegen.claims import StageClaim
    from facegen.config import config_from_dict
    from facegen.lineage import raw_digest

    nodes, hidden = cluster
    run = f"s3://{BUCKET}/live-run"
    settings = _settings(s3_server, run, embedder_uri, identities=4, per_identity=4)
    settings["tracking"] = {"mode": "disabled"}
    other = yaml.safe_load(yaml.safe_dump(settings))
    other["generator"]["parametric"]["image_size"] = 96
    with StageClaim(f"{run}/raw", heartbeat_s=2.0, settings=raw_digest(config_from_dict(settings, "test"))):
        status, logs = _finish(nodes, _job(nodes, hidden, "live-other", other, "generate"))
        errors = [line for line in logs.splitlines() if line.startswith("error:")]
        assert status == "FAILED" and "Traceback" not in logs and errors == [
            f"error: {run}/raw: another run with other settings is writing this stage (host {socket.gethostname()} "
            f"pid {os.getpid()}, started {errors[0].split('started ')[1][:8]}); wait for it to end or give this run "
            "another run.output_dir"], logs[-3000:]

        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(nodes.dashboard)
        job = _job(nodes, hidden, "live-same", settings, "generate")
        deadline = time.time() + 120
        while "another run with the same settings is writing this stage" not in client.get_job_logs(job):
            status = client.get_job_status(job)
            assert time.time() < deadline and status in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job)[-3000:]
            time.sleep(1)
        time.sleep(3)
        assert client.get_job_status(job) == JobStatus.RUNNING and blk.done_block_ids(f"{run}/raw") == []
    logs = _wait(nodes, job)
    assert blk.done_block_ids(f"{run}/raw") == [0, 1] and "blocks_written" in logs


def test_every_node_listens_and_reports_only_loopback(cluster):
    import psutil
    from ray.util.state import list_nodes
    from test_ray_loopback import is_loopback

    nodes, _ = cluster
    reported = list_nodes(address=nodes.dashboard)
    assert len([n for n in reported if n.state == "ALIVE"]) == 3 and all(is_loopback(n.node_ip) for n in reported)
    listening = set()
    for node in [nodes.head, *nodes.workers]:
        for proc in [psutil.Process(node.process.pid), *psutil.Process(node.process.pid).children(recursive=True)]:
            try:
                listening.update(c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    assert listening and all(is_loopback(ip) for ip in listening), listening
