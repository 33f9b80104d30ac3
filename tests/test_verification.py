""".bin verification sets: safe loading, round trips, and insightface-exact K-fold accuracy."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold

from facegen.eval.verification import (
    THRESHOLDS,
    embed_images,
    evaluate,
    evaluate_full,
    load_bin,
    verify_bin,
    verify_bins,
    write_bin,
)
from facegen.faces.embedders.iresnet import IResNetEmbedder as Embedder
from facegen.images import encode_image
from facegen.models.iresnet import build_backbone
from facegen.models.iresnet_checkpoint import save_backbone
from untrusted import RunsShell


def _distinct_images(n: int, seed: int = 0) -> np.ndarray:
    """Clearly different 112x112 images: random colour gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 112)
    out = np.empty((n, 112, 112, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = a + np.multiply.outer(ramp, b - a)[:, None, :] + np.multiply.outer(ramp, c - a)[None, :, :] / 2
        out[i] = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("payload", ["os.system", "numpy"])
def test_restricted_unpickler_refuses_objects_naming_the_file(tmp_path, payload):
    marker = tmp_path / "ran"
    payload = RunsShell(marker) if payload == "os.system" else np.zeros(3)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload], [True])))
    with pytest.raises(ValueError) as info:
        load_bin(str(path))
    message = str(info.value)
    assert str(path) in message and "refused" in message and "\n" not in message
    assert not marker.exists()


def test_python2_and_protocol2_pickles_load(tmp_path):
    png = encode_image(_distinct_images(1)[0], "png")
    # A Python 2 pickle: str is a byte string (SHORT_BINSTRING / BINSTRING), read back as bytes.
    py2 = b"\x80\x02((T" + len(png).to_bytes(4, "little") + png + b"U\x00l(\x88l" + b"t."
    (tmp_path / "py2.bin").write_bytes(py2)
    with pytest.raises(ValueError, match=r"py2\.bin: image 1: empty image bytes"):
        load_bin(str(tmp_path / "py2.bin"))
    (tmp_path / "p2.bin").write_bytes(pickle.dumps(([png, png], [True]), protocol=2))
    images, issame = load_bin(str(tmp_path / "p2.bin"))
    assert images.shape == (2, 112, 112, 3) and issame.tolist() == [True]


def test_python2_pickle_with_non_ascii_bytes_loads(tmp_path):
    png = encode_image(_distinct_images(1)[0], "png")  # PNG bytes are not ASCII
    blob = b"T" + len(png).to_bytes(4, "little") + png
    (tmp_path / "py2.bin").write_bytes(b"\x80\x02((" + blob + blob + b"l(\x89l" + b"t.")
    images, issame = load_bin(str(tmp_path / "py2.bin"))
    np.testing.assert_array_equal(images[0], _distinct_images(1)[0])
    assert issame.tolist() == [False]


def test_write_load_roundtrip_and_resize(tmp_path):
    images = _distinct_images(6)
    issame = [True, False, True]
    write_bin(str(tmp_path / "set.bin"), images, issame)
    loaded, same = load_bin(str(tmp_path / "set.bin"))
    assert loaded.shape == images.shape and loaded.dtype == np.uint8
    assert np.abs(loaded.astype(int) - images).mean() < 3  # JPEG
    assert same.dtype == bool and same.tolist() == issame

    pngs = [encode_image(img, "png") for img in images]
    write_bin(str(tmp_path / "png.bin"), pngs, issame)
    np.testing.assert_array_equal(load_bin(str(tmp_path / "png.bin"))[0], images)

    big = [encode_image(np.repeat(np.repeat(img, 2, 0), 2, 1), "png") for img in images]  # 224x224
    write_bin(str(tmp_path / "big.bin"), big, issame)
    resized = load_bin(str(tmp_path / "big.bin"))[0]
    assert resized.shape == (6, 112, 112, 3) and np.abs(resized.astype(int) - images).mean() < 4


def test_bad_files_fail_naming_file_and_index(tmp_path):
    good = encode_image(_distinct_images(1)[0], "jpeg")
    path = tmp_path / "broken.bin"
    path.write_bytes(pickle.dumps(([good, good, good, b"garbage"], [True, False])))
    with pytest.raises(ValueError, match=r"broken\.bin: image 3: .*cannot decode"):
        load_bin(str(path))
    path.write_bytes(pickle.dumps(([good], [True])))
    with pytest.raises(ValueError, match="1 images for 1 pairs"):
        load_bin(str(path))
    path.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match="broken.bin: expected a pickled"):
        load_bin(str(path))
    path.write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="broken.bin: not a plain-data"):
        load_bin(str(path))
    with pytest.raises(ValueError, match="need 4"):
        write_bin(str(tmp_path / "x.bin"), _distinct_images(3), [True, False])


