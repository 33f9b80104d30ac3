"""A tiny real curriculum shard set for training tests: every image carries its row id and hardness.

Each image is a class-coloured stripe pattern; pixel row 0 is white for hard rows, rows 1 and 2
carry the row's uid (two base-128 digits, times 2), so a test can read back which rows a batch holds.
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.images import encode_image
from facegen.schema import rows_to_batch, sample_schema, table_from_batch
from facegen.shards import split_block_into_buckets, write_manifest

FIRST_ID = 1000
ID_STRIDE = 7  # non-contiguous identity ids: labels must come from labels.parquet, not the ids
PALETTE = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40], [200, 40, 200], [40, 200, 200]])


def class_image(label: int, uid: int, hard: bool, rng: np.random.Generator) -> np.ndarray:
    """A coloured stripe pattern per class with the uid and hardness markers."""
    yy, xx = np.mgrid[0:112, 0:112]
    stripes = ((xx * (label % 3 + 1) + yy * (label // 3 % 4)) // 8) % 2
    colour = PALETTE[label % len(PALETTE)] * (0.5 + 0.5 * ((label // len(PALETTE)) % 2))
    img = colour[None, None, :] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 12, (112, 112, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    img[0] = 255 if hard else 0
    img[1] = (uid % 128) * 2
    img[2] = (uid // 128) * 2
    return img


def make_shard_set(root, per_class: int = 7, blocks: int = 2, ids_per_block: int = 3, corrupt: bool = False) -> dict[int, int]:
    """``blocks`` blocks of ``ids_per_block`` identities, two difficulty buckets; returns uid -> label."""
    rng = np.random.default_rng(0)
    edges = np.array([0.0, 0.5, 1.0])
    uid_label, records, uid = {}, [], 0
    for block in range(blocks):
        rows = []
        for label in range(ids_per_block * block, ids_per_block * (block + 1)):
            for i in range(per_class):
                difficulty = i / per_class
                image = encode_image(class_image(label, uid, difficulty >= 0.5, rng), "png")
                status = "error" if corrupt and uid == 3 else "ok"
                if corrupt and uid == 5:
                    image = b"not an image"
                rows.append({
                    "identity_id": FIRST_ID + ID_STRIDE * label, "block_id": block, "sample_idx": i, "seed": 0,
                    "source": "test", "image": image, "true_identity_id": FIRST_ID + ID_STRIDE * label,
                    "meta": "{}", "embedding": None, "quality": 1.0, "difficulty": difficulty,
                    "status": status, "reason": "", "origin": "generated",
                })
                uid_label[uid] = label
                uid += 1
        schema = sample_schema()
        table = table_from_batch(rows_to_batch(rows, schema), schema)
        records += split_block_into_buckets(table, block, edges, str(root))
    ids = FIRST_ID + ID_STRIDE * np.arange(blocks * ids_per_block)
    write_manifest(records, str(root), ids, edges, "test")
    return uid_label


def read_markers(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(uid, hard) per image of a batch, read back from the marker rows (no augmentation but flip)."""
    pixels = torch.round((images + 1) * 127.5)
    low = (pixels[:, 0, 1, :].mean(dim=1) / 2).round().long()
    high = (pixels[:, 0, 2, :].mean(dim=1) / 2).round().long()
    hard = (pixels[:, 0, 0, :].mean(dim=1) > 127).numpy()
    return (low + 128 * high).numpy(), hard


def write_pairs_bin(path, num_classes: int = 6, pairs: int = 20, seed: int = 5) -> None:
    """Pairs of the shard set's classes (half genuine), as an insightface .bin."""
    from facegen.eval.verification import write_bin

    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(pairs):
        a = int(rng.integers(num_classes))
        b = a if k % 2 == 0 else int((a + 1 + rng.integers(num_classes - 1)) % num_classes)
        images += [class_image(a, 0, False, rng), class_image(b, 0, False, rng)]
        issame.append(a == b)
    write_bin(str(path), np.stack(images), issame)
