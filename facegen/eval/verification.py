"""Face verification on insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...), 10-fold accuracy.

Compatible with insightface ``recognition/arcface_torch/eval/verification.py``:

* a ``.bin`` file is a pickle of ``(bins, issame_list)``: ``2N`` encoded images in pair order and
  ``N`` booleans. The pickle is untrusted input, so it is read by :class:`RestrictedUnpickler`,
  which builds nothing but bytes, strings, numbers, booleans, None, lists and tuples.
* embeddings are ``normalise(f(x) + f(flip(x)))``; the distance is the squared L2 distance of the
  normalised pair; thresholds ``0, 0.01, .., 3.99``; K folds without shuffling; on each fold the
  threshold with the best accuracy on the other folds scores the held-out fold.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from sklearn.model_selection import KFold
from torch import nn

from facegen.faces.embed import Embedder, embed_with_model
from facegen.images import decode_image, encode_image
from facegen.schema import ALIGNED_SIZE
from facegen.storage import os_error_line, read_bytes, write_bytes_atomic
from facegen.vectors import l2_normalize

THRESHOLDS = np.arange(0, 4, 0.01)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 are REDUCE(_codecs.encode, (str, "latin1")).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    # ... and an empty bytes object is REDUCE(bytes, ()).
    if args:
        raise pickle.UnpicklingError("bytes() is only allowed without arguments")
    return b""


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global lookup is refused, except the two spellings of
    ``bytes`` in protocol-2 pickles (``_codecs.encode(str, "latin1")`` and ``bytes()``), replaced
    by functions that can build nothing but bytes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler`; Python 2 strings become bytes."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _parse_bin(obj: Any, path: str) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: bins and issame_list must be lists")
    if not all(isinstance(v, (bool, int)) and v in (0, 1) for v in issame):
        raise ValueError(f"{path}: issame_list must hold booleans")
    if len(bins) < 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (need {2 * len(issame)})")
    bins = list(bins[: 2 * len(issame)])
    for idx, item in enumerate(bins):
        if not isinstance(item, (bytes, bytearray)):
            raise ValueError(f"{path}: image {idx} is {type(item).__name__}, expected encoded bytes")
    return bins, np.asarray(issame, dtype=bool)


def load_bin(path: str, image_size: int = ALIGNED_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.bin`` set: uint8 RGB images ``[2N, S, S, 3]`` (resized when not S x S) and bool ``[N]``."""
    path = str(path)
    if "://" not in path and os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a .bin file")
    data = read_bytes(path)
    try:
        obj = restricted_loads(data)
    except Exception as exc:  # any failure of an untrusted pickle means "not a .bin set"
        raise ValueError(f"{path}: not a plain-data .bin pickle ({_first_line(exc)})") from None
    bins, issame = _parse_bin(obj, path)
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    for idx, data in enumerate(bins):
        try:
            img = decode_image(bytes(data))
        except ValueError as exc:
            raise ValueError(f"{path}: image {idx}: {exc}") from None
        if img.shape[:2] != (image_size, image_size):
            img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        images[idx] = img
    return images, issame


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def write_bin(path: str, images: np.ndarray | list[bytes], issame: Any, jpeg_quality: int = 95) -> None:
    """Write a ``.bin`` set (JPEG bytes, pickle protocol 4, atomic) from RGB uint8 images or encoded bytes."""
    issame_list = [bool(v) for v in np.asarray(issame, dtype=bool).reshape(-1)]
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{path}: images must be uint8 [2N, H, W, 3], got {images.dtype} {images.shape}")
        bins = [encode_image(img, "jpeg", jpeg_quality) for img in images]
    else:
        bins = [bytes(b) for b in images]
    if len(bins) != 2 * len(issame_list):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame_list)} pairs (need {2 * len(issame_list)})")
    write_bytes_atomic(pickle.dumps((bins, issame_list), protocol=4), path)


