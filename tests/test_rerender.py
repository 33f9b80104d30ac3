"""HybridGen's InstantID re-render (``generator.hybrid.rerender``) on tiny models, on CPU.

The pipeline is built from folders through diffusers' own ``from_pretrained`` (a tiny SDXL, a tiny
IdentityNet ControlNet) and InstantID's adapter file layout (``ip-adapter.bin``) through diffusers'
IP-Adapter loader. Faces are judged by a real detector: insightface's SCRFD reader on the tiny
SCRFD of ``tiny_scrfd.py`` (a white cell of its input is a face), with dlib's descriptor as the
identity feature. A second copy of the tiny SDXL has its VAE's last convolution amplified, so it
decodes to black and white: a seed whose white blob covers a cell draws a "face", others draw none.
"""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import (  # noqa: E402
    Arc2FaceSettings,
    EmbedderSettings,
    GeneratorSettings,
    HybridSettings,
    ReferenceSettings,
    RerenderSettings,
    detector_settings,
)
from facegen.generators.rerender import draw_keypoints, draw_rerender, keypoint_condition, read_ip_adapter  # noqa: E402
from facegen.testing.tiny_diffusers import build_tiny_arc2face, build_tiny_instantid  # noqa: E402
from tiny_scrfd import build_tiny_scrfd  # noqa: E402
from untrusted import RunsShell  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIDE = 32  # re-render size: 16x16 latents


