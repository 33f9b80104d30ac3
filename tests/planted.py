"""Blocks with planted wrong-identity images, and a loopback chat-completions server that "sees" them.

Identity k's faces are a fixed random 16x16 colour pattern (upscaled to 112 px) plus pixel noise;
an injected wrong image is another identity's pattern. The primary embedding is a fixed random
projection of the pixels with extra noise (a deliberately imperfect embedder); the server judges a
grid by comparing each cell's pixels to the cells' median, which is how it tells the outliers.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from facegen.clean.vlm import LABEL_HEIGHT
from facegen.images import decode_image, encode_image
from facegen.schema import rows_to_batch, sample_schema, table_from_batch

SAMPLE = sample_schema(512)

SMALL = 16


def pattern(rng):
    return rng.normal(0.0, 50.0, (SMALL, SMALL, 3))


def render(base, rng, noise):
    thumb = np.clip(128.0 + base + rng.normal(0.0, noise, base.shape), 0, 255).astype(np.uint8)
    return cv2.resize(thumb, (112, 112), interpolation=cv2.INTER_NEAREST)


class ProjectionEmbedder:
    """16x16 thumbnail -> fixed random projection -> unit 512-d, plus ``noise`` in embedding space."""

    def __init__(self, seed=0, noise=0.0):
        self.matrix = np.random.default_rng(seed).standard_normal((SMALL * SMALL * 3, 512)).astype(np.float32)
        self.noise, self.rng = noise, np.random.default_rng(seed + 1)

    def __call__(self, images):
        thumbs = np.stack([cv2.resize(im, (SMALL, SMALL), interpolation=cv2.INTER_AREA) for im in images]).astype(np.float32)
        feats = (thumbs.reshape(len(images), -1) - 128.0) @ self.matrix
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        feats += self.noise * self.rng.standard_normal(feats.shape) / np.sqrt(512)
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def planted_block(num_identities, per_identity, wrong_rate, seed=0, embed_noise=0.0, pixel_noise=(10, 40), first_id=0):
    """A SAMPLE table; wrong images (at most a third of an identity) have ``true_identity_id`` >= 10000."""
    rng = np.random.default_rng(seed)
    embedder = ProjectionEmbedder(seed, embed_noise)
    bases = [pattern(rng) for _ in range(num_identities + 50)]
    rows = []
    for i in range(num_identities):
        ident = first_id + i
        wrong = rng.random(per_identity) < wrong_rate
        wrong[np.flatnonzero(wrong)[per_identity // 3 :]] = False  # the identity's own person stays a clear majority
        for k in range(per_identity):
            true = i
            if wrong[k]:
                true = int(rng.integers(num_identities, num_identities + 50))
            img = render(bases[true], rng, rng.uniform(*pixel_noise))
            data = encode_image(img, "png")
            rows.append({"identity_id": ident, "block_id": 0, "sample_idx": k, "seed": k, "source": "planted", "image": data,
                         "true_identity_id": ident if true == i else 10_000 + true, "meta": "{}",
                         "embedding": embedder(decode_image(data)[None])[0], "quality": np.float32(1.0),
                         "difficulty": np.float32(np.nan), "status": "ok", "reason": "", "origin": "generated"})
    return table_from_batch(rows_to_batch(rows, SAMPLE), SAMPLE)


def cells(grid, count, thumbnail):
    """The face cells of a grid image rendered by facegen.clean.vlm.render_grid, row-major."""
    columns = int(np.ceil(np.sqrt(count)))
    out = []
    for k in range(count):
        r, c = divmod(k, columns)
        y, x = r * (thumbnail + LABEL_HEIGHT), c * thumbnail
        out.append(grid[y : y + thumbnail, x : x + thumbnail])
    return out


def judge(grid, count, thumbnail, tolerance=2.2):
    """Numbers of the cells whose 16x16 pixels are far from the cells' median (the stand-in's vision)."""
    feats = np.stack([cv2.resize(c, (SMALL, SMALL), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() for c in cells(grid, count, thumbnail)])
    dist = np.linalg.norm(feats - np.median(feats, axis=0), axis=1)
    return [k for k in np.flatnonzero(dist > tolerance * np.median(dist))]


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 with scripted misbehaviour.

    ``script(n)`` for the n-th request (from 0) returns one of "ok", "500", "429", "malformed",
    "slow" (sleeps ``slow_s`` before answering). Grids of ``unparsable_count`` faces get prose.
    Records every request's start/end time, grid hash and the most requests ever in flight.
    """

    def __init__(self, thumbnail, script=lambda n: "ok", slow_s=1.0, unparsable_count=None):
        self.thumbnail, self.script, self.slow_s, self.unparsable_count = thumbnail, script, slow_s, unparsable_count
        self.lock = threading.Lock()
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h):
        start = time.monotonic()
        with self.lock:
            number = len(self.requests)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            record = {"start": start, "path": h.path}
            self.requests.append(record)
        try:
            body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
            text, image = body["messages"][0]["content"][0]["text"], body["messages"][0]["content"][1]["image_url"]["url"]
            png = base64.b64decode(image.split(",", 1)[1])
            record.update(grid=hash(png), temperature=body.get("temperature"), model=body.get("model"))
            action = self.script(number)
            if action == "slow":
                time.sleep(self.slow_s)
            if action in ("500", "429"):
                h.send_response(int(action))
                if action == "429":
                    h.send_header("Retry-After", "0.2")
                h.send_header("Content-Type", "application/json")
                h.end_headers()
                h.wfile.write(b'{"error": {"message": "try again"}}')
                return
            count = int(re.search(r"grid of (\d+) face", text).group(1))
            if count == self.unparsable_count:
                answer = "The person in the top left looks a bit different, maybe."
            else:
                outliers = judge(decode_image(png), count, self.thumbnail)
                answer = ", ".join(f"{k:03d}" for k in outliers) or "NONE"
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}]}
            data = b'{"id": "x", "choices": [' if action == "malformed" else json.dumps(payload).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): its retry comes later
            pass
        finally:
            with self.lock:
                self.in_flight -= 1
                record["end"] = time.monotonic()
