"""StyleGAN2: NVIDIA pickle and rosinality .pt loading, the equations, and refusal of carried code."""

import math
import pickle

import numpy as np
import pytest
import torch

from facegen.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from facegen.models.stylegan2_checkpoint import load_stylegan2
from facegen.models.stylegan2 import SynthesisLayer
from facegen.models.stylegan2_checkpoint import read_network_pickle
from stylegan2_files import randomized, write_nvidia_pickle, write_rosinality_checkpoint
from untrusted import RunsShell


def small_generator(seed=0, **overrides) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    kwargs = dict(z_dim=16, w_dim=16, mapping_layers=3, channel_base=128, channel_max=12)
    kwargs.update(overrides)
    cfg = StyleGAN2Config.from_channel_base(32, **{k: kwargs.pop(k) for k in ("channel_base", "channel_max")}, **kwargs)
    return randomized(StyleGAN2Generator(cfg), seed)


def render(G, z, psi=0.7):
    with torch.no_grad():
        return G(z, truncation_psi=psi, noise_mode="const")


def test_nvidia_pickle_and_rosinality_checkpoint_load_to_identical_outputs(tmp_path):
    G = small_generator()
    write_nvidia_pickle(tmp_path / "g.pkl", G)
    write_rosinality_checkpoint(tmp_path / "g.pt", G)
    from_pkl = load_stylegan2(str(tmp_path / "g.pkl"))
    from_pt = load_stylegan2(str(tmp_path / "g.pt"))
    z = torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(1))
    expected = render(G, z)
    assert expected.shape == (3, 3, 32, 32) and expected.std() > 0.1
    for loaded in (from_pkl, from_pt):
        assert (loaded.z_dim, loaded.w_dim, loaded.num_ws, loaded.img_resolution) == (16, 16, 8, 32)
        assert torch.equal(loaded.mapping(z, truncation_psi=0.7), G.mapping(z, truncation_psi=0.7))
        assert torch.equal(render(loaded, z), expected)
    # random noise differs per call; constant noise and no noise are deterministic
    with torch.no_grad():
        ws = from_pkl.mapping(z)
        assert not torch.equal(from_pkl.synthesis(ws, noise_mode="random"), from_pkl.synthesis(ws, noise_mode="random"))
        assert torch.equal(from_pkl.synthesis(ws, noise_mode="none"), G.synthesis(ws, noise_mode="none"))


def test_pickle_with_fp16_blocks_clamp_and_orig_architecture_keeps_its_settings(tmp_path):
    G = small_generator(seed=3, num_fp16_res=2, conv_clamp=256.0, architecture="orig")
    # numpy arrays and scalars elsewhere in the pickle are read as plain data
    extra = {"training_set_kwargs": {"resolution": 32, "mean": np.arange(3, dtype=np.float32), "scale": np.float64(2.0)}}
    write_nvidia_pickle(tmp_path / "g.pkl", G, extra=extra)
    loaded = load_stylegan2(str(tmp_path / "g.pkl"))
    for name in ("channels", "architecture", "mapping_layers", "mapping_features", "mapping_lr_multiplier"):
        assert getattr(loaded.config, name) == getattr(G.config, name)
    assert loaded.config.fp16_min_resolution == 16 and loaded.config.conv_clamp == 256.0
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(render(loaded, z, psi=0.5), render(G, z, psi=0.5))


# --- the equations, computed by hand in numpy -----------------------------------------------------------

def _lrelu(x):
    return np.where(x >= 0, x, 0.2 * x) * math.sqrt(2)


def _correlate3x3(x, w):
    """x [I, H, W], w [O, I, 3, 3], zero padding 1 -> [O, H, W] (what conv2d computes)."""
    i_ch, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for y in range(h):
            for xx in range(wd):
                out[o, y, xx] = np.sum(xp[:, y : y + 3, xx : xx + 3] * w[o])
    return out


