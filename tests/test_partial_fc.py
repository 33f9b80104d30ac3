"""Partial FC on 2 CPU workers (gloo) against the single-process full softmax.

At sample rate 1.0 the loss, the class-centre gradients, the embedding gradients and the gradients
of a DDP-wrapped backbone equal the full softmax over all classes. At lower rates every positive
class of the global batch is kept, each worker keeps its share of centres, and the loss equals the
full softmax restricted to the kept classes.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from facegen.train.heads import ArcFace, CombinedMargin, CosFace, MarginClassifier
from facegen.train.partial_fc import PartialFC, class_range, init_centres
from gloo_workers import spawn_gloo

WORLD = 2
ROWS_PER_WORKER = 6
DIM = 16
IN_FEATURES = 12


def _margins():
    return {"arcface": ArcFace(s=16.0, m=0.4), "cosface": CosFace(s=16.0, m=0.3),
            "combined": CombinedMargin(s=16.0, m1=1.0, m2=0.3, m3=0.1)}


def _problem(num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * ROWS_PER_WORKER, IN_FEATURES, generator=gen)
    labels = torch.randint(0, num_classes, (WORLD * ROWS_PER_WORKER,), generator=gen)
    labels[:2] = torch.tensor([0, num_classes - 1])  # both workers own a positive
    backbone = torch.nn.Linear(IN_FEATURES, DIM)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(DIM, IN_FEATURES, generator=gen) * 0.5)
        backbone.bias.copy_(torch.randn(DIM, generator=gen) * 0.1)
    centres = init_centres(num_classes, DIM, 0, num_classes, seed=3)
    return x, labels, backbone, centres


def _worker(rank: int, out_dir: str, num_classes: int, sample_rate: float) -> None:
    x, labels, backbone, _ = _problem(num_classes)
    rows = slice(rank * ROWS_PER_WORKER, (rank + 1) * ROWS_PER_WORKER)
    model = torch.nn.parallel.DistributedDataParallel(backbone)
    results = {}
    for name, margin in _margins().items():
        model.zero_grad()
        head = PartialFC(margin, DIM, num_classes, sample_rate=sample_rate, seed=3)
        embeddings = model(x[rows])
        embeddings.retain_grad()
        loss = head(embeddings, labels[rows], step=7)
        loss.backward()
        results[name] = {
            "loss": loss.detach(), "weight_grad": head.weight.grad.clone(), "embedding_grad": embeddings.grad.clone(),
            "backbone_grad": model.module.weight.grad.clone(), "class_start": head.class_start,
            "num_local": head.num_local, "index": None if head.last_index is None else head.last_index.clone(),
            "correct": int(head.last_correct), "weight": head.weight.detach().clone(),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, num_classes: int, sample_rate: float) -> list[dict]:
    spawn_gloo(_worker, str(tmp_path), num_classes, sample_rate, world_size=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _reference(num_classes: int, margin, columns: torch.Tensor | None = None):
    """Full softmax on one process over all classes (or over ``columns`` only)."""
    x, labels, backbone, centres = _problem(num_classes)
    keep = torch.arange(num_classes) if columns is None else columns
    head = MarginClassifier(DIM, len(keep), margin)
    with torch.no_grad():
        head.weight.copy_(centres[keep])
    embeddings = backbone(x)
    embeddings.retain_grad()
    target = torch.searchsorted(keep, labels)
    loss = head(embeddings, target)
    loss.backward()
    return loss.detach(), head.weight.grad, embeddings.grad, backbone.weight.grad, int(head.correct(target))


def test_class_ranges_and_init_do_not_depend_on_worker_count():
    assert [class_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    full = init_centres(70_000, 4, 0, 70_000, seed=1)
    parts = [init_centres(70_000, 4, *class_range(70_000, r, 3), seed=1) for r in range(3)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)
    assert float(full.std()) == pytest.approx(0.01, rel=0.05)


def test_rate_one_equals_full_softmax_loss_and_gradients(tmp_path):
    num_classes = 11
    ranks = _run(tmp_path, num_classes, sample_rate=1.0)
    for name, margin in _margins().items():
        loss, weight_grad, embedding_grad, backbone_grad, correct = _reference(num_classes, margin)
        for rank, result in enumerate(ranks):
            got = result[name]
            rows = slice(rank * ROWS_PER_WORKER, (rank + 1) * ROWS_PER_WORKER)
            classes = slice(got["class_start"], got["class_start"] + got["num_local"])
            assert got["index"] is None
            torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["weight_grad"], weight_grad[classes], rtol=1e-4, atol=1e-7)
            # The all-gather hands back world_size x the rows' gradient; DDP's average divides it out:
            torch.testing.assert_close(got["embedding_grad"], WORLD * embedding_grad[rows], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(got["backbone_grad"], backbone_grad, rtol=1e-4, atol=1e-7)
            assert got["correct"] == correct
    assert [r["arcface"]["num_local"] for r in ranks] == [6, 5]


def test_low_rate_keeps_every_positive_and_equals_softmax_over_kept_classes(tmp_path):
    num_classes, rate = 40, 0.25
    ranks = _run(tmp_path, num_classes, sample_rate=rate)
    _, labels, _, _ = _problem(num_classes)
    kept = []
    for result in ranks:
        got = result["arcface"]
        index = got["index"] + got["class_start"]
        owned = labels[(labels >= got["class_start"]) & (labels < got["class_start"] + got["num_local"])]
        assert set(owned.tolist()) <= set(index.tolist())  # every positive on this worker is kept
        assert len(index) == int(rate * got["num_local"]) == 5  # 20 centres per worker, a quarter kept
        assert len(set(index.tolist())) == len(index)
        kept.append(index)
        # Only kept centres receive a gradient.
        touched = torch.nonzero(got["weight_grad"].abs().sum(dim=1) > 0).flatten() + got["class_start"]
        assert set(touched.tolist()) <= set(index.tolist())
    columns = torch.cat(kept).sort().values
    assert len(columns) < num_classes
    for name, margin in _margins().items():
        loss, weight_grad, _, backbone_grad, _ = _reference(num_classes, margin, columns)
        for rank, result in enumerate(ranks):
            got = result[name]
            torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["backbone_grad"], backbone_grad, rtol=1e-4, atol=1e-7)
            mine = (columns >= got["class_start"]) & (columns < got["class_start"] + got["num_local"])
            local_rows = columns[mine] - got["class_start"]
            torch.testing.assert_close(got["weight_grad"][local_rows], weight_grad[mine], rtol=1e-4, atol=1e-7)


def test_single_process_sampling_is_seeded_by_step():
    torch.manual_seed(0)
    head = PartialFC(ArcFace(s=8.0, m=0.2), 8, 100, sample_rate=0.1, seed=5)
    labels = torch.tensor([3, 3, 50, 99])
    first, remapped = head.sample(head.local_labels(labels), step=4)
    again, _ = head.sample(head.local_labels(labels), step=4)
    other, _ = head.sample(head.local_labels(labels), step=5)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(first) == 10 and {3, 50, 99} <= set(first.tolist())
    assert torch.equal(first[remapped], labels)
    loss = head(F.normalize(torch.randn(4, 8)), labels, step=4)
    assert torch.isfinite(loss) and torch.equal(head.last_index, first)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(ArcFace(), 8, 10, sample_rate=0.0)
