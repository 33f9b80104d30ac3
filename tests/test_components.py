"""Components that own their settings: a cleaning expert is one module plus one registration line."""

import textwrap

import numpy as np
import pyarrow as pa
import pytest

from facegen.clean.block import build_experts, vote_block
from facegen.clean.independent import IndependentSettings
from facegen.clean.vlm import VlmSettings
from facegen.config import CleanSettings, ConfigError, FacegenConfig, load_config
from facegen.config.clean import EXPERTS
from facegen.images import decode_image, encode_image
from facegen.stages.clean import votes_digest
from planted import planted_block


def add_kind(table, kind, module, source, tmp_path, monkeypatch, *traits):
    """What adding a component takes: its one new file (``module``.py) and its one registration line;
    the table is put back as it was after the test."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(table, "_modules", dict(table._modules))
    monkeypatch.setattr(table, "_traits", dict(table._traits))
    table.register(kind, module, *traits)

THROWAWAY = '''
"""An expert that drops frames darker than a mean level (a throwaway for the registration test)."""
from typing import Literal

from facegen.clean.votes import DROP, KEEP, ExpertVotes
from facegen.config.clean import ExpertSettings


class DarkFrameSettings(ExpertSettings):
    kind: Literal["dark_frame"] = "dark_frame"
    max_mean: float = 40.0


SETTINGS = DarkFrameSettings


class DarkFrameExpert:
    def __init__(self, settings):
        self.settings, self.name = settings, settings.expert_name

    def vote(self, view, identities):
        votes = ExpertVotes.abstaining(self.name, view.num_rows)
        for ident in identities:
            for row in view.groups[ident]:
                mean = float(view.image(row).mean())
                dark = mean < self.settings.max_mean
                votes.set(row, DROP if dark else KEEP, 1.0, f"dark_frame: mean {mean:.0f}" if dark else "")
        votes.info = {"judged": sum(len(view.groups[i]) for i in identities)}
        return votes


def build(settings, **context):
    return DarkFrameExpert(settings)
'''


@pytest.fixture
def dark_frame(tmp_path, monkeypatch):
    add_kind(EXPERTS, "dark_frame", "dark_frame_expert", THROWAWAY, tmp_path, monkeypatch)


def darken(table, rows):
    images = table.column("image").to_pylist()
    for r in rows:
        images[r] = encode_image((decode_image(images[r]) * 0.1).astype(np.uint8), "png")
    return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table.schema.field("image").type))


def test_a_new_expert_is_one_file_and_one_line(dark_frame, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        run: {{output_dir: {tmp_path / 'out'}}}
        clean:
          experts: [{{kind: dark_frame, max_mean: 30}}]
          fusion:
            rules: [{{when: {{dark_frame: drop}}, then: drop}}]
            default: keep
    """))
    cfg = load_config(config)
    assert type(cfg.clean.experts[0]).__name__ == "DarkFrameSettings" and cfg.clean.experts[0].max_mean == 30
    assert FacegenConfig.model_validate_json(cfg.model_dump_json()) == cfg  # the stage actors' copy

    table = darken(planted_block(4, 10, 0.0, seed=3), [2, 13, 27])
    experts = build_experts(cfg.clean, stage_dir=cfg.stage_dir)  # what the clean stage's block actor does
    voted, _, stats = vote_block(table, 0, cfg.clean, experts)
    rows = voted.to_pylist()
    dropped = [k for k, r in enumerate(rows) if r["status"] == "dropped"]
    assert dropped == [2, 13, 27]
    assert all(rows[k]["reason"].startswith("dark_frame: mean") and rows[k]["decided_by"].startswith("rule 1") for k in dropped)
    assert [v["expert"] for v in rows[0]["votes"]] == ["cluster", "dark_frame"]
    assert stats["experts"]["dark_frame"] == {"votes": {"keep": 37, "drop": 3, "abstain": 0}, "judged": 40}

    with pytest.raises(ConfigError, match=r"^--set clean.experts=.*: clean.experts: \[0\]: max_mean: Input should be a valid number"):
        load_config(config, ["clean.experts=[{kind: dark_frame, max_mean: dim}]"])


