"""Partial FC: a margin softmax over class centres sharded across the workers, with sampled negatives.

After An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (2021) and
"Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs by
Partial FC" (CVPR 2022), the algorithm of insightface ``arcface_torch`` Partial FC v2:

1. worker ``r`` owns the centres of a contiguous class range (``class_range``), never replicated,
   so no worker holds (or all-reduces) the whole ``num_classes x D`` matrix;
2. every step, the embeddings and labels of all workers are all-gathered;
3. each worker keeps the centres of the positive classes of the whole batch that it owns plus a
   random share of the others (``sample_rate``; 1.0 = all of them);
4. the softmax cross-entropy is computed across workers: the row maxima and the sums of
   exponentials are all-reduced, so the loss equals the full softmax over the kept classes.

The loss is the mean over the global batch on every worker. ``DistributedDataParallel`` averages
backbone gradients over workers, so the all-gather hands each worker ``world_size`` times its rows'
share of the gradient: after DDP the backbone gradient is exactly that of the global-batch loss.
Nothing here imports Ray or the settings, so GPU benchmarks can use it with torch alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.01  # normal init of the centres, as arcface_torch: early cosines are near zero
_INIT_BLOCK = 1 << 16  # classes per seeded init block: the same matrix for any number of workers


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(first class, number of classes)`` owned by ``rank``: near-equal contiguous ranges."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def init_centres(num_classes: int, embedding_size: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Rows ``start .. start + count - 1`` of a seeded ``normal(0, 0.01)`` centre matrix.

    The matrix is drawn in fixed blocks of classes, so any split over workers gives the same rows.
    """
    rows = []
    first_block, last_block = start // _INIT_BLOCK, (start + max(count, 1) - 1) // _INIT_BLOCK
    for block in range(first_block, last_block + 1):
        lo = block * _INIT_BLOCK
        n = min(_INIT_BLOCK, num_classes - lo)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.normal(0.0, INIT_STD, (n, embedding_size), generator=gen)
        rows.append(values[max(start - lo, 0) : min(start + count - lo, n)])
    return torch.cat(rows)[:count].contiguous()


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All workers' ``tensor`` concatenated along dim 0 (no gradient); itself on one worker."""
    rank, world = _world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every worker's gradient of this worker's rows (times world size)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather_rows(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        grad = grad.contiguous()
        dist.all_reduce(grad)
        # x world_size: DDP divides the backbone gradient by it again (see the module docstring).
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows] * world


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All workers' rows, differentiable; every worker must pass the same number of rows."""
    return tensor if _world()[1] == 1 else _AllGatherWithGrad.apply(tensor)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of logits split by columns over workers; label -1 = target elsewhere."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX)
        prob = (logits - row_max[:, None]).exp_()
        denom = _all_reduce(prob.sum(dim=1))
        prob.div_(denom[:, None])
        here = labels >= 0  # masks, not row selections: static shapes for torch.compile
        target = torch.where(here, prob.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
        target = _all_reduce(target)
        ctx.save_for_backward(prob, labels)
        return -target.clamp_min(1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        prob, labels = ctx.saved_tensors
        one = (labels >= 0).to(prob.dtype)[:, None]
        grad = prob.scatter_add(1, labels.clamp(min=0)[:, None], -one)
        return grad.mul_(grad_loss / len(labels)), None


def distributed_softmax_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over columns that are split across workers (``labels`` local, -1 = elsewhere)."""
    return _DistributedSoftmaxCE.apply(logits.float(), labels)


class PartialFC(nn.Module):
    """This worker's class centres and the Partial FC loss: ``forward(embeddings, labels, step) -> loss``.

    ``weight`` holds classes ``class_start .. class_start + num_local - 1``. ``last_index`` (the kept
    local classes of the latest step, ``None`` at rate 1.0) and ``last_correct`` (rows of the global
    batch whose own class has the top cosine among the kept ones, a 0-d tensor) are kept for logging.
    """

    def __init__(
        self,
        margin: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        amp_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"train.partial_fc.sample_rate: must be in (0, 1], got {sample_rate}")
        default_rank, default_world = _world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if num_classes < self.world_size:
            raise ValueError(f"PartialFC: {num_classes} classes cannot be sharded over {self.world_size} workers")
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.seed = seed
        self.amp_dtype = amp_dtype
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(init_centres(num_classes, embedding_size, self.class_start, self.num_local, seed))
        self.last_index: torch.Tensor | None = None
        self.last_correct: torch.Tensor | None = None

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global class ids -> indices into ``weight``; -1 for classes of other workers."""
        local = labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))

    @torch.compiler.disable
    def sample(self, local: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept local classes (sorted: every positive plus random negatives) and labels re-indexed into them.

        The draw is seeded by ``(seed, step, class_start)``, so a resumed run draws the same classes.
        Not compiled (the one graph break of a compiled head): the number of classes kept depends on
        the batch when its positives outnumber ``num_sample``, and the draw has its own generator.
        """
        positive = torch.unique(local[local >= 0])
        if self.num_sample <= positive.numel():
            index = positive
        else:
            gen = torch.Generator(device=self.weight.device)
            gen.manual_seed((self.seed * 1_000_003 + step) * 1_000_033 + self.class_start)
            scores = torch.rand(self.num_local, generator=gen, device=self.weight.device)
            scores[positive] = 2.0
            index = torch.topk(scores, self.num_sample).indices.sort().values
        return index, torch.where(local >= 0, torch.searchsorted(index, local.clamp(min=0)), local)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Mean margin-softmax cross-entropy over the global batch (the same value on every worker)."""
        if embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"PartialFC: {embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
        all_embeddings = all_gather_with_grad(embeddings)
        local = self.local_labels(all_gather_rows(labels.long()))
        if self.sample_rate < 1.0:
            index, local = self.sample(local, step)
            weight = self.weight[index]
            self.last_index = index
        else:
            weight = self.weight
        enabled = self.amp_dtype is not None
        with torch.autocast(all_embeddings.device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled):
            cosine = F.linear(F.normalize(all_embeddings), F.normalize(weight))
        cosine = cosine.float().clamp(-1.0, 1.0)
        self.last_correct = self._count_correct(cosine.detach(), local)
        return distributed_softmax_ce(self.margin(cosine, local), local)

    @torch.no_grad()
    def _count_correct(self, cosine: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        best = _all_reduce(cosine.max(dim=1).values, dist.ReduceOp.MAX)
        target = torch.where(local >= 0, cosine.gather(1, local.clamp(min=0)[:, None]).squeeze(1), 0.0)
        return (_all_reduce(target) >= best).sum()

    def extra_repr(self) -> str:
        return (f"classes={self.class_start}..{self.class_start + self.num_local - 1} of {self.num_classes}, "
                f"embedding_size={self.embedding_size}, sample_rate={self.sample_rate}")
