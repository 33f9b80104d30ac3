"""Vision-language expert (HybridGen, ALGORITHMS.md 1.3): which faces of a grid are not the majority person?

Per identity, its usable faces (first ``max_images`` in sample order) are tiled into one grid image
with a 3-digit number under each face and sent to an OpenAI-compatible chat-completions endpoint
(GPT-4o, or a local vLLM server) at temperature 0. The answer must be the outlier numbers separated
by commas, or ``NONE``; anything else is recorded as unparsable and the expert abstains for that
identity: it is never guessed. Requests run ``concurrency`` at a time, no faster than
``requests_per_minute``, and are retried with exponential backoff (honouring ``Retry-After``).
Every answer is cached under a key made of the model, the prompt, the identity and its images'
hashes, one small JSON file per key written atomically, so a killed run resumes without asking again.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal

import cv2
import numpy as np
from pydantic import Field

from facegen import storage
from facegen.clean.view import BlockView
from facegen.clean.votes import DROP, KEEP, ExpertVotes
from facegen.config.clean import ExpertSettings
from facegen.images import encode_image


class VlmSettings(ExpertSettings):
    """Vision-language verifier on an OpenAI-compatible chat-completions endpoint (GPT-4o, vLLM)."""

    kind: Literal["vlm"] = "vlm"
    base_url: str | None = Field(default=None, description="e.g. http://host:8000/v1; env FACEGEN_VLM_BASE_URL")
    model: str = "gpt-4o"
    api_key_env: str = Field(default="OPENAI_API_KEY", description="environment variable holding the key")
    max_images: int = Field(default=64, ge=2, description="faces per grid; later ones are not judged")
    thumbnail: int = Field(default=96, ge=32, le=224, description="pixels per face in the grid")
    timeout_s: float = Field(default=120.0, gt=0.0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=1.0, ge=0.0, description="first retry delay, doubled each attempt")
    backoff_max_s: float = Field(default=30.0, ge=0.0)
    concurrency: int = Field(default=4, ge=1, description="requests in flight per cleaning actor")
    requests_per_minute: float = Field(default=60.0, gt=0.0, description="per cleaning actor")
    cache_dir: str | None = Field(default=None, description="default <run.output_dir>/clean_vlm_cache")


SETTINGS = VlmSettings

PROMPT_VERSION = 1
PROMPT = (
    "The image is a grid of {count} face photos, each with a 3-digit number printed below it. "
    "Most of them show the same person. Which numbers show a different person than the majority? "
    "Answer only with those numbers separated by commas (for example: 004, 017), or NONE if every "
    "face shows the same person."
)
LABEL_HEIGHT = 22  # pixels under each face for its number
_NUMBER = re.compile(r"^\d{3}$")


def render_grid(images: list[np.ndarray], thumbnail: int) -> np.ndarray:
    """RGB uint8 grid: faces resized to ``thumbnail`` px, row-major, number ``k:03d`` under face k."""
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    cell_h = thumbnail + LABEL_HEIGHT
    grid = np.full((rows * cell_h, columns * thumbnail, 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        y, x = r * cell_h, c * thumbnail
        grid[y : y + thumbnail, x : x + thumbnail] = cv2.resize(img, (thumbnail, thumbnail), interpolation=cv2.INTER_AREA)
        cv2.putText(grid, f"{k:03d}", (x + thumbnail // 2 - 20, y + thumbnail + 17), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 2, cv2.LINE_AA)
    return grid


def parse_answer(text: str | None, count: int) -> list[int] | None:
    """The outlier numbers of an answer, ``[]`` for NONE, or None when the answer is not in the asked form."""
    if text is None:
        return None
    cleaned = text.strip().strip(".").strip()
    if cleaned.upper() == "NONE":
        return []
    tokens = [t for t in re.split(r"[,\s]+", cleaned) if t]
    if not tokens or not all(_NUMBER.match(t) for t in tokens):
        return None
    numbers = sorted({int(t) for t in tokens})
    return numbers if numbers[-1] < count else None


class RateLimiter:
    """Request starts spaced at least ``60 / per_minute`` seconds apart, across threads."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute
        self.lock = threading.Lock()
        self.next_start = 0.0

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


