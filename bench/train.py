"""The Accelerate-wrapped training loop.

One plain loop for every optimizer: each step builds a :class:`optimizers.BatchClosure`
for the batch and calls ``optimizer.step(closure)``; the optimizer decides how many
passes it takes. The optimizer is not passed through ``accelerator.prepare``:
Accelerate's wrapper hides the variants' methods and runs its own loss-scaler step
per ``step()`` call, which does not fit a step made of several passes. Instead the
closure runs each pass under Accelerate's autocast (the prepared model) and, for
``--sam_sync local`` under DDP, runs ascent passes under ``no_sync``.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures import create_model
from optimizers import BatchClosure, SharpnessAwareOptimizer, create_optimizer

from .amp import LossScaler, NonFiniteGradient
from .augment import augment, default_augmentation, normalize
from .config import ConfigError, RunConfig
from .data import ImageDataset, load_dataset_splits
from .io import write_json, write_jsonl

EVAL_BATCH = 1024


class TrainClosure(BatchClosure):
    """The harness's closure: Accelerate autocast and DDP sync, fp16 scaling, training metrics."""

    def __init__(self, model, loss_fn, inputs, targets, *, accelerator, sync_ascent: bool, scaler: LossScaler | None):
        super().__init__(model, loss_fn, inputs, targets, backward=self._scaled_backward)
        self.accelerator, self.sync_ascent, self.scaler = accelerator, sync_ascent, scaler
        self.correct = torch.zeros((), device=inputs.device)
        self.loss_sum = torch.zeros((), device=inputs.device)
        self.seen = 0

    def context(self, phase: str):
        if phase == "ascent" and not self.sync_ascent and self.accelerator.num_processes > 1:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def _scaled_backward(self, loss):
        if self.scaler is None:
            self.accelerator.backward(loss)
        else:
            self.scaler.backward(loss, [p for p in self.model.parameters()])

    def observe(self, outputs, targets, losses, phase):
        # Training metrics come from the passes at the step's own weights: the first pass,
        # and bSAM's noisy points (its ascent passes over every sub-batch).
        if self.passes == 1 or (phase == "ascent" and len(targets) < self.batch_size):
            self.correct += (outputs.argmax(-1) == targets).sum()
            self.loss_sum += losses.detach().float().sum()
            self.seen += len(targets)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _lr_lambda(config: RunConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    milestones = [round(m * total) for m in config.step_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if config.schedule == "step":
            return config.step_factor ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def _versions() -> dict[str, str]:
    import accelerate

    return {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate.__version__}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rho(optimizer) -> float | None:
    group = optimizer.param_groups[0]
    value = group.get("rho_t", group.get("rho"))
    return float(value) if value is not None else None


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, images: torch.Tensor, labels: torch.Tensor, accelerator) -> tuple[float, float]:
    """Test loss and accuracy; each process takes every world_size-th batch, sums are reduced."""
    model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    starts = range(accelerator.process_index * EVAL_BATCH, len(labels), accelerator.num_processes * EVAL_BATCH)
    for start in starts:
        x = normalize(images[start : start + EVAL_BATCH], data.mean, data.std)
        y = labels[start : start + EVAL_BATCH]
        outputs = model(x).float()
        loss_sum += nn.functional.cross_entropy(outputs, y, reduction="sum")
        correct += (outputs.argmax(-1) == y).sum()
    totals = accelerator.reduce(torch.stack([loss_sum, correct]), reduction="sum")
    model.train()
    return (totals[0] / len(labels)).item(), (totals[1] / len(labels)).item()


def train(config: RunConfig, progress=None) -> RunResult:
    """Run one training job and write config.json, metrics.jsonl and summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    device = accelerator.device
    run_dir = Path(config.output_dir) / (config.run_name or config.run_id())

    with accelerator.main_process_first():  # decode and cache once, then every process reads the cache
        train_set, test_set = load_dataset_splits(config.dataset, config.data_dir)
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.images.shape[1])
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer(
        config.optimizer, model, base=config.base_optimizer, **config.optimizer_settings(len(train_set))
    )
    model = accelerator.prepare(model)

    world, rank = accelerator.num_processes, accelerator.process_index
    sync_ascent = config.sam_sync == "global" or not getattr(optimizer, "ascent_may_be_local", True)
    if world > 1 and sync_ascent and config.optimizer == "esam":
        raise ConfigError("esam needs --sam_sync local under data parallelism: its ascent pass leaves tensors out")
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    local_batch = config.batch_size // world
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_set)} training images")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
    scaler = LossScaler() if config.mixed_precision == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing)
    aug = default_augmentation(config.dataset, cutout=config.cutout)
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    test_images, test_labels = test_set.images.to(device), test_set.labels.to(device)
    aug_generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank)

    if accelerator.is_main_process:
        write_json(
            run_dir / "config.json",
            {**config.to_dict(), "run_id": config.run_id(), "world_size": world, "device": str(device), "versions": _versions()},
        )
    rows: list[dict[str, Any]] = []
    step, skipped, stopped_early = 0, 0, False
    task = progress.add_task(run_dir.name, total=config.epochs * steps_per_epoch) if progress else None
    start = time.perf_counter()
    train_time = 0.0
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        order = order.to(device)
        correct = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        seen, passes, sample_passes, epoch_steps = 0, 0, 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size + rank * local_batch : i * config.batch_size + (rank + 1) * local_batch]
            x = normalize(augment(train_images[idx], aug, aug_generator), train_set.mean, train_set.std)
            closure = TrainClosure(
                model, loss_fn, x, train_labels[idx], accelerator=accelerator,
                sync_ascent=sync_ascent, scaler=scaler,
            )
            step_skipped = False
            try:
                optimizer.step(closure)
            except NonFiniteGradient:
                if isinstance(optimizer, SharpnessAwareOptimizer):
                    optimizer.restore()
                optimizer.zero_grad()
                skipped, step_skipped = skipped + 1, True
            if scaler is not None:
                scaler.update(skipped=step_skipped)
            scheduler.step()
            step += 1
            epoch_steps += 1
            correct += closure.correct
            loss_sum += closure.loss_sum
            seen += closure.seen
            passes += closure.passes
            sample_passes += closure.sample_passes
            if task is not None:
                progress.advance(task)
            if config.max_steps is not None and step >= config.max_steps:
                stopped_early = True
                break
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        totals = accelerator.reduce(torch.stack([correct.float(), loss_sum, torch.tensor(float(seen), device=device)]), reduction="sum")
        test_loss, test_acc = evaluate(model, test_set, test_images, test_labels, accelerator)
        rows.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": (totals[1] / totals[2].clamp_min(1)).item(),
                "train_acc": (totals[0] / totals[2].clamp_min(1)).item(),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "rho": _rho(optimizer),
                "epoch_time_s": epoch_time,
                "images_per_s": epoch_steps * config.batch_size / epoch_time,
                "passes_per_step": passes / max(1, epoch_steps),
                "sample_passes_per_step": sample_passes / max(1, epoch_steps),
                "skipped_steps": skipped,
            }
        )
        if accelerator.is_main_process:
            write_jsonl(run_dir / "metrics.jsonl", rows)
        if stopped_early:
            break

    best = max(rows, key=lambda r: r["test_acc"])
    summary = {
        "run_id": config.run_id(),
        "dataset": config.dataset,
        "arch": config.arch,
        "optimizer": config.optimizer,
        "base_optimizer": config.base_optimizer,
        "seed": config.seed,
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "final_train_loss": rows[-1]["train_loss"],
        "epochs_completed": len(rows),
        "steps": step,
        "stopped_early": stopped_early,
        "skipped_steps": skipped,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": train_time,
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "passes_per_step": sum(r["passes_per_step"] for r in rows) / len(rows),
        "sample_passes_per_step": sum(r["sample_passes_per_step"] for r in rows) / len(rows),
        "peak_memory_bytes": _peak_memory(device),
        "num_params": num_params,
        "world_size": world,
    }
    if accelerator.is_main_process:
        write_json(run_dir / "summary.json", summary)
    if task is not None:
        progress.remove_task(task)
    return RunResult(run_dir, summary)
