"""The Stable Diffusion backend on a tiny pipeline saved to disk and loaded through from_pretrained."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from facegen.config import DiffusionSettings, GeneratorSettings  # noqa: E402
from facegen.generators import build_generator, sample_seed  # noqa: E402
from facegen.identities.attributes import build_prompt, sample_attributes  # noqa: E402
from facegen.images import decode_image  # noqa: E402
from facegen.schema import GENERATED, STATUS_ERROR, STATUS_OK, table_from_batch  # noqa: E402
from facegen.testing.tiny_diffusers import build_tiny_lora, build_tiny_sd, build_tiny_sdxl  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few shared cores: more threads only contend (20x slower here)
    yield build_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))
    torch.set_num_threads(threads)


def _settings(model, per_identity=2, **diffusion):
    options = dict(model=model, num_inference_steps=2, height=64, width=64, local_files_only=True) | diffusion
    return GeneratorSettings(
        backend="diffusion", images_per_identity=per_identity, diffusion=DiffusionSettings(**options)
    )


def _ids(*ids):
    return {"identity_id": np.array(ids, np.int64), "block_id": np.zeros(len(ids), np.int64)}


@pytest.fixture(scope="module")
def generator(tiny_sd):
    return build_generator(_settings(tiny_sd, per_identity=3), seed=0, micro_batch=2)


def test_images_have_the_requested_size_and_metadata(generator, tiny_sd):
    out = generator(_ids(4))
    table_from_batch(out, GENERATED)
    assert out["status"].tolist() == [STATUS_OK] * 3 and out["sample_idx"].tolist() == [0, 1, 2]
    assert [decode_image(png).shape for png in out["image"]] == [(64, 64, 3)] * 3
    assert out["seed"].tolist() == [sample_seed(0, 4, k) for k in range(3)]
    assert set(out["source"]) == {f"diffusion:{tiny_sd}"} and (out["true_identity_id"] == -1).all()
    assert np.isnan(out["landmarks"]).all()
    meta = json.loads(out["meta"][0])
    assert meta["attributes"] == sample_attributes(0, 4) and meta["prompt"] == build_prompt(meta["attributes"])
    assert len(set(out["image"].tolist())) == 3  # each sample has its own seed


def test_same_sample_same_bytes_in_any_batch(generator):
    alone = generator(_ids(9))
    mixed = generator(_ids(2, 9))
    keep = mixed["identity_id"] == 9
    assert alone["image"].tolist() == mixed["image"][keep].tolist()
    others = set(mixed["image"][~keep].tolist())
    assert not others & set(alone["image"].tolist())


def test_bad_identity_and_failing_pipeline_calls_become_error_rows(generator, tiny_sd):
    out = generator(_ids(-2, 3))
    assert out["status"].tolist() == [STATUS_ERROR] * 3 + [STATUS_OK] * 3
    assert "identity_id=-2 sample_idx=0" in out["reason"][0]
    odd = build_generator(_settings(tiny_sd, per_identity=2, height=60), seed=0)
    out = odd(_ids(1))  # SD needs sizes divisible by 8: every call fails, each sample is reported
    assert out["status"].tolist() == [STATUS_ERROR] * 2
    assert "identity_id=1 sample_idx=1" in out["reason"][1] and "divisible by 8" in out["reason"][1]


def test_unloadable_model_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model: no such directory"):
        build_generator(_settings(missing), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="empty: cannot load a Stable Diffusion pipeline"):
        build_generator(_settings(str(tmp_path / "empty")), seed=0)


def test_the_pipeline_class_follows_the_model_folder(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xl = build_generator(_settings(build_tiny_sdxl(str(tmp_path / "xl")), per_identity=2), seed=0)
        out = xl(_ids(5))
    finally:
        torch.set_num_threads(threads)
    assert type(xl.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert out["status"].tolist() == [STATUS_OK] * 2
    assert [decode_image(png).shape for png in out["image"]] == [(64, 64, 3)] * 2


def test_variation_phrases_give_each_sample_its_own_prompt(tiny_sd):
    from facegen.identities.phrases import CATEGORIES, variation_phrase

    varied = build_generator(_settings(tiny_sd, per_identity=3, variation_phrases=True), seed=0)
    out = varied(_ids(4))
    prompts = [json.loads(m)["prompt"] for m in out["meta"]]
    base = build_prompt(sample_attributes(0, 4))
    assert prompts == [f"{base}, {variation_phrase(sample_seed(0, 4, k))}" for k in range(3)]
    assert len(set(prompts)) == 3
    phrase = variation_phrase(sample_seed(0, 4, 0)).split(", ")
    assert [p in values for p, values in zip(phrase, CATEGORIES.values())] == [True] * 5


def test_out_of_memory_batches_are_split_and_other_failures_retried_alone():
    from facegen.generators import run_with_splitting

    calls = []

    def compute(items):  # a device that fits two samples at a time; item 5 is broken
        calls.append(list(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if 5 in items:
            raise ValueError("NaN latents")
        return [i * 10 for i in items]

    out = run_with_splitting(list(range(7)), compute, lambda item, exc: f"error {item}: {exc}")
    assert out == [0, 10, 20, 30, 40, "error 5: NaN latents", 60]
    assert calls[:3] == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3], [0, 1]]  # halves, not singles, after OOM
    assert [5] in calls and [4] in calls  # the failing pair [4, 5] retried one by one


def test_an_lcm_lora_is_fused_and_switches_to_the_lcm_scheduler(tiny_sd, tmp_path):
    lora = build_tiny_lora(tiny_sd, str(tmp_path / "lora"))
    plain = build_generator(_settings(tiny_sd, per_identity=1, guidance_scale=1.0), seed=0)
    fast = build_generator(_settings(tiny_sd, per_identity=1, guidance_scale=1.0, lcm_lora=lora), seed=0)
    assert type(fast.pipeline.scheduler).__name__ == "LCMScheduler"
    assert type(plain.pipeline.scheduler).__name__ == "DDIMScheduler"
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused, base = fast.pipeline.unet.state_dict()[name], plain.pipeline.unet.state_dict()[name]
    assert fused.shape == base.shape and not torch.equal(fused, base)  # merged into the weights
    out = fast(_ids(3))
    assert out["status"].tolist() == [STATUS_OK] and decode_image(out["image"][0]).shape == (64, 64, 3)
    with pytest.raises(FileNotFoundError, match=r"lcm_lora: .*nowhere: no such directory"):
        build_generator(_settings(tiny_sd, lcm_lora=str(tmp_path / "nowhere")), seed=0)
