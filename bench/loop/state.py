"""What one training job holds: :class:`Run` (built whole by ``bench.loop.setup``), :class:`TrainState`
(where the run is, checkpointed with it) and the learning-rate schedule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from accelerate import Accelerator
from torch import nn

from bench.config import RunConfig
from bench.data.batches import TrainBatches
from bench.loop.precision import LossScaler
from bench.loop.step import backward_is_plain
from optimizers.snapshot import StepSnapshot

if TYPE_CHECKING:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from rich.progress import Progress, TaskID

    from bench.data.datasets import ImageDataset
    from bench.data.folders import FolderSplit
    from bench.data.hub import StreamSplit
    from bench.loop.splits import LoaderSplit, Split
    from optimizers.regularizer import LossRegularizer

#: a training set: in memory, or read by loader workers
TrainSet = Union["ImageDataset", "FolderSplit", "StreamSplit"]


@dataclass
class TrainState:
    """Where the run is: everything a resumed run needs beyond model, optimizer and scheduler."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    skipped: int = 0
    consecutive_skips: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    epoch_sums: dict[str, float] = field(default_factory=dict)
    augmentation_rng: torch.Tensor | None = None
    loss_scale: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0
    status: str = "running"

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    #: True when a resumed run had already finished: nothing was trained or rewritten.
    already_finished: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """Everything one training job holds, built whole by :func:`bench.loop.setup.setup`. What changes as it
    trains: ``state`` (checkpointed), ``task`` (its progress bar), the time and load bookkeeping, ``notes``, and
    ``closure``, built at the first step and given each later step's batch."""

    config: RunConfig
    accelerator: Accelerator
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler | None
    train_set: TrainSet
    batches: TrainBatches
    splits: list[Split | LoaderSplit]
    num_params: int
    #: "global" if the ascent pass's gradient is all-reduced, else "local" (bench.loop.step.effective_ascent_sync)
    ascent_sync: str
    steps_per_epoch: int
    aug_generator: torch.Generator
    #: per-sample losses of (outputs, targets): cross-entropy with the run's label smoothing
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: the training images whose labels label noise replaced (None: no label noise)
    noisy_indices: torch.Tensor | None
    #: The extra loss term the optimizer's class declares (``loss_regularizer``), if any.
    regularizer: LossRegularizer | None
    #: Where a skipped step is undone from (see bench.loop.step): the model's buffers alone where each pass
    #: decides on the host, else the whole step's.
    snapshot: StepSnapshot
    #: The FSDP plugin when the model is sharded (see :mod:`bench.loop.sharding`), else None.
    fsdp: FullyShardedDataParallelPlugin | None
    load_at_start: float | None
    #: Whether steps are undone on the device, without a host read (:func:`bench.loop.step.skips_on_device`).
    skip_on_device: bool = False
    progress: Progress | None = None
    state: TrainState = field(default_factory=TrainState)
    task: TaskID | None = None
    segment_start: tuple[float, float] = (0.0, 0.0)
    load_at_end: float | None = None
    notes: list[str] = field(default_factory=list)
    #: the step's closure (bench.loop.step.TrainClosure), built at the first step and given each later step's batch
    closure: Any = None
    #: what a checkpoint holds besides the model and the random generators, by name (each has state_dict/load_state_dict)
    checkpointed: dict[str, Any] = field(default_factory=dict)
    #: those of ``checkpointed`` whose state is each process's own (bench.loop.checkpoint.save_checkpoint)
    per_process: tuple[str, ...] = ()

    @functools.cached_property
    def params(self) -> list[torch.Tensor]:
        """The model's parameters, listed once (every step's closure zeroes and checks their gradients)."""
        return list(self.model.parameters())

    @functools.cached_property
    def plain_backward(self) -> bool:
        """Whether a pass's backward is ``loss.backward()`` (see :func:`bench.loop.step.backward_is_plain`)."""
        return backward_is_plain(self.accelerator, self.scaler)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def lr_lambda(config: RunConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    milestones = [round(m * total) for m in config.step_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if config.schedule == "linear":
            return max(0.0, 1 - (step - warmup) / max(1, total - warmup))
        if config.schedule == "step":
            return config.step_factor ** sum(step >= m for m in milestones)
        return 1.0

    return factor
