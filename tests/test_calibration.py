"""Cleaning thresholds on the embedder's own scale: calibrations, specs, the calibrated cluster expert."""

import json

import cv2
import numpy as np
import pytest
from insightface.data import get_image

from facegen.clean.block import vote_block
from facegen.clean.thresholds import resolve_clean_settings
from facegen.config import CleanSettings, ConfigError, DetectorSettings, config_from_dict
from facegen.eval.verification import load_bin, write_bin
from facegen.faces.align import ARCFACE_CROP
from facegen.images import encode_image
from facegen.faces.calibration import (
    DLIB_SAME_PERSON, PUBLISHED, Calibration, calibrate_embedder, load_calibration, measure_calibration, resolve_threshold,
)
from facegen.faces.detect import build_detector
from facegen.faces.embedders.dlib import DlibEmbedder
from facegen.schema import rows_to_batch, sample_schema, table_from_batch


@pytest.fixture(scope="module")
def real_views():
    """Four views of one man of insightface's t1.jpg (crops, scales, flips, JPEG quality), one view of
    another man of the same photo and one of scikit-image's astronaut: aligned 112 px crops."""
    from skimage.data import astronaut

    detector = build_detector(DetectorSettings(kind="mtcnn", device="cpu"))
    t1 = cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)
    people = sorted([d for d in detector.detect(t1) if d.score > 0.9], key=lambda d: d.box[0])
    rng = np.random.default_rng(0)

    def views(photo, face, n):
        out = []
        for k in range(n):
            x1, y1, x2, y2 = face.box
            m = 0.5 + 0.4 * rng.random()
            box = np.array([x1 - m * (x2 - x1), y1 - m * (y2 - y1), x2 + m * (x2 - x1), y2 + m * (y2 - y1)])
            box = box.clip(0, [photo.shape[1], photo.shape[0]] * 2).astype(int)
            crop = cv2.resize(photo[box[1]:box[3], box[0]:box[2]], None, fx=1.5 + rng.random(), fy=1.5 + rng.random())
            crop = crop[:, ::-1] if k % 2 else crop
            ok, data = cv2.imencode(".jpg", np.ascontiguousarray(crop[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(55 + 40 * rng.random())])
            image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            found = max((d for d in detector.detect(image) if d.score > 0.9), key=lambda d: d.box[2] - d.box[0])
            out.append(ARCFACE_CROP.cut(image, found.landmarks))
        return out

    astro = astronaut()
    [astro_face] = [d for d in detector.detect(astro) if d.score > 0.9]
    return {"man": views(t1, people[0], 4), "other": views(t1, people[1], 1), "astronaut": views(astro, astro_face, 1)}


@pytest.fixture(scope="module")
def dlib_embedder():
    return DlibEmbedder()


def _block(crops_by_row, embedder) -> "pa.Table":
    schema = sample_schema(128)
    rows = []
    for k, (true_id, crop) in enumerate(crops_by_row):
        rows.append({"identity_id": 0, "block_id": 0, "sample_idx": k, "seed": k, "source": "test",
                     "image": encode_image(crop, "jpeg"), "true_identity_id": true_id, "meta": "{}",
                     "embedding": embedder.embed(crop[None])[0], "quality": np.float32(0.9),
                     "difficulty": np.float32(np.nan), "status": "ok", "reason": "", "origin": "generated"})
    return table_from_batch(rows_to_batch(rows, schema), schema)


def test_dlibs_published_rule_holds_at_the_norm_of_its_descriptors_on_real_faces(real_views, dlib_embedder):
    crops = np.stack(real_views["man"] + real_views["other"] + real_views["astronaut"])
    raw = dlib_embedder._describe(dlib_embedder.crop.from_aligned(crops))
    norms = np.linalg.norm(raw, axis=1)
    # the rule is carried at norm 1.58: t1's faces measured 1.57-1.59, the astronaut 1.43
    assert np.median(norms) == pytest.approx(1.58, abs=0.02) and norms.min() > 1.4 and norms.max() < 1.62, norms
    assert DLIB_SAME_PERSON == pytest.approx(1 - 0.36 / (2 * 1.58**2), abs=1e-4) == pytest.approx(0.9279, abs=1e-4)
    # on these faces: the rule's verdicts in Euclidean distance and in cosine agree on every pair
    unit = raw / norms[:, None]
    i, j = np.triu_indices(len(raw), 1)
    assert np.array_equal(np.linalg.norm(raw[i] - raw[j], axis=1) < 0.6, np.sum(unit[i] * unit[j], axis=1) >= DLIB_SAME_PERSON)


@pytest.mark.parametrize("planted", ["other", "astronaut"])
def test_a_planted_face_among_views_of_one_man_is_dropped_and_his_views_kept_with_dlib(real_views, dlib_embedder, planted):
    table = _block([(0, c) for c in real_views["man"]] + [(1, real_views[planted][0])], dlib_embedder)
    calibration = load_calibration(config_from_dict({"faces": {"embedder": {"kind": "dlib"}}}).faces.embedder)
    assert calibration is PUBLISHED["dlib"]
    settings = resolve_clean_settings(CleanSettings(min_images=2, target_images=5), calibration)
    clean, _, stats = vote_block(table, 0, settings)
    status = dict(zip(clean.column("sample_idx").to_pylist(), clean.column("status").to_pylist()))
    assert status == {0: "ok", 1: "ok", 2: "ok", 3: "ok", 4: "dropped"}
    # the band mode (HybridGen's 50-80 %) on the same faces: the failure, kept here as the contrast
    band = resolve_clean_settings(CleanSettings(min_images=2, target_images=5, dbscan={"mode": "band"}), calibration)
    band_status = dict(zip(*[vote_block(table, 0, band)[0].column(c).to_pylist() for c in ("sample_idx", "status")]))
    assert band_status != status


def test_threshold_specs_resolve_on_the_calibration_and_fail_in_one_line_without_one():
    cal = Calibration(embedder_kind="facegen", source="test", same_person=0.42, percentiles=[0.0, 50.0, 99.0, 100.0],
                      genuine=[0.1, 0.6, 0.9, 0.95], impostor=[-0.3, 0.0, 0.3, 0.5])
    assert resolve_threshold(0.5, cal, "f") == 0.5
    assert resolve_threshold("same_person", cal, "f") == 0.42
    assert resolve_threshold("far:0.01", cal, "f") == pytest.approx(0.3)
    assert resolve_threshold("far:0.005", cal, "f") == pytest.approx(0.4)
    assert resolve_threshold("genuine:50", cal, "f") == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"^clean.dedup.threshold: far:0.001 needs the embedder's calibration"):
        resolve_threshold("far:0.001", None, "clean.dedup.threshold")
    with pytest.raises(ValueError, match=r"^clean.x: far:0.01: this calibration \(dlib's published"):
        resolve_threshold("far:0.01", PUBLISHED["dlib"], "clean.x")
    with pytest.raises(ConfigError, match=r"clean.dedup.threshold: .*give a cosine, same_person, far:RATE"):
        config_from_dict({"clean": {"dedup": {"threshold": "far"}}}, "x.yaml")
    resolved = resolve_clean_settings(CleanSettings(dedup={"threshold": "far:0.01"}, selection={"band": ["genuine:0", "genuine:99"]}), cal)
    assert (resolved.dedup.threshold, resolved.leakage.threshold, resolved.dbscan.threshold) == (pytest.approx(0.3), 0.42, 0.42)
    assert resolved.selection.band == (pytest.approx(0.1), pytest.approx(0.9)) and resolved.dbscan.mode == "calibrated"
    # no calibration, or one measured at under 80 % accuracy: defaults on ArcFace's scale, the cluster
    # expert in HybridGen's band mode; explicit specs still resolve on it
    bare = resolve_clean_settings(CleanSettings())
    assert (bare.dedup.threshold, bare.leakage.threshold, bare.dbscan.mode) == (0.7, 0.4, "band")
    weak = resolve_clean_settings(CleanSettings(leakage={"threshold": "far:0.01"}), cal.model_copy(update={"accuracy": 0.6}))
    assert (weak.dedup.threshold, weak.leakage.threshold, weak.dbscan.mode) == (0.7, pytest.approx(0.3), "band")
    trusted = resolve_clean_settings(CleanSettings(), cal.model_copy(update={"accuracy": 0.95}))
    assert (trusted.dedup.threshold, trusted.dbscan.mode, trusted.dbscan.threshold) == (0.42, "calibrated", 0.42)


