"""The faces stage end to end on real GENERATED rows: alignment, fallbacks, errors, embeddings."""

import json

import cv2
import numpy as np
import pytest
import torch
from insightface.data import get_image

from facegen.config import DetectorSettings, EmbedderSettings, FaceSettings
from facegen.faces.align import ARCFACE_TEMPLATE, align_face, center_crop
from facegen.faces.embedders.iresnet import IResNetEmbedder
from facegen.faces.stage import FaceStage
from facegen.images import decode_image, encode_image
from facegen.models.iresnet import build_backbone
from facegen.models.iresnet_checkpoint import save_backbone
from facegen.schema import GENERATED, error_row, sample_schema, rows_to_batch, table_from_batch

SAMPLE = sample_schema(512)


def _settings(**fields) -> FaceSettings:
    """Face settings without a detector: rows without landmarks are centre-cropped (as before detection)."""
    return FaceSettings(detector=DetectorSettings(kind="none"), **fields)

OK, CENTRE, CORRUPT, UPSTREAM, HALF_NAN, DEGENERATE, OK2 = range(7)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo (insightface sample), downscaled to 320x222 RGB."""
    return cv2.resize(cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB), (320, 222), interpolation=cv2.INTER_AREA)


def _landmarks() -> np.ndarray:
    angle = np.deg2rad(12.0)
    rot = 1.3 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_TEMPLATE @ rot.T + [90.0, 20.0]).astype(np.float32).reshape(-1)


def _generated_row(photo: np.ndarray, sample_idx: int, landmarks: np.ndarray, image: bytes | None = None) -> dict:
    return {
        "identity_id": 41,
        "block_id": 0,
        "sample_idx": sample_idx,
        "seed": 1000 + sample_idx,
        "source": "parametric",
        "image": encode_image(photo, "png") if image is None else image,
        "landmarks": np.asarray(landmarks, np.float32),
        "true_identity_id": 41,
        "meta": json.dumps({"prompt": "a face"}),
        "status": "ok",
        "reason": "",
    }


@pytest.fixture(scope="module")
def generated_batch(photo) -> dict:
    nan = np.full(10, np.nan, np.float32)
    half = _landmarks().copy()
    half[4:] = np.nan
    rows = [
        _generated_row(photo, OK, _landmarks()),
        _generated_row(photo, CENTRE, nan),
        _generated_row(photo, CORRUPT, _landmarks(), image=b"\x89PNG\r\n\x1a\n truncated"),
        error_row(41, 0, UPSTREAM, 1003, "parametric", "generator: CUDA out of memory"),
        _generated_row(photo, HALF_NAN, half),
        _generated_row(photo, DEGENERATE, np.tile([50.0, 60.0], 5)),
        _generated_row(photo[:, ::-1], OK2, _landmarks()),
    ]
    return rows_to_batch(rows, GENERATED)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_backbone("iresnet18", width=8, embedding_size=512)
    return save_backbone(str(tmp_path_factory.mktemp("ckpt") / "r18w8"), model, "iresnet18", 8, 512)


def _check_rows(out: dict) -> None:
    assert list(out) == SAMPLE.names
    assert len(out["identity_id"]) == 7
    assert list(out["status"]) == ["ok", "ok", "error", "error", "error", "error", "ok"]
    assert out["sample_idx"].tolist() == list(range(7)) and out["seed"].tolist()[UPSTREAM] == 1003
    assert set(out["origin"]) == {"generated"} and np.isnan(out["difficulty"]).all()

    assert out["reason"][UPSTREAM] == "generator: CUDA out of memory"
    for idx, words in [(CORRUPT, "cannot decode"), (HALF_NAN, "NaN"), (DEGENERATE, "degenerate")]:
        reason = out["reason"][idx]
        assert reason.startswith(f"faces: identity 41 sample {idx}: ") and words in reason and "\n" not in reason
        assert out["image"][idx] == b"" and np.isnan(out["quality"][idx])

    assert "aligned" not in json.loads(out["meta"][OK])
    assert json.loads(out["meta"][CENTRE]) == {"prompt": "a face", "aligned": "center_crop"}
    for idx in (OK, CENTRE, OK2):
        assert decode_image(out["image"][idx]).shape == (112, 112, 3)
        assert 0.0 < out["quality"][idx] < 1.0
    table = table_from_batch(out, SAMPLE)  # the batch is a valid SAMPLE table
    assert table.num_rows == 7


def test_stage_without_embedder_aligns_and_isolates_bad_rows(generated_batch, photo):
    stage = FaceStage(_settings(image_format="png"))
    out = stage(generated_batch)
    _check_rows(out)
    np.testing.assert_array_equal(decode_image(out["image"][OK]), align_face(photo, _landmarks()))
    np.testing.assert_array_equal(decode_image(out["image"][CENTRE]), center_crop(photo))
    assert out["embedding"].dtype == object and all(e is None for e in out["embedding"])
    assert table_from_batch(out, SAMPLE).column("embedding").null_count == 7


def test_stage_with_tiny_checkpoint_embeds_ok_rows(generated_batch, photo, tiny_checkpoint):
    embedder = EmbedderSettings(path=tiny_checkpoint, batch_size=2)
    settings = _settings(image_format="jpeg", jpeg_quality=90, embedder=embedder)
    out = FaceStage(settings)(generated_batch)
    _check_rows(out)
    aligned = decode_image(out["image"][OK])
    assert out["image"][OK][:2] == b"\xff\xd8"  # JPEG
    assert np.abs(aligned.astype(int) - align_face(photo, _landmarks())).mean() < 6

    embeddings = out["embedding"]
    assert embeddings.dtype == np.float32 and embeddings.shape == (7, 512)
    ok = [OK, CENTRE, OK2]
    np.testing.assert_allclose(np.linalg.norm(embeddings[ok], axis=1), 1.0, atol=1e-5)
    assert np.isnan(np.delete(embeddings, ok, axis=0)).all()  # NaN row = no embedding (null in Arrow)
    # the stage embeds the exact crops it aligned (before encoding), with the flip-sum
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    crops = np.stack([align_face(photo, _landmarks()), center_crop(photo), align_face(mirrored, _landmarks())])
    expected = IResNetEmbedder(tiny_checkpoint, device="cpu").embed(crops)
    np.testing.assert_allclose(np.stack([embeddings[i] for i in ok]), expected, atol=1e-5)
    assert table_from_batch(out, SAMPLE).column("embedding").null_count == 4


def test_stage_all_ok_batch_gives_a_float_embedding_matrix(generated_batch, tiny_checkpoint):
    keep = [OK, CENTRE, OK2]
    batch = {name: col[keep] for name, col in generated_batch.items()}
    out = FaceStage(_settings(embedder=EmbedderSettings(path=tiny_checkpoint)))(batch)
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (3, 512)
    empty = FaceStage(_settings())({name: col[:0] for name, col in generated_batch.items()})
    assert list(empty) == SAMPLE.names and len(empty["image"]) == 0


def test_non_finite_embeddings_become_error_rows(generated_batch, tmp_path):
    model = build_backbone("iresnet18", width=8)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    path = save_backbone(str(tmp_path / "broken"), model, "iresnet18", 8, 512)
    out = FaceStage(_settings(embedder=EmbedderSettings(path=path)))(generated_batch)
    assert set(out["status"]) == {"error"}
    assert out["reason"][OK] == f"faces: identity 41 sample {OK}: embedding is not finite"
    assert np.isnan(out["embedding"]).all() and out["image"][CENTRE] == b""


def test_the_embedding_width_is_the_embedders(generated_batch, tmp_path):
    model = build_backbone("iresnet18", width=8, embedding_size=64)
    path = save_backbone(str(tmp_path / "small"), model, "iresnet18", 8, 64)
    stage = FaceStage(_settings(embedder=EmbedderSettings(path=path)))
    out = stage(generated_batch)
    assert out["embedding"].shape == (7, 64) and stage.schema.field("embedding").type.list_size == 64
    assert table_from_batch(out, sample_schema(64)).column("embedding").null_count == 4


@pytest.mark.slow
def test_stage_in_ray_data_keeps_the_sample_schema_across_batches(ray_local, generated_batch, tiny_checkpoint):
    """An all-ok batch and batches with errors concatenate into one SAMPLE-typed dataset."""
    order = [OK, CENTRE, OK2, CORRUPT, UPSTREAM, HALF_NAN, DEGENERATE]
    table = table_from_batch({name: col[order] for name, col in generated_batch.items()}, GENERATED)
    settings = _settings(embedder=EmbedderSettings(path=tiny_checkpoint))
    ds = ray_local.data.from_arrow(table).map_batches(
        FaceStage,
        fn_constructor_kwargs={"settings": settings},
        batch_size=3,
        batch_format="numpy",
        compute=ray_local.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    (batch,) = ds.iter_batches(batch_size=7, batch_format="numpy")  # Ray concatenates the 3 + 3 + 1 outputs
    result = table_from_batch(batch, SAMPLE)
    assert result.column("status").to_pylist() == ["ok"] * 3 + ["error"] * 4
    assert result.column("embedding").null_count == 4
