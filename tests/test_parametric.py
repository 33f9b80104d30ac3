"""The procedural renderer: determinism, exact landmarks, wrong-identity injection, error rows."""

import json
import subprocess
import sys

import numpy as np
import pytest

from facegen.config import GeneratorSettings, ParametricSettings
from facegen.faces.align import align_face
from facegen.generators import MAX_IDENTITY_ID, build_generator, sample_seed
from facegen.generators.parametric import ParametricGenerator, draw_nuisance, identity_params, render_face
from facegen.images import decode_image
from facegen.schema import GENERATED, STATUS_ERROR, STATUS_OK, table_from_batch


def _settings(per_identity=4, **parametric):
    return GeneratorSettings(images_per_identity=per_identity, parametric=ParametricSettings(**parametric))


def _generate(seed, ids, per_identity=4, **parametric):
    return ParametricGenerator(_settings(per_identity, **parametric), seed=seed)(_ids(*ids))


def _ids(*ids):
    ids = np.array(ids, np.int64)
    return {"identity_id": ids, "block_id": np.clip(ids, 0, None) // 10}


def _rows_of(out, identity_id):
    keep = out["identity_id"] == identity_id
    return {name: col[keep] for name, col in out.items()}


def test_rows_follow_the_generated_schema():
    out = ParametricGenerator(_settings(per_identity=3), seed=7)(_ids(11, 12))
    table = table_from_batch(out, GENERATED)
    assert table.num_rows == 6
    assert out["sample_idx"].tolist() == [0, 1, 2, 0, 1, 2]
    assert out["block_id"].tolist() == [1] * 6
    assert set(out["status"]) == {STATUS_OK} and set(out["source"]) == {"parametric"}
    assert out["seed"].tolist()[:3] == [sample_seed(7, 11, i) for i in range(3)]
    image = decode_image(out["image"][0])
    assert image.shape == (128, 128, 3)
    meta = json.loads(out["meta"][0])
    assert set(meta) == {"wrong_identity", "nuisance"} and "rotation_deg" in meta["nuisance"]


def test_same_sample_same_bytes_whatever_the_batch():
    settings = _settings(per_identity=5)
    alone = ParametricGenerator(settings, seed=3)(_ids(42))
    mixed = ParametricGenerator(settings, seed=3)(_ids(7, 42, 1000))
    other_actor = ParametricGenerator(settings, seed=3)(_ids(1000, 42))
    for out in (mixed, other_actor):
        rows = _rows_of(out, 42)
        for name in alone:
            np.testing.assert_equal(alone[name].tolist(), rows[name].tolist(), err_msg=name)  # NaN columns too
    reseeded = ParametricGenerator(settings, seed=4)(_ids(42))
    assert not any(a == b for a, b in zip(alone["image"], reseeded["image"]))


def test_landmarks_sit_on_the_drawn_eyes():
    """Without nuisance the pixel at each eye landmark is the identity's iris colour."""
    out = _generate(0, range(20), per_identity=1, nuisance=0.0, wrong_identity_rate=0.0)
    for identity_id, png, landmarks in zip(out["identity_id"], out["image"], out["landmarks"]):
        image = decode_image(png)
        points = landmarks.reshape(5, 2)
        eye_colour = np.array(identity_params(0, int(identity_id)).eye_colour)
        for x, y in points[:2]:
            pixel = image[int(round(y)), int(round(x))].astype(int)
            assert np.abs(pixel - eye_colour).max() <= 2, (identity_id, pixel, eye_colour)
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = points
        assert lx < nx < rx and mlx < mrx and ly == pytest.approx(ry) and ny > ly and mly > ny


def test_landmarks_follow_rotation_scale_and_shift():
    params = identity_params(0, 5)
    nuisance = draw_nuisance(np.random.default_rng(0), 0.0)
    nuisance.update(rotation_deg=12.0, scale=0.9, shift=[0.05, -0.03])
    image, landmarks = render_face(params, nuisance, 128, np.random.default_rng(1))
    for x, y in landmarks[:2]:
        pixel = image[int(round(y)), int(round(x))].astype(int)
        assert np.abs(pixel - np.array(params.eye_colour)).max() <= 12
    eye_line = landmarks[1] - landmarks[0]
    assert np.degrees(np.arctan2(eye_line[1], eye_line[0])) == pytest.approx(-12.0, abs=0.5)


def test_landmarks_stay_inside_the_image_under_full_nuisance():
    out = _generate(1, range(10), per_identity=10, image_size=64, nuisance=2.0)
    points = out["landmarks"].reshape(-1, 5, 2)
    assert np.isfinite(points).all()
    assert (points >= 0).all() and (points <= 63).all()


def test_wrong_identity_rate_and_ground_truth():
    out = _generate(2, range(25), per_identity=20, image_size=64, wrong_identity_rate=0.2)
    wrong = out["true_identity_id"] != out["identity_id"]
    assert len(wrong) == 500
    assert 0.14 <= wrong.mean() <= 0.26
    assert (out["true_identity_id"][wrong] >= MAX_IDENTITY_ID).all()
    assert [json.loads(m)["wrong_identity"] for m in out["meta"]] == wrong.tolist()
    clean = _generate(2, range(5), per_identity=20, image_size=64, wrong_identity_rate=0.0)
    assert (clean["true_identity_id"] == clean["identity_id"]).all()


def test_bad_identity_becomes_error_rows_and_the_batch_goes_on():
    out = ParametricGenerator(_settings(per_identity=2), seed=0)(_ids(-1, 3))
    table_from_batch(out, GENERATED)
    assert out["status"].tolist() == [STATUS_ERROR, STATUS_ERROR, STATUS_OK, STATUS_OK]
    assert "identity_id=-1 sample_idx=1" in out["reason"][1] and "\n" not in out["reason"][1]
    assert out["image"][0] == b"" and out["seed"][0] == -1 and np.isnan(out["landmarks"][0]).all()
    with pytest.raises(ValueError, match="lacks columns"):
        ParametricGenerator(_settings(), seed=0)({"identity_id": np.array([1])})
    with pytest.raises(ValueError, match="run.seed"):
        ParametricGenerator(_settings(), seed=-5)


def test_images_of_one_identity_look_alike_after_alignment():
    out = _generate(0, range(10), per_identity=6, image_size=64, wrong_identity_rate=0.0)
    crops = [align_face(decode_image(png), lm)[16:100, 16:96] for png, lm in zip(out["image"], out["landmarks"])]
    x = np.stack(crops).reshape(len(crops), -1).astype(np.float32)
    labels = out["identity_id"]
    dist = ((x[:, None] - x[None]) ** 2).mean(-1)
    np.fill_diagonal(dist, np.inf)
    nearest_same = (labels[dist.argmin(1)] == labels).mean()
    assert nearest_same > 0.6  # chance is 5/59


def test_backend_registry_is_lazy():
    from facegen.config import GeneratorSettings
    from facegen.config.generation import GENERATORS

    assert isinstance(build_generator(GeneratorSettings(), 0), ParametricGenerator)
    assert GENERATORS.kinds[:3] == ("parametric", "diffusion", "hybrid")
    with pytest.raises(ValueError, match="unknown backend 'stylegan', expected one of parametric, diffusion, hybrid, stylegan2, dcgan"):
        GeneratorSettings(backend="stylegan")
    code = "import sys, facegen.generators.parametric; assert not {'diffusers', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