def test_expert_settings_are_checked_in_one_line(tmp_path):
    def load(**clean):
        return CleanSettings.model_validate(clean)

    with pytest.raises(ValueError, match=r"\[0\]: unknown kind 'oracle', expected one of independent, vlm"):
        load(experts=[{"kind": "oracle"}])
    with pytest.raises(ValueError, match=r"\[1\]: percentile: Input should be less than 100"):
        load(experts=[{"kind": "vlm"}, {"kind": "independent", "percentile": 150}])
    with pytest.raises(ValueError, match="experts: independent names two experts: give one a name"):
        load(experts=[{"kind": "independent"}, {"kind": "independent", "embedder": {"kind": "dlib"}}])
    two = load(experts=[{"kind": "independent"}, {"kind": "independent", "name": "dlib", "embedder": {"kind": "dlib"}}],
               fusion={"rules": [{"when": {"independent": "drop", "dlib": "drop"}, "then": "drop"}]})
    assert [e.expert_name for e in two.experts] == ["independent", "dlib"]


def test_the_old_spelling_still_loads_and_digests_the_same():
    old = FacegenConfig.model_validate({"clean": {
        "independent": {"enabled": True, "embedder": {"kind": "dlib"}, "percentile": 5},
        "vlm": {"enabled": False, "model": "unused"}}})
    new = FacegenConfig.model_validate({"clean": {"experts": [{"kind": "independent", "embedder": {"kind": "dlib"}, "percentile": 5}]}})
    assert old.clean.experts == new.clean.experts == [IndependentSettings(embedder={"kind": "dlib"}, percentile=5)]
    assert votes_digest(old) == votes_digest(new) != votes_digest(FacegenConfig())
    both = VlmSettings(base_url="http://127.0.0.1:9/v1")
    assert FacegenConfig.model_validate({"clean": {"vlm": {"enabled": True, "base_url": both.base_url}}}).clean.experts == [both]
    with pytest.raises(ValueError, match=r"independent is now an entry of experts \(\{kind: independent, \.\.\.\}\); give only experts"):
        FacegenConfig.model_validate({"clean": {"independent": {"enabled": True}, "experts": [{"kind": "vlm"}]}})


PIXELS = '''
"""An embedder kind that describes a crop by its 8x8 grey thumbnail (a throwaway for the registration test)."""
import cv2
import numpy as np

from facegen.faces.align import ARCFACE_CROP
from facegen.vectors import l2_normalize

PACKAGED_WEIGHTS = True


class PixelEmbedder:
    kind, dim, crop = "pixels", 64, ARCFACE_CROP
    record = {"kind": "pixels", "file": "none", "sha256": "", "dim": 64}

    def embed_raw(self, images):
        grey = [cv2.resize(cv2.cvtColor(i, cv2.COLOR_RGB2GRAY), (8, 8), interpolation=cv2.INTER_AREA) for i in images]
        return np.asarray(grey, np.float32).reshape(len(images), 64) - 127.5

    def embed(self, images, flip=False):
        out = self.embed_raw(images) + (self.embed_raw(images[:, :, ::-1]) if flip else 0.0)
        return l2_normalize(out).astype(np.float32)

    embed_crops = embed


def build(settings):
    return PixelEmbedder()


def weights_file(settings):
    return __file__
'''


@pytest.fixture
def pixels(tmp_path, monkeypatch):
    from facegen.config.faces import EMBEDDERS

    add_kind(EMBEDDERS, "pixels", "pixel_embedder", PIXELS, tmp_path, monkeypatch)


