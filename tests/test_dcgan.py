"""The real DCGAN of gan-face-generate: weights-only loading into facegen's network, and its backend."""


import numpy as np
import pytest
import torch

from facegen.config import load_config
from facegen.generators import build_generator
from facegen.images import decode_image
from facegen.models.dcgan import DCGANGenerator, load_dcgan, packaged_weights
from untrusted import RunsShell


def test_packaged_weights_load_weights_only_and_render_faces():
    G = load_dcgan()
    assert (G.nz, G.width, G.img_resolution) == (100, 64, 64)
    assert all(not p.requires_grad for p in G.parameters()) and not G.training
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = G(z)
    assert images.shape == (4, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    # different latents, different faces; the same latent, the same face
    assert (images[0] - images[1]).abs().mean() > 0.1
    with torch.no_grad():
        assert torch.equal(G(z[:1]), images[:1])


def test_checkpoints_that_need_code_or_are_not_dcgans_fail_with_the_file_named(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.tar"
    torch.save({"netG_state_dict": RunsShell(marker)}, evil)
    with pytest.raises(ValueError, match="evil.tar: not a readable weights-only torch checkpoint"):
        load_dcgan(str(evil))
    assert not marker.exists()
    other = tmp_path / "other.tar"
    torch.save({"netD_state_dict": {"x": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match="other.tar: not a DCGAN generator checkpoint"):
        load_dcgan(str(other))
    small = tmp_path / "small.tar"
    torch.save({"netG_state_dict": DCGANGenerator(nz=8, width=4).state_dict()}, small)
    assert load_dcgan(str(small)).nz == 8
    with pytest.raises(FileNotFoundError, match="nothing.tar: DCGAN weights not found"):
        load_dcgan(str(tmp_path / "nothing.tar"))
    assert packaged_weights().endswith("gan_face_generate/weights.tar")


def test_dcgan_backend_renders_rows_with_the_crop_landmarks_and_reuses_sampled_latents():
    cfg = load_config(None, ["generator.backend=dcgan", "generator.images_per_identity=3", "generator.device=cpu"])
    backend = build_generator(cfg.generator, seed=7)
    batch = {"identity_id": np.array([4, 2**62 + 1]), "block_id": np.array([0, 0])}
    out = backend(batch)
    assert list(out["status"]) == ["ok"] * 3 + ["error"] * 3
    assert "identity_id" in out["reason"][3] and "outside" in out["reason"][3]
    image = decode_image(out["image"][0])
    assert image.shape == (64, 64, 3)
    # landmarks = the ArcFace template scaled from 112 to 64 px (DigiFace crops resized)
    np.testing.assert_allclose(out["landmarks"][0][:2], [38.2946 * 64 / 112, 51.6963 * 64 / 112], atol=1e-3)
    assert len(set(out["seed"][:3])) == 3
    # a latent handed in by the identities stage is used instead of the gaussian draw
    reference = backend.gan.gaussian_latents(7, np.array([4]))[0]
    again = backend({"identity_id": np.array([4]), "block_id": np.array([0]), "latent": np.stack([reference])})
    assert list(again["image"]) == list(out["image"][:3])
    moved = backend({"identity_id": np.array([4]), "block_id": np.array([0]), "latent": np.stack([reference + 1.5])})
    assert list(moved["image"]) != list(out["image"][:3])
    wrong = backend({"identity_id": np.array([4]), "block_id": np.array([0]), "latent": np.zeros((1, 5), np.float32)})
    assert set(wrong["status"]) == {"error"} and "latent has 5 values" in wrong["reason"][0]
