"""HybridGen's identity-preserving re-render of a reference (``generator.hybrid.rerender``).

HybridGen (``Ferry-Li/datacv_fr``, ``generate_id.py``) does not expand its SDXL reference itself:
it re-renders it once with InstantID (``instantX-research/InstantID``) and expands the re-render.
InstantID is SDXL with two conditions on the reference face:

* **IdentityNet**, a ControlNet on an image of the face's five keypoints (:func:`draw_keypoints`:
  four limbs from the eyes and mouth corners to the nose, dimmed to 60 %, and a filled circle per
  point); its cross-attention sees the face tokens, not the prompt;
* an **image-prompt adapter** on the face embedding: a Resampler turns the (raw, unnormalised)
  embedding into 16 tokens that extra key/value projections of every UNet cross-attention read.

The adapter file (``ip-adapter.bin``: ``image_proj`` + ``ip_adapter``) is read weights-only and
loaded through diffusers' own IP-Adapter loader (``UNet2DConditionModel._load_ip_adapter_weights``:
the Resampler becomes ``IPAdapterPlusImageProjection``), so the pipeline is diffusers'
``StableDiffusionXLControlNetPipeline`` with ``ip_adapter_image_embeds``; a forward pre-hook gives
the ControlNet the face tokens where diffusers would give it the prompt.

Per re-render (:func:`draw_rerender`, seeded from run seed, identity, reference attempt and
re-render attempt): the keypoint image resized by U(``kps_scale``) and pasted at a random offset on
a ``kps_pad_value`` canvas (HybridGen's ``random_transform_face_kps``), the ControlNet scale, the
IP-Adapter scale, one phrase per prompt slot by the tables' weights, and the diffusion noise. Each
re-render is its own pipeline call: diffusers applies one IP-Adapter scale to a whole call.
"""

from __future__ import annotations

import contextlib
import os
import string
import types
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from facegen.generators.references import Candidate, Reference, accept_candidate

FIELD = "generator.hybrid.rerender"
#: Domain tag of re-render seeds (distinct from reference and expansion seeds).
RERENDER_TAG = 0x1D2E
#: InstantID's keypoint colours (eyes, nose, mouth corners), limbs (to the nose), stick and dot sizes.
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICK, KPS_RADIUS = 4, 10


class RerenderRejected(ValueError):
    """No re-render of a reference was accepted; the message lists every attempt's reason."""


@dataclass(frozen=True)
class RerenderDraw:
    """The randomisation of one re-render, recorded in the row's meta."""

    attempt: int
    seed: int
    kps_scale: float
    kps_offset: tuple[int, int]
    controlnet_scale: float
    ip_adapter_scale: float
    phrases: dict[str, str]
    prompt: str

    def describe(self) -> dict[str, Any]:
        """The draw as plain JSON data (``meta.reference.rerender``)."""
        out = asdict(self)
        out["kps_offset"] = list(self.kps_offset)
        for name in ("kps_scale", "controlnet_scale", "ip_adapter_scale"):
            out[name] = round(out[name], 6)
        return out


def rerender_seed(seed: int, identity_id: int, reference_attempt: int, attempt: int) -> int:
    """The 63-bit seed of re-render ``attempt`` of reference attempt ``reference_attempt``."""
    state = np.random.SeedSequence([int(seed), int(identity_id), int(reference_attempt), int(attempt), RERENDER_TAG])
    high, low = (int(v) for v in state.generate_state(2, np.uint32))
    return ((high & 0x7FFFFFFF) << 32) | low


def prompt_slots(template: str) -> list[str]:
    """The ``{slot}`` names of a prompt template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def draw_rerender(settings: Any, seed: int, identity_id: int, reference_attempt: int, attempt: int) -> RerenderDraw:
    """The randomisation of one re-render (``settings``: :class:`facegen.config.RerenderSettings`)."""
    s = settings
    sample = rerender_seed(seed, identity_id, reference_attempt, attempt)
    rng = np.random.default_rng(sample)
    scale = float(rng.uniform(*s.kps_scale))
    pad_w = max(s.width - int(s.width * scale), 0)
    pad_h = max(s.height - int(s.height * scale), 0)
    offset = (int(rng.integers(0, pad_w + 1)), int(rng.integers(0, pad_h + 1)))
    controlnet_scale = float(rng.uniform(*s.controlnet_scale))
    ip_scale = float(rng.uniform(*s.ip_adapter_scale))
    phrases = {}
    for slot in prompt_slots(s.prompt_template):
        table = s.phrases[slot]
        phrases[slot] = table.phrases[int(rng.choice(len(table.phrases), p=table.probabilities()))]
    return RerenderDraw(attempt, sample, scale, offset, controlnet_scale, ip_scale, phrases,
                        s.prompt_template.format(**phrases))


def draw_keypoints(width: int, height: int, landmarks: np.ndarray) -> np.ndarray:
    """InstantID's keypoint condition: limbs and points of 5 landmarks on black, uint8 RGB."""
    import cv2

    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    canvas = np.zeros((height, width, 3), np.float64)
    for a, b in KPS_LIMBS:
        (xa, ya), (xb, yb) = points[a], points[b]
        length = float(np.hypot(xa - xb, ya - yb))
        angle = int(np.degrees(np.arctan2(ya - yb, xa - xb)))
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), KPS_STICK), angle, 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLOURS[a])
    canvas = (canvas * 0.6).astype(np.uint8)  # limbs dimmer than the points drawn over them
    for (x, y), colour in zip(points, KPS_COLOURS):
        cv2.circle(canvas, (int(x), int(y)), KPS_RADIUS, colour, -1)
    return canvas