def test_a_new_embedder_kind_is_one_file_and_one_line(pixels, tmp_path):
    import cv2
    from insightface.data import get_image

    from facegen.faces.align import center_crop
    from facegen.faces.embed import describe_embedder
    from facegen.faces.stage import FaceStage

    cfg = config_from_yaml(tmp_path, "faces: {embedder: {kind: pixels}, detector: {kind: none}}")
    assert cfg.faces.embedder.enabled and describe_embedder(cfg.faces.embedder)["file"] == "pixel_embedder.py"
    photo = cv2.cvtColor(get_image("t1"), cv2.COLOR_BGR2RGB)[:, :400]
    out = FaceStage(cfg.faces)(photo_batch([photo, photo[:, ::-1].copy()]))  # the faces stage's actor, as Ray Data runs it
    assert out["embedding"].shape == (2, 64)
    import pixel_embedder

    crops = np.stack([center_crop(photo), center_crop(np.ascontiguousarray(photo[:, ::-1]))])
    np.testing.assert_allclose(out["embedding"], pixel_embedder.PixelEmbedder().embed(crops), atol=1e-6)
    with pytest.raises(ConfigError, match=r"run.yaml: generator.embedder: kind: identity forces backpropagate "
                                          r"through the embedder, and pixels is not differentiable \(use one of facegen, arcface_torch\)"):
        config_from_yaml(tmp_path, "generator: {embedder: {kind: pixels}}")


def photo_batch(images):
    """GENERATED rows of one identity holding ``images`` without landmarks (the faces stage detects or centre-crops)."""
    import json

    from facegen.schema import GENERATED, rows_to_batch

    rows = [{"identity_id": 3, "block_id": 0, "sample_idx": k, "seed": k, "source": "photo", "image": encode_image(img, "png"),
             "landmarks": np.full(10, np.nan, np.float32), "true_identity_id": 3, "meta": json.dumps({}), "status": "ok",
             "reason": ""} for k, img in enumerate(images)]
    return rows_to_batch(rows, GENERATED)


def config_from_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{output_dir: {tmp_path / 'out'}}}\n{text}\n")
    return load_config(path)


CENTRE_FACE = '''
"""A detector kind that reports one face in the middle of the image, its side a fraction of the
image's short side (a throwaway for the registration test)."""
from typing import Literal

import numpy as np
from pydantic import Field

from facegen.config.faces import DetectorSettings
from facegen.faces.align import ARCFACE_TEMPLATE
from facegen.faces.detect import detections

DEFAULT_MIN_SCORE = 0.5


class CentreFaceSettings(DetectorSettings):
    kind: Literal["centre_face"] = "centre_face"
    fraction: float = Field(default=0.5, gt=0.0, le=1.0)


SETTINGS = CentreFaceSettings


class CentreFace:
    kind = "centre_face"

    def __init__(self, fraction):
        self.fraction = fraction

    def detect(self, image):
        h, w = image.shape[:2]
        side = min(h, w) * self.fraction
        x0, y0 = (w - side) / 2, (h - side) / 2
        landmarks = ARCFACE_TEMPLATE / 112.0 * side + [x0, y0]
        return detections(np.array([[x0, y0, x0 + side, y0 + side]]), np.array([0.8]), landmarks[None])

    def detect_batch(self, images):
        return [self.detect(i) for i in images]


def build(settings):
    return CentreFace(settings.fraction)
'''


