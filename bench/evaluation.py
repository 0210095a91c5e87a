"""Evaluation of the model on a held-out split: loss, accuracy and expected calibration error.

Each process evaluates every world_size-th batch on the *unwrapped* model, so no process
ever issues a collective that another does not (a DDP-wrapped forward broadcasts buffers;
a process with no batch would never join it). The sums are then reduced once, by every
process. BatchNorm running statistics are first taken from process 0 on every process, so
the processes evaluate the same model as the one exported.

A sharded model (FSDP) gathers each layer's parameters from every process during its forward,
so there every process runs as many forwards as the busiest one: a process out of batches
runs the missing ones on one image and discards them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from optimizers.base import is_sharded

from .augment import normalize
from .data import ImageDataset

EVAL_BATCH = 1024
ECE_BINS = 15


def _same_buffers_everywhere(model: nn.Module, accelerator) -> None:
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, images: torch.Tensor, labels: torch.Tensor, accelerator,
             prefix: str = "test") -> dict[str, float]:
    """``{prefix}_loss``, ``{prefix}_acc`` and ``{prefix}_ece`` (15 equal-width confidence bins)."""
    model = accelerator.unwrap_model(model)
    _same_buffers_everywhere(model, accelerator)
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    bins = torch.zeros(3, ECE_BINS, device=device)  # count, confidence sum, correct sum per bin
    starts = range(accelerator.process_index * EVAL_BATCH, len(labels), accelerator.num_processes * EVAL_BATCH)
    for start in starts:
        x = normalize(images[start : start + EVAL_BATCH], data.mean, data.std)
        y = labels[start : start + EVAL_BATCH]
        outputs = model(x).float()  # unwrap_model keeps the mixed-precision forward
        loss_sum += nn.functional.cross_entropy(outputs, y, reduction="sum")
        confidence, predicted = outputs.softmax(-1).max(-1)
        index = (confidence.nan_to_num(0.0) * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == y).float())):
            bins[row].index_add_(0, index, values)
    if any(is_sharded(p) for p in model.parameters()):
        rounds = -(-len(labels) // (accelerator.num_processes * EVAL_BATCH))
        for _ in range(rounds - len(starts)):
            model(normalize(images[:1], data.mean, data.std))
    totals = torch.cat([loss_sum.reshape(1), bins.reshape(-1)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    count, confidence, correct = totals[1:].reshape(3, ECE_BINS)
    model.train()
    n = len(labels)
    return {
        f"{prefix}_loss": (totals[0] / n).item(),
        f"{prefix}_acc": (correct.sum() / n).item(),
        f"{prefix}_ece": ((correct - confidence).abs().sum() / n).item(),
    }
