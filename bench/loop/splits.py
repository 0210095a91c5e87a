"""The held-out splits a run evaluates: on the device (an in-memory dataset) or read by loader workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from bench.data.augment import normalize
from bench.data.datasets import ImageDataset
from bench.data.folders import FolderSplit
from bench.data.hub import StreamSplit
from bench.data.loader import eval_plan
from bench.data.views import Plan, View, make_loader
from bench.loop.evaluation import evaluate, evaluate_batches


@dataclass
class Split:
    """A held-out split on the device, for evaluation (a split read by loader workers is a
    :class:`LoaderSplit`)."""

    name: str
    data: ImageDataset
    images: torch.Tensor
    labels: torch.Tensor

    def evaluate(self, model: nn.Module, accelerator: Accelerator, flips: bool = False) -> dict[str, float]:
        return evaluate(model, self.data, self.images, self.labels, accelerator, prefix=self.name, flips=flips)


@dataclass
class LoaderSplit:
    """A held-out split evaluated through the loader (the evaluation view), by the rule of
    :func:`bench.loop.evaluation.evaluate`: process r evaluates batches r, r + world, ...; the sums
    are reduced once, by every process."""

    name: str
    data: FolderSplit | StreamSplit
    batch_size: int
    workers: int

    def evaluate(self, model: nn.Module, accelerator, flips: bool = False) -> dict[str, float]:
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        plan = Plan(lambda: eval_plan(self.data.items(), self.batch_size, rank, world))
        loader = make_loader(plan, View(self.data.image_size, train=False), self.data.name, self.workers, device)
        batches = ((normalize(x.to(device), self.data.mean, self.data.std), y.to(device)) for x, y, _ in loader)
        count = len(range(rank, -(-len(self.data) // self.batch_size), world))
        filler = torch.zeros(1, 3, self.data.image_size, self.data.image_size, device=device)
        return evaluate_batches(
            model, batches, len(self.data), accelerator, device, prefix=self.name, count=count, filler=filler, flips=flips
        )