def cache_key(model: str, identity: int, image_bytes: list[bytes]) -> str:
    """Changes with the model, the prompt, the identity or any of its images."""
    h = hashlib.sha256(f"{model}\0{PROMPT_VERSION}\0{PROMPT}\0{identity}".encode())
    for data in image_bytes:
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class VlmExpert:
    """Asks the endpoint about whole identities; one cached answer per identity and image set."""

    def __init__(self, settings: VlmSettings, cache_dir: str):
        from openai import OpenAI

        base_url = settings.base_url or os.environ.get("FACEGEN_VLM_BASE_URL")
        if not base_url:
            raise ValueError(f"clean.experts ({settings.expert_name}): base_url: no endpoint (set it, or FACEGEN_VLM_BASE_URL)")
        self.settings, self.cache_dir = settings, cache_dir.rstrip("/")
        self.name = settings.expert_name
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(settings.api_key_env) or "EMPTY",
                             timeout=settings.timeout_s, max_retries=0)
        self.limiter = RateLimiter(settings.requests_per_minute)

    def _cache_path(self, key: str) -> str:
        return f"{self.cache_dir}/{key[:2]}/{key}.json"

    def _request(self, grid_png: bytes, count: int) -> str | None:
        import base64

        url = "data:image/png;base64," + base64.b64encode(grid_png).decode()
        response = self.client.chat.completions.create(
            model=self.settings.model, temperature=0,
            messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT.format(count=count)},
                                                    {"type": "image_url", "image_url": {"url": url}}]}],
        )
        return response.choices[0].message.content

    def ask(self, identity: int, images: list[np.ndarray], image_bytes: list[bytes]) -> dict[str, Any]:
        """The outcome for one identity: ``status`` answered / unparsable (both cached) or failed."""
        key = cache_key(self.settings.model, identity, image_bytes)
        path = self._cache_path(key)
        if storage.exists(path):
            return {**storage.read_json(path), "cached": True}
        grid = encode_image(render_grid(images, self.settings.thumbnail), "png")
        error = ""
        for attempt in range(self.settings.max_attempts):
            self.limiter.wait()
            try:
                answer = self._request(grid, len(images))
            except Exception as exc:  # network, HTTP status, malformed body: all retried
                error = f"{type(exc).__name__}: {exc}"[:300]
                if attempt + 1 < self.settings.max_attempts:
                    delay = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
                    time.sleep(max(delay, _retry_after(exc) or 0.0))
                continue
            outliers = parse_answer(answer, len(images))
            record = {"identity_id": identity, "model": self.settings.model, "answer": answer, "outliers": outliers,
                      "status": "answered" if outliers is not None else "unparsable", "attempts": attempt + 1}
            storage.write_json_atomic(record, path)
            return {**record, "cached": False}
        return {"identity_id": identity, "status": "failed", "error": error, "attempts": self.settings.max_attempts, "cached": False}

    def vote(self, view: BlockView, identities: list[int]) -> ExpertVotes:
        """Votes on the first ``max_images`` usable rows of each of ``identities``."""
        votes = ExpertVotes.abstaining(self.name, view.num_rows)
        jobs = []
        for ident in identities:
            rows = view.groups[ident][: self.settings.max_images]
            decoded = [(r, view.image(r)) for r in rows]
            decoded = [(r, img) for r, img in decoded if img is not None]
            if len(decoded) >= 2:
                jobs.append((ident, np.array([r for r, _ in decoded]), [img for _, img in decoded]))
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            outcomes = list(pool.map(lambda job: self.ask(job[0], job[2], [view.image_bytes(r) for r in job[1]]), jobs))
        counts = {"answered": 0, "unparsable": 0, "failed": 0, "cached": 0}
        for (ident, rows, _), outcome in zip(jobs, outcomes):
            counts[outcome["status"]] += 1
            counts["cached"] += bool(outcome.get("cached"))
            if outcome["status"] != "answered":
                what = outcome.get("answer") if outcome["status"] == "unparsable" else outcome.get("error")
                votes.set(rows, votes.vote[rows], 0.0, f"vlm: {outcome['status']}: {str(what)[:120]}")
                continue
            out = np.zeros(len(rows), dtype=bool)
            out[outcome["outliers"]] = True
            votes.set(rows[out], DROP, 0.9, [f"vlm: {k:03d} is not the majority person" for k in np.flatnonzero(out)])
            votes.set(rows[~out], KEEP, 0.9, "vlm: the majority person")
        votes.info = {"asked": len(jobs), **counts}
        return votes


def build(settings: VlmSettings, stage_dir: Callable[[str], str], **context: object) -> VlmExpert:
    """The expert of ``settings``; answers are cached in ``cache_dir`` or the run's ``clean_vlm_cache``."""
    return VlmExpert(settings, settings.cache_dir or stage_dir("clean_vlm_cache"))