def test_facegen_calibrate_measures_a_bin_and_the_clean_stage_reads_it(tmp_path, real_views, dlib_embedder):
    from typer.testing import CliRunner

    from facegen.cli import app

    man, others = real_views["man"], real_views["other"] + real_views["astronaut"]
    images = [man[0], man[1], man[2], man[3], man[0], others[0], man[1], others[1]] * 5
    issame = [True, True, False, False] * 5
    write_bin(str(tmp_path / "set.bin"), np.stack(images), issame)
    out = tmp_path / "dlib-calibration.json"
    result = CliRunner().invoke(app, ["calibrate", "--kind", "dlib", "--bin", str(tmp_path / "set.bin"), "--output", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    written = Calibration.model_validate(json.loads(out.read_text()))
    embeddings = dlib_embedder.embed(load_bin(str(tmp_path / "set.bin"))[0], flip=True)  # the set's JPEG-decoded faces
    expected = measure_calibration(embeddings, np.array(issame), "dlib", str(tmp_path / "set.bin"))
    assert written == expected and written.pairs == 20 and written.accuracy == 1.0
    cos = np.sum(embeddings[0::2] * embeddings[1::2], axis=1)
    assert written.genuine[written.percentiles.index(50.0)] == pytest.approx(np.median(cos[np.array(issame)]), abs=1e-5)
    assert max(cos[~np.array(issame)]) <= written.same_person <= min(cos[np.array(issame)])
    cfg = config_from_dict({"faces": {"embedder": {"kind": "dlib", "calibration": str(out)}}})
    assert load_calibration(cfg.faces.embedder) == written
    with pytest.raises(ValueError, match=r"measured for a dlib embedder, faces.embedder.kind is facegen"):
        load_calibration(config_from_dict({"faces": {"embedder": {"kind": "facegen", "path": "/x", "calibration": str(out)}}}).faces.embedder)
    # a threshold fitted on a handful of pairs is noise: the demo's own calibration asks for 200
    with pytest.raises(ValueError, match=r"set.bin: 20 pairs; a calibration needs at least 200"):
        calibrate_embedder(dlib_embedder, [str(tmp_path / "set.bin")], "dlib", min_pairs=200)
