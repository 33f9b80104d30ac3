"""Arc2Face through plain diffusers on a tiny model in the release's folder layout."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import Arc2FaceSettings  # noqa: E402
from facegen.testing.tiny_diffusers import build_tiny_arc2face  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_arc2face(str(tmp_path_factory.mktemp("arc2face")))
    torch.set_num_threads(threads)


def _settings(layout, **extra):
    options = dict(unet=layout["models"], encoder=layout["models"], base_model=layout["base"],
                   num_inference_steps=2, height=64, width=64, local_files_only=True)
    return Arc2FaceSettings(**(options | extra))


@pytest.fixture(scope="module")
def expander(layout):
    from facegen.generators.arc2face import Arc2FaceExpander

    return Arc2FaceExpander(_settings(layout), device="cpu")


def test_release_defaults_and_components(expander):
    defaults = Arc2FaceSettings()
    assert (defaults.scheduler, defaults.num_inference_steps, defaults.guidance_scale) == ("dpm_multistep", 25, 3.0)
    assert (defaults.unet_subfolder, defaults.encoder_subfolder) == ("arc2face", "encoder")
    assert defaults.id_prompt == "photo of a id person"
    pipe = expander.pipeline
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and pipe.text_encoder.config.hidden_size == 512
    assert pipe.unet.config.cross_attention_dim == 512  # Arc2Face's UNet, not the base model's (32)


def test_the_id_token_input_is_exactly_the_padded_normalised_feature(expander):
    encoder = expander.pipeline.text_encoder
    table = encoder.get_input_embeddings()
    seen = []
    handle = table.register_forward_hook(lambda module, args, output: seen.append((args[0].clone(), output.clone())))
    features = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32) * 7  # 128-d, e.g. dlib
    try:
        embeds = expander.prompt_embeds(features)
    finally:
        handle.remove()
    (input_ids, token_embeds), = seen  # the hook saw the encoder's one call
    rows, cols = (input_ids == expander.token_id).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 1, 2] and len(set(cols.tolist())) == 1
    expected = np.zeros((3, 512), np.float32)
    expected[:, :128] = features.astype(np.float64) / np.linalg.norm(features.astype(np.float64), axis=1, keepdims=True)
    assert np.array_equal(token_embeds[rows, cols].numpy(), expected)
    others = input_ids != expander.token_id
    assert torch.equal(token_embeds[others], table.weight[input_ids[others]])  # every other token untouched
    assert embeds.shape == (3, 77, 512) and not torch.equal(embeds[0], embeds[1])
    plain = encoder(input_ids)[0]  # the encoder with the id token's own embedding
    assert not torch.allclose(plain[0], embeds[0])


def test_images_follow_the_feature_and_the_seed(expander):
    f = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    a = expander.render(f, [5, 5])
    b = expander.render(f[::-1].copy(), [5, 5])
    again = expander.render(f, [5, 5])
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, again))  # same feature + seed = same bytes
    assert np.array_equal(a[0], b[1]) and not np.array_equal(a[0], a[1])  # the feature changes the image
    scaled = expander.render(f * 30.0, [5, 5])  # the feature is L2-normalised first
    assert all(np.array_equal(x, y) for x, y in zip(a, scaled))


def test_bad_settings_and_inputs_are_one_line_errors(layout, expander, tmp_path):
    from facegen.generators.arc2face import Arc2FaceExpander

    with pytest.raises(ValueError, match=r"id_token: 'person' is \d+ tokens for this tokenizer, expected one"):
        Arc2FaceExpander(_settings(layout, id_token="person"), device="cpu")
    with pytest.raises(FileNotFoundError, match=r"generator.hybrid.arc2face.unet: .*nowhere: no such directory"):
        Arc2FaceExpander(_settings(layout, unet=str(tmp_path / "nowhere")), device="cpu")
    with pytest.raises(RuntimeError, match=r"arc2face.encoder: .*cannot load the Arc2Face ID encoder"):
        Arc2FaceExpander(_settings(layout, encoder_subfolder="arc2face"), device="cpu")
    with pytest.raises(ValueError, match=r"do not fit the ID encoder's width 512"):
        expander.prompt_embeds(np.ones((1, 600), np.float32))