def keypoint_condition(landmarks: np.ndarray, draw: RerenderDraw, width: int, height: int, pad_value: int) -> Image.Image:
    """The keypoint image at the re-render's size, resized by ``draw.kps_scale`` and pasted at
    ``draw.kps_offset`` on a ``pad_value`` canvas (cropped at the right and bottom when enlarged)."""
    image = Image.fromarray(draw_keypoints(width, height, landmarks))
    image = image.resize((int(width * draw.kps_scale), int(height * draw.kps_scale)), Image.BILINEAR)
    canvas = Image.new("RGB", (width, height), (pad_value,) * 3)
    canvas.paste(image, draw.kps_offset)
    return canvas


def read_ip_adapter(path: str, field: str = f"{FIELD}.ip_adapter") -> dict[str, dict[str, Any]]:
    """InstantID's adapter as ``{"image_proj": ..., "ip_adapter": ...}``, read without unpickling
    code: a ``.safetensors`` file with ``image_proj.*`` / ``ip_adapter.*`` keys, or a torch file
    loaded with ``weights_only=True`` (tensors in nested dicts only)."""
    import torch

    if not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"{field}: {path}: no such file")
    local = os.path.expanduser(path)
    try:
        if local.endswith(".safetensors"):
            from safetensors.torch import load_file

            flat = load_file(local)
            state: Any = {}
            for key, value in flat.items():
                part, _, name = key.partition(".")
                state.setdefault(part, {})[name] = value
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise ValueError(f"{field}: {path}: not a weights-only adapter file ({type(exc).__name__}: {message})") from None
    parts = state if isinstance(state, dict) else {}
    if not all(isinstance(parts.get(k), dict) for k in ("image_proj", "ip_adapter")) or "latents" not in parts["image_proj"]:
        raise ValueError(f"{field}: {path}: not InstantID's adapter layout (image_proj with a Resampler's latents, ip_adapter)")
    return {"image_proj": parts["image_proj"], "ip_adapter": parts["ip_adapter"]}


def load_instantid(settings: Any, device: str, default_model: str) -> Any:
    """diffusers' SDXL ControlNet pipeline with IdentityNet, the face adapter and the LCM-LoRA."""
    import diffusers

    from facegen.generators.text_to_image import finish_pipeline, load_error, quiet_hf, resolve_model

    model_field = f"{FIELD}.model" if settings.model else "generator.hybrid.reference.text_to_image.model"
    model_name = settings.model or default_model
    model = resolve_model(model_name, model_field)
    controlnet_path = resolve_model(settings.controlnet or "", f"{FIELD}.controlnet")
    adapter = read_ip_adapter(settings.ip_adapter or "")
    local = settings.local_files_only
    with quiet_hf():
        try:
            controlnet = diffusers.ControlNetModel.from_pretrained(controlnet_path, local_files_only=local)
        except Exception as exc:
            raise load_error(f"{FIELD}.controlnet", settings.controlnet, "an IdentityNet ControlNetModel", exc) from None
        try:
            pipeline = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
                model, controlnet=controlnet, local_files_only=local)
        except Exception as exc:
            raise load_error(model_field, model_name, "an SDXL pipeline", exc) from None
        finish = types.SimpleNamespace(fp16=settings.fp16, half_dtype=settings.half_dtype, lcm_lora=settings.lcm_lora,
                                       local_files_only=local, compile_unet=False)
        pipeline = finish_pipeline(pipeline, finish, device, FIELD)  # SDPA first: the adapter keeps self-attention's
        try:
            pipeline.unet._load_ip_adapter_weights([adapter], low_cpu_mem_usage=False)
        except Exception as exc:
            raise load_error(f"{FIELD}.ip_adapter", settings.ip_adapter, "InstantID's adapter into the UNet", exc) from None
    return pipeline


