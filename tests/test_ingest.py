"""`facegen ingest` on a folder of real face photos, then clean, shard and train on it unchanged."""

import json
import re

import cv2
import numpy as np
import pytest
from insightface.data import get_image
from typer.testing import CliRunner

from facegen import blocks as blk
from facegen import storage
from facegen.faces.detect import build_detector
from facegen.config import DetectorSettings
from facegen.schema import embedding_dim

pytestmark = pytest.mark.slow
PEOPLE = ["carol", "alice", "bob"]  # ids follow the sorted names: alice 0, bob 1, carol 2


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    """Three of t1.jpg's people, six photos each (crops, scales, flips, JPEG), a corrupt file and a wall."""
    t1 = cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)
    faces = [d for d in build_detector(DetectorSettings(kind="mtcnn", device="cpu")).detect(t1) if d.score > 0.9]
    faces = sorted(faces, key=lambda d: d.box[0])[:3]
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for person, face in zip(PEOPLE, faces):
        folder = root / person
        folder.mkdir()
        x1, y1, x2, y2 = face.box
        w, h = x2 - x1, y2 - y1
        for k in range(6):
            m = 0.6 + 0.3 * rng.random()
            box = np.array([x1 - m * w, y1 - m * h, x2 + m * w, y2 + m * h]).clip(0, [t1.shape[1], t1.shape[0]] * 2).astype(int)
            crop = t1[box[1] : box[3], box[0] : box[2]]
            scale = 1.5 + rng.random()
            crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            if k % 2:
                crop = crop[:, ::-1]
            ok, data = cv2.imencode(".jpg", np.ascontiguousarray(crop[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
            (folder / f"{k:02d}.jpg").write_bytes(data.tobytes())
    (root / "bob" / "99_broken.png").write_bytes(b"\x89PNG not really")
    cv2.imwrite(str(root / "alice" / "98_wall.png"), np.full((200, 200, 3), 120, np.uint8))
    (root / "alice" / "notes.txt").write_text("not an image")
    return root


def test_ingest_then_clean_shard_and_train(ray_local, face_folder, tmp_path):
    from facegen.cli import app

    out = tmp_path / "run"
    config = tmp_path / "ingest.yaml"
    settings = {
        "run": {"name": "ingest-test", "output_dir": str(out)},
        "identities": {"block_size": 2},
        "faces": {"detector": {"kind": "mtcnn", "device": "cpu"}, "embedder": {"kind": "dlib"}, "batch_size": 8, "pool": {"num_cpus": 0.25}},
        # dlib's cosine puts these three different people at 0.81-0.91: dedup on its own scale
        "clean": {"min_images": 3, "target_images": 6, "pool": {"num_cpus": 0.25}, "dedup": {"threshold": 0.95}},
        "shards": {"num_buckets": 2},
        "train": {"arch": "iresnet18", "width": 8, "epochs": 1, "lr_steps": [1], "batch_size": 8, "scale": 16.0, "margin": 0.2,
                  "cpus_per_worker": 0.5},
        "tracking": {"mode": "disabled"},
    }
    import yaml

    config.write_text(yaml.safe_dump(settings))
    result = CliRunner().invoke(app, ["ingest", "--config", str(config), "--images", str(face_folder), "--no-progress"], terminal_width=200)
    assert result.exit_code == 0, result.output
    raw = str(out / "raw")
    assert blk.done_block_ids(raw) == [0, 1]  # ids 0, 1 | 2
    table = storage.read_table(blk.block_path(raw, 0))
    rows = table.to_pylist()
    assert [r["identity_id"] for r in rows] == [0] * 7 + [1] * 7
    alice = [r for r in rows if r["identity_id"] == 0]
    assert [r["source"] for r in alice] == [f"{face_folder}/alice/{k:02d}.jpg" for k in range(6)] + [f"{face_folder}/alice/98_wall.png"]
    assert json.loads(alice[0]["meta"])["identity"] == "alice" and alice[0]["origin"] == "ingested"
    assert alice[-1]["status"] == "error" and "no face" in alice[-1]["reason"]
    broken = [r for r in rows if r["source"].endswith("99_broken.png")][0]
    assert broken["status"] == "error" and "cannot decode" in broken["reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 12 and embedding_dim(table.schema) == 128
    stats = storage.read_json(blk.stats_path(raw, 0))
    assert stats["images"] == 14 and stats["images_error"] == 2 and stats["embedder"]["kind"] == "dlib"
    assert stats["error_reasons"] == {"no face": 1, "ValueError: cannot decode image": 1}

    rerun = CliRunner().invoke(app, ["ingest", "--config", str(config), "--images", str(face_folder), "--no-progress"], terminal_width=200)
    assert rerun.exit_code == 0 and re.search(r"blocks_skipped\W+2\b", rerun.output), rerun.output  # resumes: nothing redone

    for command in ("clean", "shard", "train"):
        done = CliRunner().invoke(app, [command, "--config", str(config), *(["--no-progress"] if command != "train" else [])], terminal_width=200)
        assert done.exit_code == 0, (command, done.output)
    manifest = storage.read_json(str(out / "shards" / "manifest.json"))
    assert manifest["embedder"] == stats["embedder"] and manifest["num_identities"] == 3
    clean_stats = storage.read_json(blk.stats_path(str(out / "clean"), 1))
    assert clean_stats["embedder"] == stats["embedder"] and clean_stats["identities_kept"] == 1


def test_ingest_names_a_missing_folder_in_one_line(tmp_path):
    from facegen.cli import app

    result = CliRunner().invoke(app, ["ingest", "--images", str(tmp_path / "nowhere")], terminal_width=200)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: settings: ingest.images_dir: {tmp_path}/nowhere: no such file or folder"


def _ingest(folder, out, **overrides):
    from facegen.config import config_from_dict
    from facegen.stages.ingest import run_ingest

    cfg = config_from_dict({
        "run": {"name": "ingest-ids", "output_dir": str(out), **overrides},
        "ingest": {"images_dir": str(folder)},
        "identities": {"block_size": 2},
        "faces": {"detector": {"kind": "mtcnn", "device": "cpu"}, "batch_size": 8, "pool": {"num_cpus": 0.25}},
        "tracking": {"mode": "disabled"},
    }, "test")
    return run_ingest(cfg, progress=False)


def _ids_by_name(out) -> dict[str, int]:
    table = storage.read_table(str(out / "ingest" / "listing.parquet"))
    return dict(zip(table.column("name").to_pylist(), table.column("identity_id").to_pylist()))


def test_ingest_ids_stay_stable_as_the_folder_changes_and_skips_are_counted(ray_local, face_folder, tmp_path):
    import shutil

    folder, out = tmp_path / "faces", tmp_path / "run"
    for person in ("alice", "bob"):
        (folder / person).mkdir(parents=True)
        for name in ("00.jpg", "01.jpg"):
            shutil.copy(face_folder / person / name, folder / person / name)
    (folder / "README.txt").write_text("about this set")
    (folder / "bob" / "extra").mkdir()
    shutil.copy(face_folder / "bob" / "02.jpg", folder / "bob" / "extra" / "02.jpg")
    (folder / "bob" / ".DS_Store").write_bytes(b"\0")
    (folder / "bob" / "notes.txt").write_text("x")
    (folder / "empty").mkdir()

    first = _ingest(folder, out)
    assert _ids_by_name(out) == {"alice": 0, "bob": 1}
    assert (first.blocks_total, first.blocks_written) == (1, 1)
    skipped = {"skipped: file beside the identity folders": 1, "skipped: file in a nested folder": 1,
               "skipped: hidden file or folder": 1, "skipped: not an image extension": 1,
               "skipped: identity folder without images": 1}
    assert {k: v for k, v in first.totals.items() if k.startswith("skipped")} == skipped
    listing = storage.read_json(str(out / "ingest" / "listing.json"))
    assert listing["skipped"] == {k.removeprefix("skipped: "): v for k, v in skipped.items()}
    assert (listing["identities"], listing["files"]) == (2, 4)

    # a new person whose name sorts first gets the next id; the finished block is not touched
    shutil.copytree(face_folder / "carol", folder / "aaron")
    added = _ingest(folder, out)
    assert _ids_by_name(out) == {"alice": 0, "bob": 1, "aaron": 2}
    assert (added.blocks_total, added.blocks_skipped, added.blocks_written, added.blocks_redone) == (2, 1, 1, 0)
    aaron = storage.read_table(blk.block_path(str(out / "raw"), 1))
    assert set(aaron.column("identity_id").to_pylist()) == {2} and aaron.num_rows == 6

    # a changed folder redoes its block only; a removed one leaves its id unused
    shutil.copy(face_folder / "bob" / "03.jpg", folder / "bob" / "03.jpg")
    shutil.rmtree(folder / "alice")
    changed = _ingest(folder, out)
    assert _ids_by_name(out) == {"bob": 1, "aaron": 2}
    assert (changed.blocks_skipped, changed.blocks_redone) == (1, 1)
    block0 = storage.read_table(blk.block_path(str(out / "raw"), 0))
    assert set(block0.column("identity_id").to_pylist()) == {1} and block0.num_rows == 3
    assert storage.read_json(blk.stats_path(str(out / "raw"), 0))["identities"] == 1

    # starting over keeps the ids: the listing is the name -> id map
    _ingest(folder, out, overwrite=True)
    assert _ids_by_name(out) == {"bob": 1, "aaron": 2}