def test_a_new_detector_kind_is_one_file_and_one_line(tmp_path, monkeypatch):
    import json

    from facegen.config.faces import DETECTORS
    from facegen.faces.align import ARCFACE_TEMPLATE, align_face
    from facegen.faces.stage import FaceStage

    add_kind(DETECTORS, "centre_face", "centre_face", CENTRE_FACE, tmp_path, monkeypatch)

    cfg = config_from_yaml(tmp_path, "faces: {detector: {kind: centre_face, min_size: 10, fraction: 0.4}}")
    assert cfg.faces.detector.fraction == 0.4 and FacegenConfig.model_validate_json(cfg.model_dump_json()) == cfg
    image = np.random.default_rng(2).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    out = FaceStage(cfg.faces.model_copy(update={"image_format": "png"}))(photo_batch([image]))
    assert out["status"][0] == "ok" and json.loads(out["meta"][0])["face"]["detector"] == "centre_face"
    expected = align_face(image, (ARCFACE_TEMPLATE / 112.0 * 80 + [110, 60]).astype(np.float32))  # as Detection stores them
    np.testing.assert_array_equal(decode_image(out["image"][0]), expected)
    with pytest.raises(ConfigError, match=r"faces.detector: fraction: Input should be less than or equal to 1"):
        config_from_yaml(tmp_path, "faces: {detector: {kind: centre_face, fraction: 1.5}}")
    with pytest.raises(ConfigError, match=r"faces.detector: mtcnn_min_face: not a setting of faces.detector kind centre_face"):
        config_from_yaml(tmp_path, "faces: {detector: {kind: centre_face, mtcnn_min_face: 30}}")
    with pytest.raises(ConfigError, match=r"faces.detector: kind: unknown detector kind 'centre_fce', expected one of "
                                          r"mtcnn, dlib, insightface, centre_face or none"):
        config_from_yaml(tmp_path, "faces: {detector: {kind: centre_fce}}")


FLAT_COLOUR = '''
"""A generator backend drawing one flat colour per sample (a throwaway for the registration test)."""
import json
from typing import Literal

import numpy as np
from pydantic import Field

from facegen.config.generation import BackendSettings
from facegen.generators import identity_rows, sample_seed
from facegen.images import encode_image
from facegen.schema import GENERATED, rows_to_batch


class FlatColourSettings(BackendSettings):
    kind: Literal["flat_colour"] = "flat_colour"
    size: int = Field(default=96, ge=8)


SETTINGS = FlatColourSettings


class FlatColour:
    def __init__(self, settings, seed):
        self.options, self.per_identity, self.seed = settings.backend_settings(), settings.images_per_identity, seed

    def __call__(self, batch):
        rows = []
        for identity_id, block_id in identity_rows(batch):
            for k in range(self.per_identity):
                seed = sample_seed(self.seed, identity_id, k)
                colour = np.random.default_rng(seed).integers(0, 256, 3).astype(np.uint8)
                image = np.broadcast_to(colour, (self.options.size, self.options.size, 3)).copy()
                rows.append({"identity_id": identity_id, "block_id": block_id, "sample_idx": k, "seed": seed,
                             "source": "flat_colour", "image": encode_image(image, "png"), "landmarks": None,
                             "true_identity_id": identity_id, "meta": json.dumps({}), "status": "ok", "reason": ""})
        return rows_to_batch(rows, GENERATED)


def build(settings, seed, **options):
    return FlatColour(settings, seed)
'''


def test_a_new_generator_backend_is_one_file_and_one_line(tmp_path, monkeypatch):
    from facegen.config.generation import GENERATORS
    from facegen.generators import build_generator, sample_seed
    from facegen.lineage import raw_digest

    add_kind(GENERATORS, "flat_colour", "flat_colour", FLAT_COLOUR, tmp_path, monkeypatch)

    cfg = config_from_yaml(tmp_path, "generator: {backend: flat_colour, images_per_identity: 3, flat_colour: {size: 48}}")
    assert cfg.generator.flat_colour.size == 48 and cfg.generator.backend_settings() is cfg.generator.flat_colour
    assert FacegenConfig.model_validate_json(cfg.model_dump_json()) == cfg  # what the stage actors get
    bigger = config_from_yaml(tmp_path, "generator: {backend: flat_colour, images_per_identity: 3, flat_colour: {size: 64}}")
    other = config_from_yaml(tmp_path, "generator: {backend: flat_colour, images_per_identity: 3, flat_colour: {size: 48}, "
                                       "diffusion: {num_inference_steps: 5}}")
    assert raw_digest(bigger) != raw_digest(cfg) == raw_digest(other)  # its section is digested, other backends' are not

    out = build_generator(cfg.generator, cfg.run.seed)({"identity_id": np.array([5, 9]), "block_id": np.array([0, 0])})
    assert out["identity_id"].tolist() == [5, 5, 5, 9, 9, 9] and out["sample_idx"].tolist() == [0, 1, 2] * 2
    first = decode_image(out["image"][0])
    colour = np.random.default_rng(sample_seed(cfg.run.seed, 5, 0)).integers(0, 256, 3)
    assert first.shape == (48, 48, 3) and (first == colour).all()
    with pytest.raises(ConfigError, match=r"generator: flat_colour: size: Input should be greater than or equal to 8"):
        config_from_yaml(tmp_path, "generator: {backend: flat_colour, flat_colour: {size: 4}}")


