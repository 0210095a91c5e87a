"""BatchNorm over the whole global batch under data parallelism (``--sync_bn``).

Without it each process normalises by the statistics of its own shard, so two processes
on 2 x B images do not compute what one process does on 2B. ``torch.nn.SyncBatchNorm``
fixes that on GPUs only (it refuses CPU tensors); :class:`CrossProcessBatchNorm` does the
same on any device with one differentiable all-reduce of the per-channel sums, which gloo
supports. On CUDA the torch module is used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class CrossProcessBatchNorm(_BatchNorm):
    """Batch normalisation with statistics over every process's shard (training mode, world > 1)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        local = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least
        count = torch.full((1,), local.numel() / channels, device=x.device)
        totals = dist_fn.all_reduce(torch.cat([local.sum(dims), (local * local).sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (local - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``model`` computes its statistics over all processes."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, CrossProcessBatchNorm):
        like = next(iter(module.state_dict().values()), None)  # the layer's device and floating dtype
        synced = CrossProcessBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=None if like is None else like.device,
            dtype=like.dtype if like is not None and like.is_floating_point() else None,
        )
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
