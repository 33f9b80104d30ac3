"""Batch normalisation over the global batch (``train.sync_bn``), on GPUs and on CPU workers.

With per-worker batch norm a network's forward depends on how the global batch is split, so two
runs on different worker counts differ. Synchronised statistics remove that: the mean and
variance are computed over the rows of all workers. On CUDA this is torch's ``SyncBatchNorm``;
torch's version refuses CPU tensors, so CPU (gloo) workers get :class:`CpuSyncBatchNorm`, which
all-reduces per-channel sums (a differentiable sum over workers). Parameter and buffer
names are unchanged, so checkpoints are the same with or without it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers whose gradient is the sum of every worker's gradient (each worker's loss counts)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every worker's rows (any input rank >= 2)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm: expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        totals = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            totals = _AllReduceSum.apply(totals)
        # One formula on one worker too, so runs on different worker counts differ only by summation order.
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1).clamp_min(1)) * momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch-norm layer of ``module`` synchronised over the workers (same names and values)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        sync = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                sync.weight.copy_(module.weight)
                sync.bias.copy_(module.bias)
            sync.weight.requires_grad_(module.weight.requires_grad)
            sync.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            sync.running_mean.copy_(module.running_mean)
            sync.running_var.copy_(module.running_var)
            sync.num_batches_tracked.copy_(module.num_batches_tracked)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