@contextlib.contextmanager
def identitynet_sees_face(pipeline: Any, image_embeds: Any):
    """InstantID's IdentityNet attends to the face tokens (the adapter's Resampler output), not to
    the prompt diffusers' ControlNet pipeline would give it."""
    import torch

    with torch.no_grad():
        tokens = pipeline.unet.encoder_hid_proj([image_embeds])[0].flatten(1, 2)

    def swap(module, args, kwargs):
        return args, {**kwargs, "encoder_hidden_states": tokens.to(kwargs["encoder_hidden_states"].dtype)}

    handle = pipeline.controlnet.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Rerenderer:
    """Loads the InstantID pipeline once; re-renders accepted references of one run."""

    def __init__(self, settings: Any, seed: int, device: str, default_model: str):
        self.settings, self.seed, self.device = settings, int(seed), device
        self.pipeline = load_instantid(settings, device, default_model)
        projection = self.pipeline.unet.encoder_hid_proj.image_projection_layers[0]
        self.embedding_dim = int(projection.proj_in.in_features)
        self.condition_embedder = None
        if settings.embedder is not None:
            from facegen.faces.embed import build_embedder

            self.condition_embedder = build_embedder(settings.embedder)

    def condition(self, reference: Reference) -> np.ndarray:
        """The face embedding the adapter conditions on: raw (unnormalised), as InstantID's."""
        from facegen.faces.align import align_face

        if self.condition_embedder is None:
            raw = reference.feature.astype(np.float64) * reference.norm
        else:
            crop = align_face(reference.candidate.image, reference.landmarks)
            raw = np.asarray(self.condition_embedder.embed_raw(crop[None])[0], np.float64)
        if raw.shape != (self.embedding_dim,):
            where = f"{FIELD}.embedder" if self.condition_embedder is not None else "generator.hybrid.embedder"
            raise ValueError(f"{where}: gives {raw.shape[-1]}-d face embeddings; the adapter "
                             f"({self.settings.ip_adapter}) takes {self.embedding_dim}-d")
        return raw

    def render(self, reference: Reference, embedding: np.ndarray, attempt: int) -> tuple[np.ndarray, RerenderDraw]:
        """Re-render ``attempt`` of ``reference``: the uint8 RGB image and its randomisation."""
        import torch

        from facegen.generators.text_to_image import quiet_hf, to_uint8

        s, pipe = self.settings, self.pipeline
        draw = draw_rerender(s, self.seed, reference.identity_id, reference.candidate.attempt, attempt)
        h0, w0 = reference.candidate.image.shape[:2]
        points = np.asarray(reference.landmarks, np.float64).reshape(5, 2) * [s.width / w0, s.height / h0]
        control = keypoint_condition(points, draw, s.width, s.height, s.kps_pad_value)
        embeds = torch.as_tensor(embedding, dtype=pipe.unet.dtype, device=pipe.unet.device).reshape(1, 1, 1, -1)
        if s.guidance_scale > 1.0:  # the unconditional half gets a zero face, as InstantID's
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        pipe.set_ip_adapter_scale(draw.ip_adapter_scale)
        with quiet_hf(), identitynet_sees_face(pipe, embeds):
            result = pipe(prompt=draw.prompt, negative_prompt=s.negative_prompt, image=control,
                          ip_adapter_image_embeds=[embeds], controlnet_conditioning_scale=draw.controlnet_scale,
                          num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                          height=s.height, width=s.width, output_type="pil",
                          generator=torch.Generator("cpu").manual_seed(draw.seed))
        return to_uint8(result.images, s.width, s.height)[0], draw

    def accept(self, reference: Reference, detect_batch: Callable, choose: Callable, embed: Callable) -> Reference:
        """The first re-render of ``reference`` the detector accepts, as the identity's reference:
        its image, face, landmarks and identity feature, with the randomisation and the original
        reference's face in ``meta``. Raises :class:`RerenderRejected` with every reason."""
        embedding = self.condition(reference)
        original = {"face_score": round(reference.score, 4), "norm": round(reference.norm, 4),
                    "landmarks": [round(float(v), 2) for v in np.asarray(reference.landmarks).reshape(-1)]}
        reasons = []
        for attempt in range(self.settings.max_attempts):
            try:
                image, draw = self.render(reference, embedding, attempt)
            except Exception as exc:  # rejected; the next attempt still runs
                reasons.append(f"re-render {attempt}: {type(exc).__name__}: {exc}")
                continue
            meta = {**reference.candidate.meta, "rerender": draw.describe(), "original": original}
            candidate = Candidate(reference.candidate.attempt, reference.candidate.seed, image, meta)
            try:
                return accept_candidate(reference.identity_id, candidate, detect_batch([image])[0], choose, embed)
            except ValueError as exc:
                reasons.append(f"re-render {attempt}: {exc}")
        raise RerenderRejected("; ".join(reasons))
