"""GPU throughput of the diffusion backends, without Ray (plain diffusers + torch), one run.

    python bench/gpu_diffusion.py --device cuda [--batch 8] [--repeat 2] [--skip-compile]

No weights can be downloaded on the benchmark machines, so every model is built from its
published *shape* with random weights (timing does not depend on the values), saved with
``save_pretrained`` in float16 and loaded back through facegen's own loaders:

* SD 1.5: UNet (320/640/1280/1280, cross-attention 768), VAE (128/256/512/512), CLIP ViT-L/14 text
  encoder (768 wide, 12 layers), 512x512, DPM-Solver multistep 25 steps, guidance 7.5 (CFG doubles
  the UNet batch); fp16 + SDPA (``facegen.generators.text_to_image``), then the same with
  ``torch.compile`` of the UNet;
* LCM 4-step: the same UNet with the LCM scheduler, 4 steps, guidance 1.0 (an LCM-LoRA fused into
  the weights costs nothing extra at sampling time);
* Arc2Face: the SD 1.5-shaped UNet and a CLIP ViT-L/14 ID encoder in the release's folder layout on
  the SD 1.5 base folder, through ``facegen.generators.arc2face.Arc2FaceExpander`` (ID prompt with
  the feature in the "id" token), 25 DPM steps, guidance 3.0;
* Vec2Face base (``facegen.models.vec2face``): one forward pass per image, 112 px.

Needs torch with CUDA, numpy, diffusers, transformers (+ tokenizers, safetensors,
huggingface_hub); not Ray, pydantic or pyarrow. Prints images/s per GPU for each row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_rate  # noqa: E402

_MERGES = [("i", "d</w>"), ("p", "h"), ("o", "t"), ("e", "r"), ("o", "n")]


def write_tokenizer(directory: str) -> None:
    """A byte-level BPE ``vocab.json`` + ``merges.txt`` in which "id" is one token (SD 1.5's is too)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(p) for p in _MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/vocab.json", "w") as f:
        json.dump({t: i for i, t in enumerate(dict.fromkeys(tokens))}, f)
    with open(f"{directory}/merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))


#: Published shapes (SD 1.5 / CLIP ViT-L/14) and a tiny variant for a CPU smoke run (--tiny).
SHAPES = {
    "sd15": dict(unet=(320, 640, 1280, 1280), width=768, layers=12, heads=12, mlp=3072, vae=(128, 256, 512, 512)),
    "tiny": dict(unet=(32, 32, 64, 64), width=512, layers=1, heads=4, mlp=64, vae=(32, 32, 32, 32)),
}


def clip_config(tokenizer, shape: dict):
    """CLIP's text tower (SD 1.5's text encoder and Arc2Face's ID encoder are ViT-L/14's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=shape["width"], intermediate_size=shape["mlp"],
                          num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                          max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_sd15_folders(root: str, shape: dict) -> dict[str, str]:
    """SD 1.5-shaped base folder and Arc2Face-layout folders under ``root`` (random fp16 weights)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    write_tokenizer(f"{root}/tok")
    tokenizer = CLIPTokenizer.from_pretrained(f"{root}/tok", model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=shape["unet"], cross_attention_dim=shape["width"],
                                attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=shape["vae"], layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    encoder = CLIPTextModel(clip_config(tokenizer, shape))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(f"{root}/sd15")
    unet.to(torch.float16).save_pretrained(f"{root}/arc2face_models/arc2face")
    CLIPTextModel(clip_config(tokenizer, shape)).to(torch.float16).save_pretrained(f"{root}/arc2face_models/encoder")
    return {"base": f"{root}/sd15", "models": f"{root}/arc2face_models"}


def timed(fn, images: int, repeat: int, device: str) -> float:
    """images/s of ``fn`` (one warm-up call, then the best of ``repeat``)."""
    return best_rate(fn, images, repeat, cuda=device == "cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, help="denoising steps (default 25; 2 with --tiny)")
    parser.add_argument("--size", type=int, help="image side in px (default 512; 64 with --tiny)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (max-autotune takes minutes)")
    parser.add_argument("--skip-vec2face", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of this script on CPU")
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.tiny else 25)
    args.size = args.size or (64 if args.tiny else 512)

    import torch
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    from facegen.generators.text_to_image import load_text_to_image, quiet_hf, render_text

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    import diffusers

    print(f"facegen GPU diffusion benchmark on {where}: torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"batch {args.batch}, {args.size} px")
    rows: list[tuple[str, float]] = []
    b = args.batch
    prompts = ["a close-up portrait photo of a 30-year-old woman, face exposed and clearly visible"] * b
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        with quiet_hf():
            folders = build_sd15_folders(root, SHAPES["tiny" if args.tiny else "sd15"])
        print(f"built and saved {'tiny' if args.tiny else 'SD 1.5'}-shaped random models in {time.perf_counter() - t0:.0f} s")
        sd = SimpleNamespace(model=folders["base"], local_files_only=True, fp16=True, half_dtype="float16",
                             lcm_lora=None, compile_unet=False, num_inference_steps=args.steps, guidance_scale=7.5,
                             height=args.size, width=args.size, negative_prompt="low quality, blurry, watermark")
        pipe = load_text_to_image(sd, args.device, "bench.sd15")
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        run = lambda settings: render_text(pipe, settings, prompts, list(range(b)))  # noqa: E731
        rows.append((f"SD 1.5 {args.size}px {args.steps} steps fp16+SDPA (CFG 7.5)", timed(lambda: run(sd), b, args.repeat, args.device)))
        lcm = SimpleNamespace(**{**vars(sd), "num_inference_steps": 4, "guidance_scale": 1.0})
        dpm = pipe.scheduler
        pipe.scheduler = LCMScheduler.from_config(dpm.config)
        rows.append((f"SD 1.5 {args.size}px LCM 4 steps fp16+SDPA (guidance 1)", timed(lambda: run(lcm), b, args.repeat, args.device)))
        pipe.scheduler = dpm
        if not args.skip_compile and args.device == "cuda":
            t0 = time.perf_counter()
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
            run(sd)
            print(f"torch.compile warm-up {time.perf_counter() - t0:.0f} s")
            rows.append((f"SD 1.5 {args.size}px {args.steps} steps fp16+SDPA+compile ({args.compile_mode})",
                         timed(lambda: run(sd), b, args.repeat, args.device)))
        del pipe
        torch.cuda.empty_cache() if args.device == "cuda" else None

        from facegen.generators.arc2face import Arc2FaceExpander

        a2f = SimpleNamespace(unet=folders["models"], unet_subfolder="arc2face", encoder=folders["models"],
                              encoder_subfolder="encoder", base_model=folders["base"], id_prompt="photo of a id person",
                              id_token="id", scheduler="dpm_multistep", num_inference_steps=args.steps, guidance_scale=3.0,
                              height=args.size, width=args.size, fp16=True, half_dtype="float16", lcm_lora=None,
                              compile_unet=False, local_files_only=True, variation_phrases=False)
        expander = Arc2FaceExpander(a2f, args.device)
        features = np.random.default_rng(0).standard_normal((b, 512)).astype(np.float32)
        rows.append((f"Arc2Face {args.size}px {args.steps} DPM steps fp16+SDPA (guidance 3)",
                     timed(lambda: expander.render(features, list(range(b))), b, args.repeat, args.device)))
        del expander
    if not args.skip_vec2face:
        from facegen.models.vec2face import Vec2Face, draw_token_masks, vec2face_vit_base_patch16

        tiny = dict(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                    decoder_ch=32)
        model = (Vec2Face(**tiny) if args.tiny else vec2face_vit_base_patch16()).eval().to(args.device)
        n = 64 if not args.tiny else 4
        masks = [draw_token_masks(np.random.default_rng(i), model.num_dropped) for i in range(n)]
        noise = torch.tensor(np.stack([m[0] for m in masks]), device=args.device)
        counts = torch.tensor([m[1] for m in masks], device=args.device)
        feats = torch.randn(n, 512, device=args.device) * 25

        @torch.inference_mode()
        def vec2face():
            z = model.latent_map(feats, noise, counts)
            with torch.autocast("cuda", dtype=torch.float16, enabled=args.device == "cuda"):
                return model.im_decoder(z)

        rows.append(("Vec2Face base 112px (transformer fp32, decoder fp16), batch 64", timed(vec2face, n, args.repeat, args.device)))
    width = max(len(name) for name, _ in rows)
    print(f"{'backend':<{width}}  images/s per {'GPU' if args.device == 'cuda' else 'CPU process'}")
    for name, rate in rows:
        print(f"{name:<{width}}  {rate:8.2f}")


if __name__ == "__main__":
    main()
