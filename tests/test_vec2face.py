"""Vec2Face: the public checkpoint's state dict (exact names and shapes) loads strictly and safely."""

import argparse
import io

import numpy as np
import pytest
import torch

from facegen.generators.vec2face import vec2face_vit_base_patch16
from facegen.models.vec2face import draw_token_masks, load_vec2face, save_vec2face
from untrusted import RunsShell


def _block(prefix, width):
    """One ViT block of the release: pre-norm attention (fused qkv with bias) and a 4x MLP."""
    return {
        f"{prefix}.norm1.weight": (width,), f"{prefix}.norm1.bias": (width,),
        f"{prefix}.attn.qkv.weight": (3 * width, width), f"{prefix}.attn.qkv.bias": (3 * width,),
        f"{prefix}.attn.proj.weight": (width, width), f"{prefix}.attn.proj.bias": (width,),
        f"{prefix}.norm2.weight": (width,), f"{prefix}.norm2.bias": (width,),
        f"{prefix}.mlp.fc1.weight": (4 * width, width), f"{prefix}.mlp.fc1.bias": (4 * width,),
        f"{prefix}.mlp.fc2.weight": (width, 4 * width), f"{prefix}.mlp.fc2.bias": (width,),
    }


def _resnet(prefix, cin, cout):
    """A residual block of the VQGAN image decoder: bias-free 3x3 convs, 1x1 shortcut on width change."""
    out = {
        f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3),
        f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3),
    }
    if cin != cout:
        out[f"{prefix}.nin_shortcut.weight"] = (cout, cout, 1, 1)
    return out


def expected_base_state():
    """The names and shapes of ``model_vec2face`` of vec2face_vit_base_patch16, from the public
    description: ViT-B/16 encoder (768, 12 blocks), 8-block decoder (768), 7x7 token grid + 1
    feature token, 512-d feature input, VQGAN decoder z=256, ch=128, ch_mult (1,1,2,2,4),
    2 residual blocks per level, 112 px RGB output."""
    table = {
        "token_emb.position_ids": (1, 50),
        "token_emb.position_embeddings.weight": (50, 768),
        "token_emb.LayerNorm.weight": (768,), "token_emb.LayerNorm.bias": (768,),
        "latent_prior_proj_f.weight": (768, 512), "latent_prior_proj_f.bias": (768,),
        "feature_token.weight": (49, 1), "feature_token.bias": (49,),
        "center_token.weight": (49, 768), "center_token.bias": (49,),
        "im_decoder_proj.weight": (256, 768), "im_decoder_proj.bias": (256,),
        "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
        "norm.weight": (768,), "norm.bias": (768,),
        "decoder_embed.weight": (768, 768), "decoder_embed.bias": (768,),
        "decoder_pos_embed_learned": (1, 50, 768),
        "decoder_norm.weight": (768,), "decoder_norm.bias": (768,),
        "im_decoder.conv_in.weight": (512, 256, 3, 3), "im_decoder.conv_in.bias": (512,),
        "im_decoder.norm_out.weight": (128,), "im_decoder.norm_out.bias": (128,),
        "im_decoder.conv_out.weight": (3, 128, 3, 3), "im_decoder.conv_out.bias": (3,),
    }
    for i in range(12):
        table |= _block(f"blocks.{i}", 768)
    for i in range(8):
        table |= _block(f"decoder_blocks.{i}", 768)
    table |= _resnet("im_decoder.mid.block_1", 512, 512) | _resnet("im_decoder.mid.block_2", 512, 512)
    widths = {4: 512, 3: 256, 2: 256, 1: 128, 0: 128}  # level -> 128 * ch_mult[level]
    cin = 512
    for level in (4, 3, 2, 1, 0):
        for j in range(2):
            table |= _resnet(f"im_decoder.up.{level}.block.{j}", cin, widths[level])
            cin = widths[level]
        if level:
            table[f"im_decoder.up.{level}.upsample.conv.weight"] = (cin, cin, 3, 3)
            table[f"im_decoder.up.{level}.upsample.conv.bias"] = (cin,)
    return table


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A training checkpoint in the release's layout: random weights of the expected table under
    ``model_vec2face`` next to the optimiser state and the argparse arguments."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in expected_base_state().items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(50).reshape(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.02
    path = tmp_path_factory.mktemp("vec2face") / "checkpoint-1999.pth"
    torch.save({"model_vec2face": state, "model_disc": {}, "model_ema": None, "epoch": 1999,
                "args": argparse.Namespace(model="vec2face_vit_base_patch16", rep_dim=512)}, path)
    return str(path), state


@pytest.fixture(scope="module")
def loaded(release_checkpoint):
    return load_vec2face(release_checkpoint[0])


def test_the_release_state_dict_loads_strictly_with_exact_names_and_shapes(release_checkpoint, loaded):
    _, state = release_checkpoint
    assert vec2face_vit_base_patch16 is not None  # the public builder's name, re-exported for generators
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == expected_base_state()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_save_load_round_trip_is_exact_and_so_are_the_images(loaded, tmp_path):
    copy = load_vec2face(save_vec2face(str(tmp_path / "v2f.pth"), loaded))
    assert list(copy.state_dict()) == list(loaded.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), copy.state_dict().values()))
    noise, count = draw_token_masks(np.random.default_rng(1), loaded.num_dropped)
    features = torch.randn(1, 512, generator=torch.Generator().manual_seed(2)) * 25
    args = (features, torch.tensor(noise[None]), torch.tensor([count]))
    with torch.no_grad():
        a, b = loaded(*args), copy(*args)
    assert a.shape == (1, 3, 112, 112) and torch.equal(a, b)


def test_mismatched_or_unsafe_checkpoints_fail_with_one_line(release_checkpoint, tmp_path):
    path, state = release_checkpoint
    renamed = dict(state)
    renamed["encoder_norm.weight"] = renamed.pop("norm.weight")
    torch.save({"model_vec2face": renamed}, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"renamed.pth: weights do not match the Vec2Face base model .*norm.weight"):
        load_vec2face(str(tmp_path / "renamed.pth"))

    buffer = io.BytesIO()
    torch.save({"model_vec2face": {}, "x": RunsShell(tmp_path / "ran")}, buffer)
    (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"evil.pth: not a readable Vec2Face checkpoint \(UnpicklingError"):
        load_vec2face(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()
    with pytest.raises(FileNotFoundError, match="missing.pth: Vec2Face checkpoint not found"):
        load_vec2face(str(tmp_path / "missing.pth"))


def test_token_masks_follow_the_truncated_normal_ratio():
    rng = np.random.default_rng(0)
    draws = [draw_token_masks(rng, 5) for _ in range(4000)]
    counts = np.array([c for _, c in draws])
    assert counts.min() >= 5 and counts.max() <= 49
    assert all(np.array_equal(np.sort(n), np.arange(49, dtype=np.float32) / 49) for n, _ in draws[:20])
    # mu 0.15, std 0.25 truncated to [0.1, 1]: mean ratio 0.318 (ceil adds about half a token)
    assert 0.31 < counts.mean() / 49 < 0.345