def _face_drawing_copy(sdxl: str, directory: str) -> str:
    """The tiny SDXL with its VAE's output convolution x20 and bias -1: near-binary images."""
    from diffusers import AutoencoderKL

    shutil.copytree(sdxl, directory)
    vae = AutoencoderKL.from_pretrained(f"{directory}/vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20.0)
        vae.decoder.conv_out.bias.fill_(-1.0)
    vae.save_pretrained(f"{directory}/vae")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import cv2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rerender")
    instantid = build_tiny_instantid(str(root / "instantid"), embed_dim=128)  # dlib's 128-d descriptor
    (root / "det").mkdir()
    build_tiny_scrfd(str(root / "det" / "det_tiny.onnx"))
    (root / "photos").mkdir()
    photo = np.zeros((96, 96, 3), np.uint8)
    photo[42:54, 40:52] = 255  # one white cell of the detector's input: one face
    cv2.imwrite(str(root / "photos" / "face.png"), photo)
    yield {**instantid, "faces": _face_drawing_copy(instantid["sdxl"], str(root / "sdxl_faces")),
           "det": str(root / "det"), "photos": str(root / "photos"), "arc2face": build_tiny_arc2face(str(root / "a2f"))}
    torch.set_num_threads(threads)


def rerender_settings(models, model=None, **extra) -> RerenderSettings:
    options = dict(enabled=True, model=model or models["sdxl"], controlnet=models["controlnet"],
                   ip_adapter=models["ip_adapter"], num_inference_steps=1, height=SIDE, width=SIDE,
                   local_files_only=True, max_attempts=2) | extra
    return RerenderSettings(**options)


def generator_settings(models, **rerender) -> GeneratorSettings:
    a2f = models["arc2face"]
    hybrid = HybridSettings(
        reference=ReferenceSettings(backend="photos", photos_dir=models["photos"], max_attempts=2),
        rerender=rerender_settings(models, model=models["faces"], **rerender),
        detector=detector_settings(kind="insightface", path=models["det"], det_size=160, min_size=10),
        embedder=EmbedderSettings(kind="dlib"),
        arc2face=Arc2FaceSettings(unet=a2f["models"], encoder=a2f["models"], base_model=a2f["base"],
                                  num_inference_steps=1, height=32, width=32, local_files_only=True),
        measure_similarity=False)
    return GeneratorSettings(backend="hybrid", images_per_identity=2, hybrid=hybrid)


@pytest.fixture(scope="module")
def generator(models):
    from facegen.generators.hybrid import HybridGenerator

    return HybridGenerator(generator_settings(models), seed=0)


def _ids(*ids):
    return {"identity_id": np.array(ids, np.int64), "block_id": np.zeros(len(ids), np.int64)}


def test_draws_are_deterministic_inside_their_ranges_and_phrases_follow_the_weights():
    settings = RerenderSettings(height=100, width=80)
    draws = [draw_rerender(settings, 7, i, a // 3, a % 3) for i in range(1000) for a in range(3)]
    again = [draw_rerender(settings, 7, i, a // 3, a % 3) for i in range(1000) for a in range(3)]
    assert draws == again
    assert len({d.seed for d in draws}) == len(draws) and draws[0] != draw_rerender(settings, 8, 0, 0, 0)
    for d in draws:
        assert 0.8 <= d.kps_scale <= 1.2 and 0.1 <= d.controlnet_scale <= 0.5 and 0.95 <= d.ip_adapter_scale <= 1.0
        pad = (max(80 - int(80 * d.kps_scale), 0), max(100 - int(100 * d.kps_scale), 0))
        assert 0 <= d.kps_offset[0] <= pad[0] and 0 <= d.kps_offset[1] <= pad[1]
        assert d.prompt == settings.prompt_template.format(**d.phrases)
    scales = np.array([d.controlnet_scale for d in draws])
    assert scales.min() < 0.12 and scales.max() > 0.48  # the range is used, not a corner of it
    assert any(d.kps_offset != (0, 0) for d in draws)
    # chi-square of each table's counts against its weights (p ~ 0.001 critical values)
    critical = {6: 22.46, 7: 24.32, 9: 27.88}
    for slot, table in settings.phrases.items():
        counts = np.array([sum(d.phrases[slot] == p for d in draws) for p in dict.fromkeys(table.phrases)])
        expected = np.array([sum(w for q, w in zip(table.phrases, table.probabilities()) if q == p)
                             for p in dict.fromkeys(table.phrases)]) * len(draws)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < critical[len(counts) - 1], (slot, counts, expected)
    poses = [d.phrases["pose"] for d in draws]
    assert abs(poses.count("facing left") / len(poses) - 0.25) < 0.03
    assert abs(poses.count("facing forward") / len(poses) - 0.05) < 0.015


def test_the_keypoint_condition_is_instantids_drawing_scaled_and_shifted():
    from facegen.generators.rerender import KPS_COLOURS, RerenderDraw

    points = np.array([[30, 30], [70, 30], [50, 50], [35, 70], [65, 70]], np.float64)
    drawn = draw_keypoints(100, 100, points)
    for (x, y), colour in zip(points.astype(int), KPS_COLOURS):
        assert tuple(drawn[y, x]) == colour
    assert tuple(drawn[5, 5]) == (0, 0, 0)
    assert tuple(drawn[40, 40]) == tuple(int(c * 0.6) for c in KPS_COLOURS[0])  # eye-to-nose limb, dimmed
    draw = RerenderDraw(0, 0, 0.8, (12, 5), 0.3, 1.0, {}, "")
    shifted = np.asarray(keypoint_condition(points, draw, 100, 100, 255))
    for (x, y), colour in zip(points, KPS_COLOURS):
        assert tuple(shifted[int(y * 0.8) + 5, int(x * 0.8) + 12]) == colour
    assert (shifted[:5] == 255).all() and (shifted[:, :12] == 255).all() and (shifted[85:] == 255).all()
    assert tuple(shifted[5 + 2, 12 + 2]) == (0, 0, 0)


def test_same_seed_identity_and_attempt_give_the_same_pixels_whatever_the_batch(models, generator):
    from facegen.generators.rerender import Rerenderer

    alone = generator(_ids(3))
    mixed = generator(_ids(0, 3))
    keep = mixed["identity_id"] == 3
    assert alone["status"].tolist() == mixed["status"][keep].tolist()
    assert alone["meta"].tolist() == mixed["meta"][keep].tolist()
    assert alone["image"].tolist() == mixed["image"][keep].tolist()
    reference = _photo_reference(models, generator, 3)
    fresh = Rerenderer(generator.hybrid.rerender, 0, "cpu", "unused")  # loaded again: the same pixels
    embedding = fresh.condition(reference)
    first, draw = fresh.render(reference, embedding, 1)
    assert np.array_equal(first, fresh.render(reference, embedding, 1)[0])
    assert np.array_equal(first, generator.rerenderer.render(reference, embedding, 1)[0])
    assert draw == draw_rerender(generator.hybrid.rerender, 0, 3, reference.candidate.attempt, 1)


def test_the_face_embedding_and_the_keypoints_reach_the_image(models):
    from facegen.generators.references import Candidate, Reference
    from facegen.generators.rerender import Rerenderer

    rerenderer = Rerenderer(rerender_settings(models, model=models["faces"]), 0, "cpu", "unused")  # amplified
    rng = np.random.default_rng(0)
    feature = rng.normal(size=128).astype(np.float32)
    points = np.array([[30, 35], [60, 35], [45, 50], [33, 65], [57, 65]], np.float32)
    reference = Reference(5, Candidate(0, 1, np.zeros((96, 96, 3), np.uint8)), points, 0.9,
                          feature / np.linalg.norm(feature), 3.0)
    embedding = rerenderer.condition(reference)
    np.testing.assert_allclose(embedding, feature / np.linalg.norm(feature) * 3.0, rtol=1e-6)  # raw, as InstantID's
    seen = []
    hook = rerenderer.pipeline.controlnet.register_forward_hook(  # after the pre-hooks: what forward got
        lambda m, a, kw, out: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        image, _ = rerenderer.render(reference, embedding, 0)
    finally:
        hook.remove()
    tokens = rerenderer.pipeline.unet.encoder_hid_proj([torch.tensor(embedding, dtype=torch.float32).reshape(1, 1, 1, -1)])
    assert seen and all(torch.equal(s, tokens[0].flatten(1, 2)) for s in seen)  # IdentityNet sees the face tokens
    guided = Rerenderer(rerender_settings(models, model=models["faces"], guidance_scale=2.0), 0, "cpu", "unused")
    seen.clear()
    hook = guided.pipeline.controlnet.register_forward_hook(
        lambda m, a, kw, out: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        guided.render(reference, embedding, 0)
    finally:
        hook.remove()
    both = torch.tensor(np.stack([np.zeros_like(embedding), embedding]), dtype=torch.float32).reshape(2, 1, 1, -1)
    expected = guided.pipeline.unet.encoder_hid_proj([both])[0].flatten(1, 2)  # unconditional half: a zero face
    assert seen and all(torch.equal(s, expected) for s in seen)
    other, _ = rerenderer.render(reference, rng.normal(size=128) * 3.0, 0)
    moved = Reference(5, reference.candidate, points + 12, 0.9, reference.feature, 3.0)
    shifted, _ = rerenderer.render(moved, embedding, 0)
    # the same inputs give the same pixels, so any change is the input's doing
    assert np.array_equal(image, rerenderer.render(reference, embedding, 0)[0])
    assert (image != other).mean() > 0.05 and (image != shifted).mean() > 0.01  # IdentityNet at scale U(0.1, 0.5)


def _photo_reference(models, generator, identity_id):
    """The identity's accepted photo, before any re-render."""
    from facegen.generators.references import PhotoSource, find_reference

    return find_reference(identity_id, PhotoSource(models["photos"], 2), generator.detector.detect_batch,
                          generator._choose, generator._embed_raw, 2)


def _outcome(generator, reference, attempt):
    """What the detector's one-face rule says of re-render ``attempt`` of ``reference``."""
    image, _ = generator.rerenderer.render(reference, generator.rerenderer.condition(reference), attempt)
    try:
        return generator._choose(generator.detector.detect(image), image.shape), image
    except ValueError as exc:
        return str(exc), image


def test_a_faceless_rerender_is_rejected_and_the_next_attempt_becomes_the_reference(models, generator):
    from facegen.faces.align import align_face
    from facegen.generators.references import PhotoSource, find_reference

    def original(identity_id):
        return _photo_reference(models, generator, identity_id)

    picked = None
    for identity_id in range(40):
        ref = original(identity_id)
        first, second = _outcome(generator, ref, 0), _outcome(generator, ref, 1)
        if isinstance(first[0], str) and first[0].startswith("no face") and not isinstance(second[0], str):
            picked = identity_id, ref, first[0], second
            break
    assert picked is not None, "no identity in 40 whose re-render 0 is faceless and re-render 1 one face"
    identity_id, ref, reason, (face, image) = picked
    reference = generator.reference(identity_id)
    meta = reference.candidate.meta
    assert meta["rerender"]["attempt"] == 1 and np.array_equal(reference.candidate.image, image)
    assert meta["rerender"] == draw_rerender(generator.hybrid.rerender, 0, identity_id, 0, 1).describe()
    assert meta["original"]["face_score"] == round(ref.score, 4) and meta["photo"] == "face.png"
    np.testing.assert_allclose(reference.landmarks, np.asarray(face.landmarks).reshape(5, 2), atol=1e-4)
    raw = generator._embed_raw(align_face(image, reference.landmarks)[None])[0]
    np.testing.assert_allclose(reference.feature, raw / np.linalg.norm(raw), atol=1e-6)  # the re-render's feature
    assert not np.allclose(reference.feature, ref.feature, atol=1e-3)
    rows = generator(_ids(identity_id))
    assert rows["status"].tolist() == ["ok", "ok"] and set(rows["source"]) == {"hybrid:photos+instantid+arc2face"}
    described = json.loads(rows["meta"][0])["reference"]
    assert described["rerender"]["attempt"] == 1 and described["face_score"] == round(reference.score, 4)
    # an identity none of whose re-renders has a face: each is rejected, then the next reference attempt
    for identity_id in range(40):
        ref = original(identity_id)
        outcomes = [_outcome(generator, ref, a)[0] for a in range(2)]
        if all(isinstance(o, str) for o in outcomes):
            break
    detect, choose, embed = generator.detector.detect_batch, generator._choose, generator._embed_raw
    with pytest.raises(ValueError) as failed:
        find_reference(identity_id, PhotoSource(models["photos"], 1), detect, choose, embed, 1,
                       lambda r: generator.rerenderer.accept(r, detect, choose, embed))
    assert str(failed.value) == (f"no usable reference face in 1 attempts (attempt 0: re-render 0: {outcomes[0]}; "
                                 f"re-render 1: {outcomes[1]})")


def test_a_missing_controlnet_folder_fails_in_one_line_naming_the_field(models, tmp_path):
    from facegen.config import config_from_dict
    from facegen.generators.rerender import Rerenderer
    from facegen.preflight import check_input_paths

    missing = str(tmp_path / "ControlNetModel")
    with pytest.raises(FileNotFoundError) as err:
        Rerenderer(rerender_settings(models, controlnet=missing), 0, "cpu", "unused")
    assert str(err.value) == f"generator.hybrid.rerender.controlnet: {missing}: no such directory"
    cfg = config_from_dict({"generator": {"hybrid": {"rerender": {
        "enabled": True, "controlnet": missing, "ip_adapter": models["ip_adapter"]}}}}, "test")
    with pytest.raises(ValueError) as err:
        check_input_paths(cfg, "x.yaml")
    assert str(err.value) == f"x.yaml: generator.hybrid.rerender.controlnet: {missing}: no such file or folder"
    with pytest.raises(ValueError) as err:
        config_from_dict({"generator": {"hybrid": {"rerender": {"enabled": True, "ip_adapter": "x.bin"}}}}, "x.yaml")
    assert "\n" not in str(err.value) and "generator.hybrid.rerender" in str(err.value) and "controlnet" in str(err.value)


def test_an_adapter_file_with_a_pickled_object_is_refused(models, tmp_path):
    from facegen.generators.rerender import Rerenderer

    marker = tmp_path / "ran"
    evil = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"latents": RunsShell(marker)}, "ip_adapter": {}}, str(evil))
    with pytest.raises(ValueError) as err:
        Rerenderer(rerender_settings(models, ip_adapter=str(evil)), 0, "cpu", "unused")
    message = str(err.value)
    assert message.startswith(f"generator.hybrid.rerender.ip_adapter: {evil}: not a weights-only adapter file (")
    assert "\n" not in message and not marker.exists()
    from safetensors.torch import save_file

    state = read_ip_adapter(models["ip_adapter"])
    flat = {f"{part}.{name}": value for part, values in state.items() for name, value in values.items()}
    save_file(flat, str(tmp_path / "ip-adapter.safetensors"))
    again = read_ip_adapter(str(tmp_path / "ip-adapter.safetensors"))
    assert {k: set(v) for k, v in again.items()} == {k: set(v) for k, v in state.items()}
    assert all(torch.equal(again[k][n], v) for k in state for n, v in state[k].items())
    torch.save({"proj.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.bin"))
    with pytest.raises(ValueError, match="not InstantID's adapter layout"):
        read_ip_adapter(str(tmp_path / "plain.bin"))


def test_the_lcm_lora_is_fused_and_the_adapter_keeps_sdpa_self_attention(models, tmp_path):
    from diffusers import LCMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from facegen.generators.references import Candidate, Reference
    from facegen.generators.rerender import Rerenderer
    from facegen.testing.tiny_diffusers import build_tiny_lora

    lora = build_tiny_lora(models["sdxl"], str(tmp_path / "lcm-lora"))
    plain = Rerenderer(rerender_settings(models), 0, "cpu", "unused")
    lcm = Rerenderer(rerender_settings(models, lcm_lora=lora, num_inference_steps=2), 0, "cpu", "unused")
    assert isinstance(lcm.pipeline.scheduler, LCMScheduler) and not isinstance(plain.pipeline.scheduler, LCMScheduler)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused, base = lcm.pipeline.unet.state_dict()[name], plain.pipeline.unet.state_dict()[name]
    assert fused.shape == base.shape and not torch.equal(fused, base)  # merged into the weights
    processors = lcm.pipeline.unet.attn_processors
    assert {type(p) for n, p in processors.items() if n.endswith("attn1.processor")} == {AttnProcessor2_0}
    assert {type(p) for n, p in processors.items() if n.endswith("attn2.processor")} == {IPAdapterAttnProcessor2_0}
    feature = np.ones(128, np.float32) / np.sqrt(128)
    points = np.array([[30, 35], [60, 35], [45, 50], [33, 65], [57, 65]], np.float32)
    reference = Reference(2, Candidate(0, 1, np.zeros((96, 96, 3), np.uint8)), points, 0.9, feature, 2.0)
    image = lcm.render(reference, lcm.condition(reference), 0)[0]
    assert np.array_equal(image, lcm.render(reference, lcm.condition(reference), 0)[0])
    small = Reference(2, reference.candidate, points, 0.9, np.ones(64, np.float32) / 8, 2.0)
    with pytest.raises(ValueError) as err:
        lcm.condition(small)
    assert str(err.value) == (f"generator.hybrid.embedder: gives 64-d face embeddings; the adapter "
                              f"({models['ip_adapter']}) takes 128-d")


def test_settings_refuse_inconsistent_tables_and_ranges_in_one_line():
    from facegen.config import config_from_dict

    cases = [({"prompt_template": "A {mood} person"}, "prompt_template: no phrase table for {mood}"),
             ({"phrases": {"pose": {"phrases": ["a", "b"], "weights": [1.0]}}}, "weights: 1 weights for 2 phrases"),
             ({"controlnet_scale": [0.5, 0.1]}, "controlnet_scale: need 0 <= low <= high"),
             ({"enabled": True, "controlnet": "/x"}, "ip_adapter: the re-render needs InstantID's ip-adapter file")]
    for rerender, message in cases:
        with pytest.raises(ValueError) as err:
            config_from_dict({"generator": {"hybrid": {"rerender": rerender}}}, "x.yaml")
        assert "\n" not in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="rerender.enabled: expander gan"):
        HybridSettings(expander="gan", reference=ReferenceSettings(backend="dcgan"),
                       rerender=RerenderSettings(enabled=True, controlnet="/c", ip_adapter="/a"))


def test_a_disabled_rerender_leaves_the_raw_digest_of_a_hybrid_run_as_it_was(models):
    from facegen.config import config_from_dict
    from facegen.lineage import raw_digest

    def digest(rerender):
        return raw_digest(config_from_dict({"generator": {"backend": "hybrid", "hybrid": {
            "embedder": {"kind": "dlib"}, "rerender": rerender}}}, "test"))

    off = digest({})
    assert digest({"max_attempts": 7, "kps_scale": [0.9, 1.1]}) == off  # not used: not part of what made the blocks
    on = digest({"enabled": True, "controlnet": models["controlnet"], "ip_adapter": models["ip_adapter"]})
    assert on != off
    assert digest({"enabled": True, "controlnet": models["controlnet"], "ip_adapter": models["ip_adapter"],
                   "kps_scale": [0.9, 1.1]}) != on
