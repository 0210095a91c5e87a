"""Evaluation of the model on a held-out split: loss, accuracy and expected calibration error.

Each process evaluates every world_size-th batch on the *unwrapped* model, so no process
ever issues a collective that another does not (a DDP-wrapped forward broadcasts buffers;
a process with no batch would never join it). The sums are then reduced once, by every
process. BatchNorm running statistics are first taken from process 0 on every process, so
the processes evaluate the same model as the one exported.

:func:`evaluate` takes a split held on the device; :func:`evaluate_batches` any source of
batches, such as a split decoded by loader workers (``bench.loop.splits.LoaderSplit``), under the
same rule.

A sharded model (FSDP) gathers each layer's parameters from every process during its forward,
so there every process runs as many forwards as the busiest one: a process out of batches
runs the missing ones on one image and discards them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from bench.data.augment import normalize
from bench.data.datasets import ImageDataset
from optimizers.tensors import is_sharded

#: Evaluation batch size per device type. On a CPU a batch of 1024 32x32 images spills the
#: activations out of cache: 10,000 CIFAR images through ResNet-8 take 12.2 s at 1024
#: against 3.7 s at 128 (one thread); accelerators want large batches.
EVAL_BATCH = {"cpu": 128}
EVAL_BATCH_ACCELERATOR = 1024
ECE_BINS = 15


def _same_buffers_everywhere(model: nn.Module, accelerator) -> None:
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    accelerator,
    device: torch.device,
    prefix: str = "test",
    count: int | None = None,
    filler: torch.Tensor | None = None,
    flips: bool = False,
) -> dict[str, float]:
    """``{prefix}_loss``, ``{prefix}_acc`` and ``{prefix}_ece`` (15 equal-width confidence bins) of a
    split of ``n`` samples, this process's share of which ``batches`` yields as (normalised images,
    labels) on ``device``; every process calls it once. A sharded model's forwards are collectives:
    the processes agree first on the most batches any of them has (``count``: this process's), and
    one with fewer then runs ``filler`` (one normalised image) for the missing forwards. With ``flips`` the
    logits are the mean of the image's and its mirror image's (test-time augmentation)."""
    model = accelerator.unwrap_model(model)
    _same_buffers_everywhere(model, accelerator)
    model.eval()
    loss_sum = torch.zeros((), device=device)
    bins = torch.zeros(3, ECE_BINS, device=device)  # count, confidence sum, correct sum per bin
    missing = 0
    if accelerator.num_processes > 1 and any(is_sharded(p) for p in model.parameters()):
        if count is None or filler is None:
            raise ValueError("evaluating a sharded model needs this process's batch count and a filler image")
        most = torch.tensor([count], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        missing = int(most.item()) - count
    for x, y in batches:
        outputs = model(x).float()  # unwrap_model keeps the mixed-precision forward
        if flips:
            outputs = (outputs + model(x.flip(-1)).float()) / 2
        loss_sum += nn.functional.cross_entropy(outputs, y, reduction="sum")
        confidence, predicted = outputs.softmax(-1).max(-1)
        index = (confidence.nan_to_num(0.0) * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == y).float())):
            bins[row].index_add_(0, index, values)
    for _ in range(missing * (2 if flips else 1)):
        model(filler)
    totals = torch.cat([loss_sum.reshape(1), bins.reshape(-1)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    _, confidence, correct = totals[1:].reshape(3, ECE_BINS)
    model.train()
    return {
        f"{prefix}_loss": (totals[0] / n).item(),
        f"{prefix}_acc": (correct.sum() / n).item(),
        f"{prefix}_ece": ((correct - confidence).abs().sum() / n).item(),
    }


def evaluate(
    model: nn.Module,
    data: ImageDataset,
    images: torch.Tensor,
    labels: torch.Tensor,
    accelerator,
    prefix: str = "test",
    flips: bool = False,
) -> dict[str, float]:
    """:func:`evaluate_batches` of a split held on the device, in batches of ``EVAL_BATCH`` for its device, process r
    taking batches r, r + world_size, ..."""
    size = EVAL_BATCH.get(images.device.type, EVAL_BATCH_ACCELERATOR)
    starts = range(accelerator.process_index * size, len(labels), accelerator.num_processes * size)
    batches = ((normalize(images[s : s + size], data.mean, data.std), labels[s : s + size]) for s in starts)
    return evaluate_batches(
        model,
        batches,
        len(labels),
        accelerator,
        images.device,
        prefix,
        count=len(starts),
        filler=normalize(images[:1], data.mean, data.std),
        flips=flips,
    )
