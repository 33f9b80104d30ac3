"""The FFHQ-to-ArcFace crop: same transform as the faces stage's alignment, differentiable back to w."""

import numpy as np
import torch

from facegen.config import FFHQ_EYES, ForceEmbedderSettings, GanCropSettings
from facegen.faces.align import ARCFACE_TEMPLATE, align_face, estimate_similarity
from facegen.generators.crop import GanCrop, to_uint8_images
from facegen.generators.stylegan2 import latent_space
from facegen.identities.encoder import ForceEmbedder, IdentityEncoder
from facegen.models.iresnet import build_backbone
from facegen.models.iresnet_checkpoint import save_backbone
from facegen.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator


def test_fixed_crop_maps_ffhq_eyes_onto_arcface_eyes_and_matches_five_point_alignment():
    crop = GanCrop.from_settings(GanCropSettings(), 256)
    eyes = np.array(FFHQ_EYES) * 256
    mapped = (crop.matrix @ np.hstack([eyes, np.ones((2, 1))]).T).T
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE[:2], atol=0.05)  # 2-point least squares of 2 points: exact up to the tilt
    # the landmarks handed to the faces stage give back the same transform through 5-point alignment
    rng = np.random.default_rng(0)
    image = cv_smooth(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    reference = align_face(image, crop.landmarks())
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    warped = to_uint8_images(crop.warp(tensor))[0]
    diff = np.abs(warped.astype(int) - reference.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4


def cv_smooth(image):
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 3)


def test_similarity_is_exact_for_a_known_transform():
    src = np.array([[10.0, 20.0], [50.0, 25.0], [30.0, 60.0]])
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = estimate_similarity(src, src @ rot.T + shift)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_gradients_flow_from_the_embedder_through_the_crop_back_to_w(tmp_path):
    torch.manual_seed(0)
    cfg = StyleGAN2Config.from_channel_base(32, channel_base=128, channel_max=8, z_dim=8, w_dim=8, mapping_layers=2)
    G = StyleGAN2Generator(cfg).eval().requires_grad_(False)
    backbone = build_backbone("iresnet18", width=4, embedding_size=16).eval()
    save_backbone(str(tmp_path / "emb"), backbone, "iresnet18", 4, 16)
    crop = GanCrop.from_settings(GanCropSettings(src_points=[(0.3, 0.4), (0.7, 0.4)]), 32)
    encoder = IdentityEncoder(latent_space(G, crop, torch.device("cpu")), ForceEmbedder(ForceEmbedderSettings(path=str(tmp_path / "emb"))))
    w = G.mapping(torch.randn(2, 8))[:, 0].clone()
    target = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)

    def loss(latents):
        return (encoder.embed_tensor(latents) * target).sum()

    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(w), w)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn_like(w)
    eps = 1e-3  # clamps and leaky ReLUs make the map piecewise smooth: a small step stays on one piece
    with torch.no_grad():
        numeric = (loss(w + eps * direction) - loss(w - eps * direction)) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(float(numeric - analytic)) < 0.03 * abs(float(analytic)) + 1e-6
    # pullback of the encoder is the same vector-Jacobian product, batch by batch
    pulled = encoder.pullback(w.detach().numpy(), target.numpy())
    np.testing.assert_allclose(pulled, grad.numpy(), rtol=1e-4, atol=1e-6)


def test_detector_crop_follows_the_faces_found_and_stays_differentiable(tmp_path):
    from facegen.config import load_config
    from facegen.generators.gan import build_gan, crop_detector

    backbone = build_backbone("iresnet18", width=4, embedding_size=16).eval()
    save_backbone(str(tmp_path / "emb"), backbone, "iresnet18", 4, 16)
    cfg = load_config(None, ["generator.backend=dcgan", "generator.device=cpu", "generator.dcgan.crop.kind=detector",
                             f"generator.embedder.path={tmp_path / 'emb'}"])
    gan = build_gan(cfg.generator)
    encoder = IdentityEncoder(gan, ForceEmbedder(cfg.generator.embedder), 8, crop_detector(cfg.generator))
    latents = gan.gaussian_latents(0, np.arange(4))
    with torch.no_grad():
        matrices = encoder.crop_matrices(gan.render(torch.from_numpy(latents)))
    assert matrices.shape == (4, 2, 3)
    assert any(not np.allclose(m, gan.crop.matrix, atol=1e-3) for m in matrices)  # MTCNN's landmarks, not the template
    grad = encoder.pullback(latents, np.ones((4, 16), np.float32))
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