def test_mapping_truncation_and_4px_synthesis_follow_nvidias_equations():
    torch.manual_seed(5)
    cfg = StyleGAN2Config(z_dim=2, w_dim=3, img_resolution=4, channels={4: 2}, mapping_layers=1, conv_clamp=1.5)
    G = randomized(StyleGAN2Generator(cfg), seed=5)
    p = {k: v.double().numpy() for k, v in G.state_dict().items()}
    z = np.array([[3.0, -4.0]])
    psi = 0.6

    # mapping: normalise z, one FC layer with lr multiplier 0.01 and lrelu * sqrt(2), broadcast, truncate
    x = z / np.sqrt(np.mean(z**2) + 1e-8)
    w = _lrelu(x @ (p["mapping.fc0.weight"] * 0.01 / math.sqrt(2)).T + p["mapping.fc0.bias"] * 0.01)[0]
    w_avg = p["mapping.w_avg"]
    w_trunc = w_avg + psi * (w - w_avg)
    ws = G.mapping(torch.tensor(z, dtype=torch.float32), truncation_psi=psi)
    assert ws.shape == (1, 2, 3)
    np.testing.assert_allclose(ws[0].numpy(), np.stack([w_trunc, w_trunc]), rtol=1e-5, atol=1e-6)

    # b4.conv1: style = affine(w) (gain 1/sqrt(w_dim)), modulate, demodulate, correlate, noise, bias, act, clamp
    pre = "synthesis.b4.conv1."
    style = p[pre + "affine.weight"] @ w_trunc / math.sqrt(3) + p[pre + "affine.bias"]
    weight = p[pre + "weight"] * style[None, :, None, None]
    weight = weight / np.sqrt((weight**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)
    h = _correlate3x3(p["synthesis.b4.const"], weight)
    h = h + p[pre + "noise_const"] * p[pre + "noise_strength"]
    h = np.clip(_lrelu(h + p[pre + "bias"][:, None, None]), -1.5, 1.5)
    # torgb: style * 1/sqrt(in_channels), no demodulation, 1x1 conv, bias, clamp
    pre = "synthesis.b4.torgb."
    style = (p[pre + "affine.weight"] @ w_trunc / math.sqrt(3) + p[pre + "affine.bias"]) / math.sqrt(2)
    rgb = np.einsum("oi,ihw->ohw", p[pre + "weight"][:, :, 0, 0] * style[None], h) + p[pre + "bias"][:, None, None]
    rgb = np.clip(rgb, -1.5, 1.5)
    with torch.no_grad():
        img = G.synthesis(ws, noise_mode="const")
    assert np.abs(h).max() > 0.1
    np.testing.assert_allclose(img[0].numpy(), rgb, rtol=1e-4, atol=1e-5)


def _upfirdn_up2(x, f, pad0, pad1, gain):
    """Zero-insertion 2x upsampling, padding, then a true 2-D convolution with ``f * gain``: loops."""
    c, h, w = x.shape
    up = np.zeros((c, 2 * h, 2 * w))
    up[:, ::2, ::2] = x
    up = np.pad(up, ((0, 0), (pad0, pad1), (pad0, pad1)))
    k = f[::-1, ::-1] * gain
    oh, ow = up.shape[1] - k.shape[0] + 1, up.shape[2] - k.shape[1] + 1
    out = np.zeros((c, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            out[:, y, xx] = np.sum(up[:, y : y + k.shape[0], xx : xx + k.shape[1]] * k, axis=(1, 2))
    return out


def test_upsampling_conv_is_fir_upsampling_then_true_convolution():
    torch.manual_seed(7)
    cfg = StyleGAN2Config(z_dim=2, w_dim=3, img_resolution=8, channels={4: 2, 8: 2})
    layer = SynthesisLayer(2, 2, cfg, resolution=8, up=2).eval()
    x = torch.randn(1, 2, 4, 4)
    w = torch.randn(1, 3)
    with torch.no_grad():
        out = layer(x, w, noise_mode="none")
        style = layer.affine(w)[0].double().numpy()
    weight = layer.weight.detach().double().numpy() * style[None, :, None, None]
    weight = weight / np.sqrt((weight**2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)
    f = layer.resample_filter.double().numpy()
    np.testing.assert_allclose(f, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64)
    # padding 1 relative to the upsampled image, plus the filter's own (3, 2) -> size 2H + 2 before the 3x3 conv
    up = _upfirdn_up2(x[0].double().numpy(), f, 3, 2, gain=4)
    conv = _correlate3x3(up, weight[:, :, ::-1, ::-1])[:, 1:-1, 1:-1]
    expected = _lrelu(conv + layer.bias.detach().double().numpy()[:, None, None])
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-4, atol=1e-5)


# --- untrusted files -----------------------------------------------------------------------------------

def test_pickle_whose_reduce_calls_os_system_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": RunsShell(marker)}))
    with pytest.raises(ValueError, match=r"evil.pkl: unsafe or unsupported network pickle \(refusing global (posix|os)\.system"):
        load_stylegan2(str(path))
    assert not marker.exists()


def test_persistence_record_with_side_effect_source_loads_tensors_only(tmp_path):
    marker = tmp_path / "ran"
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\nclass Generator: pass\n"
    G = small_generator(seed=1)
    write_nvidia_pickle(tmp_path / "g.pkl", G, source=source)
    records = read_network_pickle((tmp_path / "g.pkl").read_bytes())
    assert records["G_ema"].class_name == "Generator" and records["G_ema"].source_chars == len(source)
    loaded = load_stylegan2(str(tmp_path / "g.pkl"))
    assert not marker.exists()
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(render(loaded, z), render(G, z))


def test_stylegan3_generator_is_named_unsupported(tmp_path):
    class SynthesisInput(torch.nn.Module):
        pass

    class SynthesisNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input = SynthesisInput()

    class Generator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z_dim, self.c_dim, self.w_dim, self.img_resolution, self.img_channels = 4, 0, 4, 16, 3
            self.synthesis = SynthesisNetwork()
            self.mapping = G.mapping

    G = small_generator()
    write_nvidia_pickle(tmp_path / "g3.pkl", Generator())
    with pytest.raises(ValueError, match="g3.pkl: not a StyleGAN2 generator.*SynthesisInput.*StyleGAN3"):
        load_stylegan2(str(tmp_path / "g3.pkl"))


def test_unreadable_or_foreign_checkpoints_fail_with_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pkl: StyleGAN2 checkpoint not found"):
        load_stylegan2(str(tmp_path / "missing.pkl"))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.pkl"):
        load_stylegan2(str(tmp_path / "junk.pkl"))
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: a rosinality checkpoint needs a 'g_ema' state dict"):
        load_stylegan2(str(tmp_path / "other.pt"))
    G = small_generator()
    write_nvidia_pickle(tmp_path / "g.pkl", G)
    with pytest.raises(ValueError, match="no network 'G_missing'"):
        load_stylegan2(str(tmp_path / "g.pkl"), key="G_missing")


def test_stylegan2_backend_renders_identity_rows_from_a_pickle(tmp_path):
    from facegen.config import load_config
    from facegen.images import decode_image
    from facegen.generators import build_generator

    G = small_generator(seed=2)
    write_nvidia_pickle(tmp_path / "g.pkl", G)
    cfg = load_config(None, ["generator.backend=stylegan2", f"generator.stylegan2.checkpoint={tmp_path / 'g.pkl'}",
                             "generator.images_per_identity=2", "generator.device=cpu"])
    backend = build_generator(cfg.generator, seed=1)
    out = backend({"identity_id": np.array([0, 1]), "block_id": np.array([0, 0])})
    assert list(out["status"]) == ["ok"] * 4 and list(out["source"]) == ["stylegan2"] * 4
    assert decode_image(out["image"][0]).shape == (32, 32, 3)
    # the FFHQ eyes land on the ArcFace eyes: the row's first landmark is the left eye at (380, 480)/1024
    np.testing.assert_allclose(out["landmarks"][0][:2], [380 / 1024 * 32, 480 / 1024 * 32], atol=0.1)
    # the identity's latent is w of its seeded z with truncation 0.7
    w = backend.gan.gaussian_latents(1, np.array([0]))[0]
    z = np.random.default_rng([1, 0, 0x6A7E]).standard_normal(16)
    expected = G.mapping(torch.tensor(z[None], dtype=torch.float32), truncation_psi=0.7)[0, 0]
    np.testing.assert_allclose(w, expected.numpy(), rtol=1e-5)