def _insightface_roc(embeddings, issame, nrof_folds):
    """Direct transcription of the insightface loops (per threshold, per fold) for comparison."""
    emb = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    thresholds = np.arange(0, 4, 0.01)

    def accuracy(t, d, same):
        pred = d < t
        tp, fp = np.sum(pred & same), np.sum(pred & ~same)
        tn, fn = np.sum(~pred & ~same), np.sum(~pred & same)
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        fpr = 0 if fp + tn == 0 else fp / (fp + tn)
        return tpr, fpr, (tp + tn) / d.size

    accs, tprs, fprs, best = [], [], [], []
    for train, test in KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame))):
        train_acc = [accuracy(t, dist[train], issame[train])[2] for t in thresholds]
        b = int(np.argmax(train_acc))
        rates = [accuracy(t, dist[test], issame[test]) for t in thresholds]
        tprs.append([r[0] for r in rates])
        fprs.append([r[1] for r in rates])
        accs.append(accuracy(thresholds[b], dist[test], issame[test])[2])
        best.append(thresholds[b])
    return np.array(accs), np.array(best), np.mean(tprs, 0), np.mean(fprs, 0)


@pytest.mark.parametrize("nrof_folds", [10, 7])
def test_evaluate_matches_a_brute_force_insightface_loop(nrof_folds):
    rng = np.random.default_rng(3)
    n = 63  # not a multiple of the folds: uneven fold sizes as in sklearn
    issame = rng.random(n) < 0.5
    anchor = rng.normal(size=(n, 16))
    partner = np.where(issame[:, None], anchor + rng.normal(0, 0.9, (n, 16)), rng.normal(size=(n, 16)))
    embeddings = np.empty((2 * n, 16))
    embeddings[0::2], embeddings[1::2] = anchor, partner
    acc, best, tpr, fpr = _insightface_roc(embeddings, issame, nrof_folds)
    roc = evaluate_full(embeddings, issame.tolist(), nrof_folds)
    np.testing.assert_array_equal(roc.accuracy, acc)
    np.testing.assert_array_equal(roc.best_thresholds, best)
    np.testing.assert_allclose(roc.tpr, tpr)
    np.testing.assert_allclose(roc.fpr, fpr)
    assert 0.6 < roc.accuracy_mean < 1.0  # a case that is neither trivial nor random
    assert evaluate(embeddings, issame, nrof_folds) == (pytest.approx(acc.mean()), pytest.approx(acc.std()))
    assert len(THRESHOLDS) == 400


def test_evaluate_extremes():
    rng = np.random.default_rng(0)
    n = 200
    issame = np.arange(n) % 2 == 0
    base = rng.normal(size=(n, 32))
    separable = np.empty((2 * n, 32))
    separable[0::2] = base
    separable[1::2] = np.where(issame[:, None], base, -base)  # same: distance 0, different: distance 4
    assert evaluate(separable, issame) == (1.0, 0.0)
    random = rng.normal(size=(2 * n, 32))
    mean, std = evaluate(random, issame)
    assert 0.35 < mean < 0.65 and std > 0
    with pytest.raises(ValueError, match="nrof_folds"):
        evaluate(random[:8], issame[:4], nrof_folds=10)
    with pytest.raises(ValueError, match="embeddings"):
        evaluate(random[:7], issame[:4], nrof_folds=2)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("iresnet18", width=8, embedding_size=512)
    return save_backbone(str(tmp_path_factory.mktemp("ckpt") / "backbone"), model, "iresnet18", 8, 512)


def test_embed_images_is_the_flip_sum_of_the_model(tiny_checkpoint):
    embedder = Embedder(tiny_checkpoint, device="cpu", batch_size=3)
    images = _distinct_images(5)
    got = embed_images(embedder.model, images, batch_size=2)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = (embedder.model(x) + embedder.model(x.flip(3))).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(images, flip=True), got, atol=1e-6)
    no_flip = embedder.embed(images, flip=False)
    assert not np.allclose(no_flip, got) and np.allclose(np.linalg.norm(no_flip, axis=1), 1, atol=1e-5)
    assert embedder.embed(images[:0]).shape == (0, 512)


def test_verify_bin_with_embedder_and_model(tmp_path, tiny_checkpoint):
    n = 10
    issame = np.arange(n) % 2 == 0
    faces = _distinct_images(2 * n, seed=1)
    pairs = faces.copy()
    pairs[1::2][issame] = faces[0::2][issame]  # a "same" pair shows one image twice
    path = str(tmp_path / "toy.bin")
    write_bin(path, pairs, issame)
    embedder = Embedder(tiny_checkpoint, device="cpu")
    result = verify_bin(embedder, path, batch_size=8, nrof_folds=5)
    assert (result.name, result.pairs) == ("toy", n)
    assert result.accuracy_mean == 1.0 and result.accuracy_std == 0.0
    model = build_backbone("iresnet18", width=8).train()
    (other,) = verify_bins(model, [path], batch_size=16, nrof_folds=5)
    assert (other.name, other.pairs, other.accuracy_mean) == ("toy", n, 1.0)
    assert model.training  # the caller's mode is restored