PLANE_GAN = '''
"""A GAN whose image is a fixed linear map of its 6-d latent (a throwaway for the registration test)."""
from typing import Literal

from facegen.config.gan import GanCropSettings
from facegen.config.generation import BackendSettings


class PlaneGanSettings(BackendSettings):
    kind: Literal["plane_gan"] = "plane_gan"
    gain: float = 0.3
    crop: GanCropSettings = GanCropSettings()


SETTINGS = PlaneGanSettings


def load_gan(section, device):
    import torch

    from facegen.generators.crop import GanCrop
    from facegen.generators.gan import LatentGAN

    network = torch.nn.Linear(6, 3 * 32 * 32, bias=False)
    torch.nn.init.normal_(network.weight, generator=torch.Generator().manual_seed(0))
    network.img_resolution = 32

    def synthesize(latents):
        return torch.tanh(section.gain * network(latents)).reshape(-1, 3, 32, 32)

    return LatentGAN("plane_gan", network, GanCrop.from_settings(section.crop, 32), device, latent_dim=6,
                     latent_mean=torch.zeros(6), synthesize=synthesize)


def build(settings, seed, **options):
    from facegen.generators.gan_backend import GanGenerator

    return GanGenerator(settings, seed, **options)
'''


def test_a_new_gan_is_one_file_and_one_line(tmp_path, monkeypatch):
    """A GAN registered with the latent_space trait is a latent space for the identities stage and the
    GAN backends' renderer: its images are exactly its renders of the identities' latents plus noise."""
    import torch

    from facegen.config.generation import GENERATORS, gan_backends
    from facegen.generators import build_generator, sample_seed
    from facegen.generators.crop import to_uint8_images
    from facegen.generators.gan import build_gan
    from facegen.identities.variation import noise_variants
    from facegen.lineage import raw_digest

    add_kind(GENERATORS, "plane_gan", "plane_gan", PLANE_GAN, tmp_path, monkeypatch, "latent_space")
    assert "plane_gan" in gan_backends()

    cfg = config_from_yaml(tmp_path, "generator: {backend: plane_gan, images_per_identity: 2, device: cpu}")
    assert cfg.generator.identity_space() == "latent" and cfg.generator.backend_settings().gain == 0.3
    brighter = config_from_yaml(tmp_path, "generator: {backend: plane_gan, images_per_identity: 2, plane_gan: {gain: 0.5}}")
    assert raw_digest(brighter) != raw_digest(cfg)
    with pytest.raises(ConfigError, match=r"identities.sampler: vec2face makes identity features, which generator.backend "
                                          r"plane_gan would read as latents"):
        config_from_yaml(tmp_path, "generator: {backend: plane_gan}\nidentities: {sampler: {kind: vec2face}}")

    out = build_generator(cfg.generator, cfg.run.seed)({"identity_id": np.array([3, 4]), "block_id": np.array([0, 0])})
    assert out["status"].tolist() == ["ok"] * 4 and out["source"].tolist() == ["plane_gan"] * 4
    gan = build_gan(cfg.generator)
    reference = gan.gaussian_latents(cfg.run.seed, np.array([4]))[0]
    latents = noise_variants(reference, [sample_seed(cfg.run.seed, 4, k) for k in range(2)], cfg.generator.dispersion.sigma)
    with torch.no_grad():
        expected = to_uint8_images(gan.render(torch.from_numpy(latents)))
    assert [(decode_image(out["image"][2 + k]) == expected[k]).all() for k in range(2)] == [True, True]
