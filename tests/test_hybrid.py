"""The hybrid backend: real references (photos, tiny SD), tiny Arc2Face/Vec2Face expansion, on CPU.

References come from real photos in the insightface and scikit-image wheels (faces) and from a tiny
SD model (no faces); the detector is dlib's HOG and the identity feature dlib's 128-d ResNet, both
real models shipped by registry packages.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import insightface  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import (  # noqa: E402
    PoolSettings,
    Arc2FaceSettings,
    DetectorSettings,
    DiffusionSettings,
    EmbedderSettings,
    ExpansionSettings,
    GeneratorSettings,
    HybridSettings,
    ReferenceSettings,
)
from facegen.generators import sample_seed  # noqa: E402
from facegen.identities.expansion import cosine, sample_conditioning  # noqa: E402
from facegen.schema import GENERATED, STATUS_ERROR, STATUS_OK, table_from_batch  # noqa: E402
from facegen.testing.tiny_diffusers import build_tiny_arc2face, build_tiny_sd, build_tiny_sdxl  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _hanks(side: int = 256, face: int = 160) -> np.ndarray:
    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "Tom_Hanks_54745.png")
    frame = np.full((side, side, 3), 40, np.uint8)
    top = (side - face) // 2
    frame[top : top + face, top : top + face] = cv2.resize(cv2.imread(path), (face, face), interpolation=cv2.INTER_CUBIC)
    return frame  # BGR, as cv2 writes it


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few shared cores: more threads only contend
    root = tmp_path_factory.mktemp("hybrid")
    photos = root / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "a_hanks.png"), _hanks())
    t1 = insightface.data.get_image("t1")  # six people: "more than one large face"
    cv2.imwrite(str(photos / "b_group.jpg"), cv2.resize(t1, (640, 443), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(photos / "c_wall.png"), np.full((128, 128, 3), 90, np.uint8))  # no face
    yield {"photos": str(photos), "arc2face": build_tiny_arc2face(str(root / "a2f")), "sd": build_tiny_sd(str(root / "sd")),
           "sdxl": build_tiny_sdxl(str(root / "sdxl"))}
    torch.set_num_threads(threads)


def hybrid_settings(models, per_identity=3, reference=None, **hybrid) -> GeneratorSettings:
    a2f = models["arc2face"]
    options = dict(
        reference=reference or ReferenceSettings(backend="photos", photos_dir=models["photos"], max_attempts=2),
        detector=DetectorSettings(kind="dlib", min_size=40),
        embedder=EmbedderSettings(kind="dlib"),
        arc2face=Arc2FaceSettings(unet=a2f["models"], encoder=a2f["models"], base_model=a2f["base"],
                                  num_inference_steps=2, height=64, width=64, local_files_only=True, micro_batch=2),
        expansion=ExpansionSettings(mode="band", band=(0.55, 0.8)),
    ) | hybrid
    return GeneratorSettings(backend="hybrid", images_per_identity=per_identity, hybrid=HybridSettings(**options))


def _ids(*ids):
    return {"identity_id": np.array(ids, np.int64), "block_id": np.zeros(len(ids), np.int64)}


@pytest.fixture(scope="module")
def generator(models):
    from facegen.generators.hybrid import HybridGenerator

    return HybridGenerator(hybrid_settings(models), seed=0)


def test_references_retry_with_the_next_seed_and_expansions_record_their_band(generator):
    # attempt a of identity i is photo (i + a) mod 3 of [one face, six people, a wall]
    out = generator(_ids(0, 2, 1))
    table_from_batch(out, GENERATED)
    assert out["status"].tolist() == [STATUS_OK] * 6 + [STATUS_ERROR] * 3
    assert out["sample_idx"].tolist() == [0, 1, 2] * 3
    refs = [json.loads(m)["reference"] for m in out["meta"][:6]]
    assert [(r["attempt"], r["photo"]) for r in refs[::3]] == [(0, "a_hanks.png"), (1, "a_hanks.png")]
    assert out["reason"][6] == (
        "identity_id=1 sample_idx=0: ReferenceFailed: no usable reference face in 2 attempts (attempt 0: more than "
        "one large face (6 faces of 40 px or more); attempt 1: no face (nothing detected))"
    )
    out = {name: column[:6] for name, column in out.items()}
    assert set(out["source"]) == {"hybrid:photos+arc2face"}
    assert np.all(out["band_low"] == np.float32(0.55)) and np.all(out["band_high"] == np.float32(0.8))
    requested = out["requested_similarity"]
    assert requested.min() >= 0.55 and requested.max() <= 0.8 and len(set(requested.tolist())) == 6
    assert generator.regenerate(1, 0)["reason"] == generator(_ids(1))["reason"][0]
    # the tiny Arc2Face draws no face, so nothing is realised; the row says why
    assert np.isnan(out["realised_similarity"]).all()
    assert json.loads(out["meta"][0])["expansion_face"].startswith("no face")


def test_the_encoder_sees_each_samples_band_feature_in_the_id_token(generator):
    encoder = generator.expander.pipeline.text_encoder
    seen = []
    handle = encoder.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
    try:
        out = generator(_ids(0))
    finally:
        handle.remove()
    feature = generator.reference(0).feature.astype(np.float64)
    settings = generator.hybrid.expansion
    scaled = feature / np.linalg.norm(feature) * settings.feature_norm
    token = generator.expander.token_id
    calls = [(ids, emb) for ids, emb in seen if (ids == token).any()]  # the ID prompts (not the empty negative)
    assert [len(ids) for ids, _ in calls] == [2, 1]  # micro-batches of 2 at fixed sample_idx boundaries
    inputs = torch.cat([emb[ids == token] for ids, emb in calls]).numpy()
    for k in range(3):
        cond = sample_conditioning(scaled, settings, 0, 0, k, 3, sample_seed(0, 0, k)).feature.astype(np.float64)
        expected = np.zeros(512, np.float32)
        expected[:128] = cond / np.linalg.norm(cond)
        assert np.array_equal(inputs[k], expected)
        assert cosine(cond, feature) == pytest.approx(out["requested_similarity"][k], abs=1e-6)


def test_same_ids_same_bytes_in_any_batch_and_one_sample_alone(generator):
    alone = generator(_ids(2))
    mixed = generator(_ids(0, 2))
    keep = mixed["identity_id"] == 2
    assert alone["image"].tolist() == mixed["image"][keep].tolist()
    assert alone["requested_similarity"].tolist() == mixed["requested_similarity"][keep].tolist()
    row = generator.regenerate(2, 2)
    assert row["image"] == alone["image"][2] and row["seed"] == sample_seed(0, 2, 2)
    assert len(set(alone["image"].tolist())) == 3


def test_failures_become_error_rows_with_reasons(models, generator):
    from facegen.generators.hybrid import HybridGenerator

    out = generator(_ids(-4, 0))
    assert out["status"].tolist() == [STATUS_ERROR] * 3 + [STATUS_OK] * 3
    assert out["reason"][0].startswith("identity_id=-4 sample_idx=0: ValueError: identity_id -4 is outside")
    odd = HybridGenerator(hybrid_settings(models, per_identity=2, arc2face=Arc2FaceSettings(
        unet=models["arc2face"]["models"], encoder=models["arc2face"]["models"], base_model=models["arc2face"]["base"],
        num_inference_steps=2, height=60, width=60, local_files_only=True)), seed=0)
    out = odd(_ids(0))  # SD sizes must be divisible by 8: the pipeline fails for every sample
    assert out["status"].tolist() == [STATUS_ERROR] * 2
    assert "identity_id=0 sample_idx=1" in out["reason"][1] and "divisible by 8" in out["reason"][1]


def test_a_reference_model_that_draws_no_face_retries_then_fails_the_identity(models):
    from facegen.generators.hybrid import HybridGenerator

    sd = DiffusionSettings(model=models["sd"], num_inference_steps=2, height=64, width=64, local_files_only=True,
                           micro_batch=2)
    settings = hybrid_settings(models, per_identity=2,
                               reference=ReferenceSettings(backend="text_to_image", text_to_image=sd, max_attempts=3))
    out = HybridGenerator(settings, seed=0)(_ids(7))
    assert out["status"].tolist() == [STATUS_ERROR] * 2
    reason = out["reason"][0]
    assert reason.startswith("identity_id=7 sample_idx=0: ReferenceFailed: no usable reference face in 3 attempts (")
    assert [f"attempt {a}: no face" in reason for a in range(3)] == [True] * 3


def test_vec2face_expansion_measures_the_realised_similarity(models):
    from facegen.config import Vec2FaceSettings
    from facegen.generators.hybrid import HybridGenerator
    from facegen.generators.vec2face import Vec2FaceExpander
    from facegen.models.vec2face import Vec2Face

    torch.manual_seed(0)
    small = Vec2Face(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                     decoder_ch=32, feature_dim=128)  # a random network the size of a test; dlib features are 128-d
    base = hybrid_settings(models)  # the expander is built here, so no checkpoint path is needed (or validated)
    hybrid = base.hybrid.model_copy(update={"expander": "vec2face", "vec2face": Vec2FaceSettings(micro_batch=2)})
    settings = base.model_copy(update={"hybrid": hybrid})
    gen = HybridGenerator(settings, seed=0, expander=Vec2FaceExpander(settings.hybrid.vec2face, model=small))
    out = gen(_ids(0))
    assert out["status"].tolist() == [STATUS_OK] * 3 and set(out["source"]) == {"hybrid:photos+vec2face"}
    feature = gen.reference(0).feature
    from facegen.faces.align import align_face
    from facegen.images import decode_image

    for k in range(3):
        image = decode_image(out["image"][k])
        assert image.shape == (112, 112, 3)
        emb = gen.embedder.embed(align_face(image, out["landmarks"][k])[None])[0]
        assert out["realised_similarity"][k] == pytest.approx(cosine(emb, feature), abs=1e-6)


def test_vec2face_by_default_perturbs_the_raw_feature_with_sigma_0_2_and_keeps_its_own_norm(models):
    from facegen.config import Vec2FaceSettings
    from facegen.generators.hybrid import HybridGenerator
    from facegen.generators.vec2face import Vec2FaceExpander
    from facegen.models.vec2face import Vec2Face

    torch.manual_seed(0)
    small = Vec2Face(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                     decoder_ch=32, feature_dim=128)
    # validated settings: expander vec2face with no expansion section takes HybridGen's recipe
    settings = hybrid_settings(models, per_identity=4, expander="vec2face", expansion={},
                               vec2face=Vec2FaceSettings(checkpoint="never-loaded.pth", micro_batch=2))
    assert settings.hybrid.expansion.preset == "hybridgen"

    class Seen(Vec2FaceExpander):
        features: list = []

        def render(self, features, sample_seeds, phrases=None):
            self.features.append(np.asarray(features, np.float64))
            return super().render(features, sample_seeds, phrases)

    gen = HybridGenerator(settings, seed=0, expander=Seen(settings.hybrid.vec2face, model=small))
    out = gen(_ids(0))
    assert out["status"].tolist() == [STATUS_OK] * 4
    reference = gen.reference(0)
    from facegen.faces.align import align_face

    raw = gen.embedder.embed_raw(align_face(reference.candidate.image, reference.landmarks)[None])[0].astype(np.float64)
    assert reference.norm == pytest.approx(np.linalg.norm(raw), rel=1e-6)  # dlib's descriptor as it comes out
    assert not reference.norm == pytest.approx(1.0, abs=0.01)  # not the unit feature
    features = np.concatenate(Seen.features)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), reference.norm, rtol=1e-5)
    for k in range(4):
        cond = sample_conditioning(raw, settings.hybrid.expansion, 0, 0, k, 4, sample_seed(0, 0, k))
        np.testing.assert_allclose(features[k], cond.feature, rtol=1e-4, atol=1e-6)
        meta = json.loads(out["meta"][k])["expansion"]
        assert meta == {"mode": "noise", "space": "feature", "sigma": 0.2, "feature_norm": "own",
                        "norm": round(reference.norm, 4)}


def _actor_pool(ds, settings):
    """``ds.map_batches(HybridGenerator)`` on an actor pool sized by the generator settings."""
    from ray.data import ActorPoolStrategy

    from facegen.generators.hybrid import HybridGenerator

    return ds.map_batches(HybridGenerator, fn_constructor_kwargs={"settings": settings, "seed": 0},
                          batch_size=settings.batch_size, batch_format="numpy",
                          compute=ActorPoolStrategy(size=settings.pool.min_size), num_cpus=settings.pool.num_cpus,
                          num_gpus=settings.pool.num_gpus or None)


@pytest.mark.slow
def test_the_ray_data_pool_gives_the_loops_bytes_and_the_run_its_histograms(ray_local, models, tmp_path):
    from facegen import blocks as blk
    from facegen import storage
    from facegen.config import FaceSettings, FacegenConfig, IdentitySettings, RunSettings, TrackingSettings
    from facegen.generators.hybrid import HybridGenerator
    from facegen.identities.seeds import identity_dataset
    from facegen.stages.generate import run_generate

    generator = hybrid_settings(models, per_identity=2).model_copy(update={"batch_size": 2, "pool": PoolSettings(num_cpus=0.5)})
    cfg = FacegenConfig(
        run=RunSettings(output_dir=str(tmp_path / "run"), seed=0),
        identities=IdentitySettings(num_identities=4, block_size=2),
        generator=generator,
        faces=FaceSettings(image_format="png", detector=DetectorSettings(kind="none"), embedder=EmbedderSettings(kind="dlib"),
                           batch_size=8),
        tracking=TrackingSettings(mode="disabled"),
    )
    pending = blk.plan_blocks(cfg.identities)
    ds = _actor_pool(identity_dataset(pending, 2), generator)
    pooled = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["identity_id"])):
            pooled[(int(batch["identity_id"][i]), int(batch["sample_idx"][i]))] = (batch["status"][i], batch["image"][i])
    loop = HybridGenerator(generator, seed=0)(_ids(0, 1, 2, 3))
    assert pooled == {(int(i), int(k)): (s, im) for i, k, s, im in
                      zip(loop["identity_id"], loop["sample_idx"], loop["status"], loop["image"])}

    report = run_generate(cfg, progress=False)
    assert report.totals["images"] == 8 and report.totals["images_error"] == 2  # identity 1 has no reference
    assert sum(report.histograms["requested"]["counts"]) == 6 and "realised" not in report.histograms
    stats = storage.read_json(blk.stats_path(cfg.stage_dir("raw"), 0))
    assert sum(stats["similarity_histograms"]["requested"]["counts"]) == 2  # ids 0-1: 2 ok + 2 errors
    assert "ReferenceFailed: no usable reference face in 2 attempts" in next(iter(stats["error_reasons"]))
    table = storage.read_table(blk.block_path(cfg.stage_dir("raw"), 1))
    assert table.column("band_low").to_pylist() == [0.550000011920929] * 4
    assert table.column("realised_similarity").null_count == 4

    # SDXL references (the pipeline class follows the folder) in the pool: no faces, so every
    # identity retries each seed and ends as error rows that say so
    sdxl = DiffusionSettings(model=models["sdxl"], num_inference_steps=2, height=64, width=64, local_files_only=True,
                             micro_batch=2)
    xl = hybrid_settings(models, per_identity=2, reference=ReferenceSettings(
        backend="text_to_image", text_to_image=sdxl, max_attempts=2)).model_copy(update={"batch_size": 2, "pool": PoolSettings(num_cpus=0.5)})
    ds = _actor_pool(identity_dataset(pending[:1], 2), xl)
    rows = [r for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in zip(b["status"], b["reason"])]
    assert [s for s, _ in rows] == [STATUS_ERROR] * 4
    assert all("attempt 0: no face" in r and "attempt 1: no face" in r for _, r in rows)