@dataclass(frozen=True)
class RocResult:
    """Per-fold accuracies and thresholds, and the ROC (mean over test folds) on ``thresholds``."""

    accuracy: np.ndarray
    best_thresholds: np.ndarray
    thresholds: np.ndarray
    tpr: np.ndarray
    fpr: np.ndarray

    @property
    def accuracy_mean(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def accuracy_std(self) -> float:
        return float(np.std(self.accuracy))


def _rates(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TPR, FPR and accuracy of ``dist < t`` for every threshold (insightface ``calculate_accuracy``)."""
    predict = dist[None, :] < thresholds[:, None]
    tp = np.sum(predict & issame, axis=1)
    fp = np.sum(predict & ~issame, axis=1)
    tn = np.sum(~predict & ~issame, axis=1)
    fn = np.sum(~predict & issame, axis=1)
    tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
    fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    return tpr, fpr, (tp + tn) / dist.size


def evaluate_full(embeddings: np.ndarray, issame: Any, nrof_folds: int = 10) -> RocResult:
    """10-fold verification exactly as insightface ``calculate_roc`` (pairs are rows 2i, 2i+1)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * len(issame):
        raise ValueError(f"embeddings: expected shape [{2 * len(issame)}, d] for {len(issame)} pairs, got {emb.shape}")
    if not 2 <= nrof_folds <= len(issame):
        raise ValueError(f"nrof_folds: must be in [2, {len(issame)}] (the number of pairs), got {nrof_folds}")
    emb = l2_normalize(emb)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
    accuracy = np.zeros(nrof_folds)
    best = np.zeros(nrof_folds)
    tprs = np.zeros((nrof_folds, len(THRESHOLDS)))
    fprs = np.zeros((nrof_folds, len(THRESHOLDS)))
    folds = KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame)))
    for k, (train, test) in enumerate(folds):
        _, _, acc_train = _rates(dist[train], issame[train], THRESHOLDS)
        best_idx = int(np.argmax(acc_train))  # first maximum, as insightface
        tprs[k], fprs[k], acc_test = _rates(dist[test], issame[test], THRESHOLDS)
        accuracy[k] = acc_test[best_idx]
        best[k] = THRESHOLDS[best_idx]
    return RocResult(accuracy, best, THRESHOLDS.copy(), tprs.mean(axis=0), fprs.mean(axis=0))


def evaluate(embeddings: np.ndarray, issame: Any, nrof_folds: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the per-fold verification accuracy."""
    roc = evaluate_full(embeddings, issame, nrof_folds)
    return roc.accuracy_mean, roc.accuracy_std


def embed_images(model: nn.Module, images_uint8: np.ndarray, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Flip-sum, L2-normalised embeddings of aligned uint8 RGB crops ``[n, 112, 112, 3]`` -> ``[n, d]``."""
    return embed_with_model(model, images_uint8, batch_size, device, flip=True)


@dataclass(frozen=True)
class VerificationResult:
    """One verification set's score: accuracy mean +- std over the folds; ``error`` (accuracy nan)
    when the set could not be read or scored."""

    name: str
    pairs: int
    accuracy_mean: float
    accuracy_std: float
    error: str = ""


def set_name(path: str) -> str:
    """``/data/lfw.bin`` -> ``lfw``."""
    base = os.path.basename(str(path).rstrip("/"))
    return base[: -len(".bin")] if base.endswith(".bin") else base


def embed_set(embedder_or_model: Embedder | nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Flip-summed unit embeddings of a verification set's aligned images, by a facegen embedder
    (any kind) or a bare torch backbone (left in the mode it was in)."""
    if isinstance(embedder_or_model, nn.Module):
        model = embedder_or_model
        was_training = model.training
        model.eval()
        try:
            embeddings = embed_with_model(model, images, batch_size, None, flip=True)
        finally:
            model.train(was_training)
    elif callable(getattr(embedder_or_model, "embed", None)):  # any facegen.faces.embed embedder
        embeddings = np.concatenate(
            [embedder_or_model.embed(images[s : s + batch_size], flip=True) for s in range(0, len(images), batch_size)]
        )
    else:
        raise TypeError(f"embed_set: expected an Embedder or torch.nn.Module, got {type(embedder_or_model).__name__}")
    return embeddings


def verify_bin(
    embedder_or_model: Embedder | nn.Module, path: str, batch_size: int = 64, nrof_folds: int = 10
) -> VerificationResult:
    """Load a ``.bin`` set, embed it (flip-sum) and score it with K-fold verification."""
    images, issame = load_bin(path)
    embeddings = embed_set(embedder_or_model, images, batch_size)
    if not 2 <= nrof_folds <= len(issame):
        raise ValueError(f"{path}: its {len(issame)} pairs cannot make {nrof_folds} folds (folds: 2 to {len(issame)})")
    mean, std = evaluate(embeddings, issame, nrof_folds)
    return VerificationResult(set_name(path), int(len(issame)), mean, std)


def verify_bins(
    embedder_or_model: Embedder | nn.Module, paths: list[str], batch_size: int = 64, nrof_folds: int = 10
) -> list[VerificationResult]:
    """:func:`verify_bin` for each path, in order; a set that cannot be read or scored comes back with
    its ``error`` (one line naming the file) and the others are still scored."""
    results = []
    for path in paths:
        try:
            results.append(verify_bin(embedder_or_model, path, batch_size, nrof_folds))
        except (OSError, ValueError) as exc:
            reason = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
            results.append(VerificationResult(set_name(path), 0, float("nan"), float("nan"), error=reason))
    return results
