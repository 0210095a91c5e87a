"""The Accelerate-wrapped training loop.

One plain loop for every optimizer: each step builds a closure over the batch and calls
``optimizer.step(closure)``; the optimizer decides how many passes it takes (see
:mod:`bench.step`). The optimizer is not passed through ``accelerator.prepare``:
Accelerate's wrapper hides the variants' methods and runs its loss-scaler step once per
``step()`` call, which does not fit a step made of several passes.

``train`` reads as four parts: :func:`setup` (accelerator, data, model, optimizer, resume),
:func:`run_epoch`, :func:`end_epoch` (evaluation, metrics row, checkpoint) and
:func:`finish` (summary, exported model). Nothing here names a variant: what a variant
needs from the loop is declared on its class (``ascent_sync``, ``uses_base_optimizer``,
its settings) and read from there.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from architectures import create_model
from optimizers import SharpnessAwareOptimizer, create_optimizer
from optimizers.regularizer import build_regularizer

from . import environment, sharding
from .amp import LossScaler
from .augment import default_augmentation
from .batches import MemoryBatches, TrainBatches, epoch_order, global_batch  # noqa: F401 (re-exported)
from .checkpoint import MODEL_FILE, checkpoints, export_model, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .data import ImageDataset, load_dataset_splits, prepare_train_set
from .evaluation import evaluate
from .io import read_json, write_json, write_jsonl
from .sharpness import final_sharpness
from .step import StepSnapshot, TrainClosure, ascent_is_synchronised, evaluation_weights, take_step
from .streaming import LoaderBatches, LoaderSplit, is_loader_dataset, load_loader_splits
from .sync_bn import convert_sync_batchnorm

#: Tracker project name; TensorBoard writes under RUN_DIR/sam-bench/.
TRACKER_PROJECT = "sam-bench"
#: Files of a previous run that a fresh run in the same directory replaces.
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "model.safetensors", "label_noise.json", "sharpness.json",
             TRACKER_PROJECT)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite steps); its files are written."""


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
class Split:
    """A held-out split on the device, for evaluation (a split read by loader workers is a
    :class:`bench.streaming.LoaderSplit`)."""

    name: str
    data: ImageDataset
    images: torch.Tensor
    labels: torch.Tensor

    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        return evaluate(model, self.data, self.images, self.labels, accelerator, prefix=self.name)


@dataclass
class Run:
    """Everything one training job holds."""

    config: RunConfig
    accelerator: Accelerator
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: LossScaler | None
    train_set: Any  # an ImageDataset, or a dataset read by loader workers (bench.streaming)
    batches: TrainBatches
    splits: list[Any]  # Split or bench.streaming.LoaderSplit
    num_params: int
    sync_ascent: bool
    steps_per_epoch: int
    aug_generator: torch.Generator
    state: TrainState = field(default_factory=TrainState)
    loss_fn: Any = None
    progress: Any = None
    task: Any = None
    segment_start: tuple[float, float] = (0.0, 0.0)
    load_at_start: float | None = None
    load_at_end: float | None = None
    noisy_indices: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)
    #: The extra loss term the optimizer's class declares (``loss_regularizer``), if any.
    regularizer: Any = None
    #: Where a skipped sharpness-aware step is undone from (see bench.step); None for plain optimizers.
    snapshot: StepSnapshot | None = None
    #: The FSDP plugin when the model is sharded (see :mod:`bench.sharding`), else None.
    fsdp: Any = None

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
        if config.schedule == "step":
            return config.step_factor ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- setup -------------------------------------------------------------------------------------


def make_accelerator(config: RunConfig) -> Accelerator:
    AcceleratorState._reset_state()  # runs in one process may differ in mixed precision
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision, log_with=config.log_with,
                              project_dir=str(config.run_dir()) if config.log_with else None)
    device = accelerator.device
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU (Accelerate applies no fp16 autocast on CPU); use bf16 on CPU")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision bf16 is not supported by this GPU; use fp16")
    world = accelerator.num_processes
    if config.batch_size % (world * config.grad_accum_steps):
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by processes x grad_accum_steps = {world * config.grad_accum_steps}"
        )
    return accelerator


def build_model_and_optimizer(config: RunConfig, accelerator: Accelerator, train_set, fsdp=None):
    """The model and the optimizer over its parameters; with an FSDP plugin the model is sharded first,
    so the optimizer holds the sharded parameters."""
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.channels)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and accelerator.num_processes > 1:
        model = convert_sync_batchnorm(model, accelerator.device)
    if fsdp is not None:
        model = sharding.shard_model(accelerator, model, fsdp)
    optimizer = create_optimizer(config.optimizer, model, base=config.base_optimizer,
                                 **config.optimizer_settings(len(train_set)))
    sync_ascent = ascent_is_synchronised(optimizer, config.sam_sync)
    if fsdp is not None:
        sharding.check_sharded_run(config.optimizer, optimizer, config.sam_sync)
    if accelerator.num_processes > 1 and config.sam_sync == "global" and getattr(type(optimizer), "ascent_sync", "any") == "local":
        raise ConfigError(f"{config.optimizer} needs --sam_sync local under data parallelism: its ascent pass leaves tensors out")
    return model, optimizer, sync_ascent


def setup(config: RunConfig, progress=None, data: tuple[ImageDataset, ImageDataset] | None = None) -> Run:
    """Everything a run holds, ready to train; ``data`` replaces the config's dataset (train, test)."""
    accelerator = make_accelerator(config)
    device = accelerator.device
    environment.set_threads(config.threads, accelerator.state.num_processes if device.type == "cpu" else 1)
    set_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if data is not None:
        train_set, test_set = data
    else:
        with accelerator.main_process_first():  # decode and cache once, then every process reads the cache
            if is_loader_dataset(config.dataset):
                train_set, test_set = load_loader_splits(config)
            else:
                train_set, test_set = load_dataset_splits(config.dataset, config.data_dir)
    prepared = prepare_train_set(train_set, subset=config.train_subset, label_noise=config.label_noise, seed=config.seed,
                                 val_fraction=config.val_fraction, split_seed=config.split_seed)
    train_set = prepared.train
    fsdp = sharding.fsdp_plugin(accelerator, config.mixed_precision)
    if fsdp is not None and config.compile:
        raise ConfigError("--compile with FSDP sharding is not supported: the compiled graph would have to trace "
                          "the shards' all-gathers (run sharded models without --compile)")
    model, optimizer, sync_ascent = build_model_and_optimizer(config, accelerator, train_set, fsdp)
    num_params = sum(p.numel() for p in model.parameters())
    # built from the bare model (a regulariser may copy it), before prepare() wraps it
    regularizer = build_regularizer(optimizer, model, len(train_set), train_set.num_classes, device,
                                    gather=accelerator.gather if accelerator.num_processes > 1 else None)
    if config.compile:  # one graph for every pass: no module attribute changes between them (see RunningStatsFreeze)
        model = torch.compile(model, backend=config.compile_backend)
    if fsdp is None:
        model = accelerator.prepare(model)
    else:  # sharded already; checkpoints hold the whole model and optimizer state (see bench.sharding)
        sharding.register_model_checkpointing(accelerator, model)
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(train_set)} training images")
    held_out = [("val", prepared.val)] if prepared.val is not None else []
    aug_generator = torch.Generator(device).manual_seed(config.seed)
    batches, splits = data_access(config, accelerator, train_set, [*held_out, ("test", test_set)], steps_per_epoch,
                                  aug_generator)
    run = Run(
        config=config, accelerator=accelerator, run_dir=config.run_dir(), model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps_per_epoch)),
        scaler=LossScaler() if config.mixed_precision == "fp16" else None, train_set=train_set, batches=batches,
        splits=splits, num_params=num_params, sync_ascent=sync_ascent, steps_per_epoch=steps_per_epoch,
        aug_generator=aug_generator, loss_fn=nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing),
        progress=progress,
    )
    run.load_at_start = environment.load_average()
    run.fsdp = fsdp
    checkpointed = optimizer if fsdp is None else sharding.FullOptimizerState(optimizer, accelerator.is_main_process)
    accelerator.register_for_checkpointing(checkpointed, run.scheduler, run.state, *[r for r in [regularizer] if r is not None])
    run.noisy_indices, run.regularizer = prepared.noisy_indices, regularizer
    if isinstance(optimizer, SharpnessAwareOptimizer):
        run.snapshot = StepSnapshot(accelerator.unwrap_model(model))
    return run


def data_access(config: RunConfig, accelerator: Accelerator, train_set, held_out: list[tuple[str, Any]],
                steps_per_epoch: int, aug_generator: torch.Generator) -> tuple[TrainBatches, list[Any]]:
    """The training batches and the held-out splits: on the device for an in-memory dataset,
    read by loader workers for an imagefolder or hf: dataset."""
    device, world = accelerator.device, accelerator.num_processes
    if is_loader_dataset(config.dataset):
        batches = LoaderBatches(config, train_set, steps_per_epoch, device, accelerator.process_index, world, config.workers)
        return batches, [LoaderSplit(name, data, config.batch_size // world, batches.workers) for name, data in held_out]
    aug = default_augmentation(config.dataset, cutout=config.cutout)
    batches = MemoryBatches(config, train_set, device, aug, aug_generator)
    return batches, [Split(name, data, data.images.to(device), data.labels.to(device)) for name, data in held_out]


def start_or_resume(run: Run, resume: bool) -> None:
    """Load the newest checkpoint (resume), or clear a previous run's files; then write config.json."""
    config, accelerator = run.config, run.accelerator
    if resume and checkpoints(run.run_dir):
        load_checkpoint(accelerator, checkpoints(run.run_dir)[-1])
        rng = run.state.augmentation_rng
        run.aug_generator.set_state(rng.cpu() if run.device.type == "cpu" else rng)
        if run.scaler is not None and run.state.loss_scale:
            run.scaler.load_state_dict(run.state.loss_scale)
    elif accelerator.is_main_process:
        for stale in RUN_FILES:
            path = run.run_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if accelerator.is_main_process:
        write_json(run.run_dir / "config.json", {
            **config.to_dict(), "run_id": config.run_id(), "world_size": accelerator.num_processes,
            "device": str(run.device), "environment": environment.describe(run.device),
            "resolved_hyperparameters": config.resolved_hyperparameters(),
        })
        if run.noisy_indices is not None:
            write_json(run.run_dir / "label_noise.json",
                       {"fraction": config.label_noise, "seed": config.seed, "changed": run.noisy_indices.tolist()})
    if config.log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers(TRACKER_PROJECT, config={**flat, **{f"hp_{k}": v for k, v in config.hyperparameters.items()}})
    run.segment_start = (time.perf_counter(), time.process_time())


# -- one epoch ---------------------------------------------------------------------------------


def epoch_sums(run: Run) -> dict[str, Any]:
    """The running sums of the current epoch (fresh ones at its start): metrics on the device, counts on the host."""
    sums = run.state.epoch_sums or {"correct": 0.0, "loss_sum": 0.0, "seen": 0, "passes": 0, "sample_passes": 0.0, "time": 0.0}
    return {**sums, "correct": torch.tensor(sums["correct"], device=run.device),
            "loss_sum": torch.tensor(sums["loss_sum"], device=run.device),
            "seen": torch.tensor(sums["seen"], device=run.device)}


def _host_sums(sums: dict[str, Any]) -> dict[str, Any]:
    return {**sums, "correct": sums["correct"].item(), "loss_sum": sums["loss_sum"].item(), "seen": int(sums["seen"].item())}


def one_step(run: Run, i: int, sums: dict[str, Any]) -> bool:
    """Train on step ``i`` of the epoch; returns whether the step was skipped."""
    x, y, ids = run.batches.batch(run.state.epoch, i)
    return train_on(run, x, y, ids, sums)


def train_on(run: Run, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, sums: dict[str, Any]) -> bool:
    """One optimizer step on a whole (global) batch, of which this process trains its shard."""
    config, world, rank = run.config, run.accelerator.num_processes, run.accelerator.process_index
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    local_batch = config.batch_size // world
    shard = slice(rank * local_batch, (rank + 1) * local_batch)
    closure = TrainClosure(run.model, run.loss_fn, x[shard], y[shard], accelerator=run.accelerator,
                           sync_ascent=run.sync_ascent, scaler=run.scaler, accumulation_steps=config.grad_accum_steps,
                           sample_ids=ids[shard], regularizer=run.regularizer, epoch=run.state.epoch, totals=sums)
    skipped = take_step(run.optimizer, closure, run.snapshot)
    if run.regularizer is not None:  # every process, taken or skipped: it may gather across processes
        run.regularizer.after_step(run.accelerator.unwrap_model(run.model), skipped=skipped)
    if run.scaler is not None:
        run.scaler.update(skipped=skipped)
    run.scheduler.step()
    sums["passes"] += closure.passes  # the metrics went to sums["correct"], ... on the device
    sums["sample_passes"] += closure.sample_passes
    return skipped


def run_epoch(run: Run) -> tuple[dict[str, Any], int]:
    """Train until the epoch ends or the run must stop; returns the epoch's sums and steps taken."""
    config, state = run.config, run.state
    sums = epoch_sums(run)
    lap = time.perf_counter()
    for i in range(state.step_in_epoch, run.steps_per_epoch):
        skipped = one_step(run, i, sums)
        state.skipped += skipped
        state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
        state.step, state.step_in_epoch = state.step + 1, i + 1
        if run.task is not None:
            run.progress.advance(run.task)
        if state.consecutive_skips >= config.max_consecutive_skips:
            state.status = "diverged"
        elif config.max_steps is not None and state.step >= config.max_steps:
            state.status = "stopped_early"
        if state.status != "running" or state.step_in_epoch == run.steps_per_epoch:
            break
        if config.save_every_steps and state.step % config.save_every_steps == 0:
            sums["time"] += time.perf_counter() - lap
            lap = time.perf_counter()
            state.epoch_sums = _host_sums(sums)
            checkpoint(run)
    sums["time"] += time.perf_counter() - lap
    if state.status != "running":
        run.batches.close()
    return _host_sums(sums), state.step_in_epoch


def checkpoint(run: Run) -> None:
    state = run.state
    now = (time.perf_counter(), time.process_time())
    state.wall_time_s += now[0] - run.segment_start[0]
    state.cpu_time_s += now[1] - run.segment_start[1]
    run.segment_start = now
    state.augmentation_rng = run.aug_generator.get_state()
    state.loss_scale = run.scaler.state_dict() if run.scaler is not None else None
    save_checkpoint(run.accelerator, run.run_dir, state.step, run.config.keep_checkpoints)


# -- end of an epoch ---------------------------------------------------------------------------


def epoch_row(run: Run, sums: dict[str, Any], epoch_steps: int) -> dict[str, Any]:
    """The epoch's metrics: training sums reduced over processes, then every held-out split."""
    totals = torch.tensor([sums["correct"], sums["loss_sum"], float(sums["seen"])], device=run.device)
    if run.accelerator.num_processes > 1:
        totals = run.accelerator.reduce(totals, reduction="sum")
    correct, loss_sum, seen = totals.tolist()
    held_out = {}
    epoch, every = run.state.epoch + 1, run.config.test_every_epochs
    test_due = epoch % every == 0 or epoch >= run.config.epochs or run.state.status != "running"  # a last row
    with evaluation_weights(run.optimizer):
        for split in run.splits:
            if split.name != "test" or test_due:
                held_out.update(split.evaluate(run.model, run.accelerator))
    logged = getattr(run.optimizer, "logged_values", dict)()
    return {
        "epoch": run.state.epoch + 1,
        "step": run.state.step,
        # no sample counted (every step skipped): no training metric, rather than a made-up 0
        "train_loss": _finite_or_none(loss_sum / seen) if seen else None,
        "train_acc": correct / seen if seen else None,
        **{k: _finite_or_none(v) for k, v in held_out.items()},
        "lr": run.optimizer.param_groups[0]["lr"],
        "rho": None,
        **logged,
        "epoch_time_s": sums["time"],
        "step_time_mean_s": sums["time"] / epoch_steps if epoch_steps else None,
        "images_per_s": epoch_steps * run.config.batch_size / max(sums["time"], 1e-9),
        "passes_per_step": sums["passes"] / max(1, epoch_steps),
        "sample_passes_per_step": sums["sample_passes"] / max(1, epoch_steps),
        "skipped_steps": run.state.skipped,
    }


def end_epoch(run: Run, sums: dict[str, Any], epoch_steps: int) -> None:
    config, state = run.config, run.state
    state.rows.append(epoch_row(run, sums, epoch_steps))
    state.epoch, state.step_in_epoch, state.epoch_sums = state.epoch + 1, 0, {}
    if run.accelerator.is_main_process:
        write_jsonl(run.run_dir / "metrics.jsonl", state.rows)
    if config.log_with:
        run.accelerator.log({k: v for k, v in state.rows[-1].items() if v is not None}, step=state.step)
    if run.progress is not None and sums["time"] >= 5.0:
        _print_epoch(run, sums["time"])
    if state.status == "running" and state.epoch == config.epochs:
        state.status = "completed"
    at_interval = (config.save_every_epochs and state.epoch % config.save_every_epochs == 0) or (
        config.save_every_steps and state.step % config.save_every_steps == 0
    )
    if state.status != "diverged" and (at_interval or state.status != "running"):
        checkpoint(run)


def _print_epoch(run: Run, epoch_time: float) -> None:
    row, state, total = run.state.rows[-1], run.state, run.config.epochs
    left = epoch_time * (total - state.epoch)
    score = " ".join(f"{k} {row[k]:.4f}" for k in ("val_acc", "test_acc") if row.get(k) is not None)
    run.progress.print(f"{run.run_dir.name}: epoch {state.epoch}/{total}, {score}, {epoch_time:.1f} s, about {left:.0f} s left")


# -- the summary -------------------------------------------------------------------------------


def _selected_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch a user would pick: by validation accuracy when there is a validation split (model
    selection never reads the test set), else by test accuracy (the "best" some papers report)."""
    key = "val_acc" if rows[-1].get("val_acc") is not None else "test_acc"
    return max(rows, key=lambda r: r[key] if r.get(key) is not None else -1.0)


def summary_of(run: Run) -> dict[str, Any]:
    config, state, rows = run.config, run.state, run.state.rows
    best, last = _selected_row(rows), rows[-1]
    held_out = {f"final_{k}": last.get(k) for split in run.splits for k in (f"{split.name}_acc", f"{split.name}_loss", f"{split.name}_ece")}
    if any(s.name == "val" for s in run.splits):
        held_out["best_val_acc"] = best.get("val_acc")
    return {
        "run_id": config.run_id(), "status": state.status, "dataset": config.dataset, "arch": config.arch,
        "optimizer": config.optimizer, "base_optimizer": config.base_optimizer, "seed": config.seed,
        **held_out,
        "best_test_acc": best.get("test_acc"), "best_epoch": best["epoch"],
        "final_train_loss": last["train_loss"], "epochs_completed": len(rows), "steps": state.step,
        "stopped_early": state.status == "stopped_early", "skipped_steps": state.skipped,
        "wall_time_s": state.wall_time_s, "cpu_time_s": state.cpu_time_s,
        "train_time_s": sum(r["epoch_time_s"] for r in rows),
        # what a table's time ratio uses: every kind of step counted, a burst confined to its epoch
        "step_time_s": _median([r.get("step_time_mean_s") for r in rows]),
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "passes_per_step": sum(r["passes_per_step"] for r in rows) / len(rows),
        "sample_passes_per_step": sum(r["sample_passes_per_step"] for r in rows) / len(rows),
        "peak_memory_bytes": _peak_memory(run.device), "num_params": run.num_params,
        "world_size": run.accelerator.num_processes, "torch_threads": torch.get_num_threads(),
        "load_at_start": run.load_at_start, "load_at_end": run.load_at_end,
        "contended": environment.contended((run.load_at_start, run.load_at_end), _own_threads(run)),
    }


def _own_threads(run: Run) -> int | None:
    return environment.own_threads(torch.get_num_threads(), run.accelerator.num_processes)


def unsharded_model(run: Run) -> nn.Module | None:
    """The sharded model's evaluation weights gathered into a plain copy on the CPU of process 0 (None
    elsewhere); every process must call it."""
    with evaluation_weights(run.optimizer):
        state = sharding.full_model_state(run.model)
    if not run.accelerator.is_main_process:
        return None
    model = create_model(run.config.arch, num_classes=run.train_set.num_classes, in_channels=run.train_set.images.shape[1])
    model.load_state_dict(state)
    return model


def finish(run: Run) -> RunResult:
    """Write model.safetensors, sharpness.json and summary.json (last: its presence marks a finished run)."""
    accelerator, config = run.accelerator, run.config
    now = (time.perf_counter(), time.process_time())
    run.state.wall_time_s += now[0] - run.segment_start[0]
    run.state.cpu_time_s += now[1] - run.segment_start[1]
    run.load_at_end = environment.load_average()
    summary = summary_of(run)
    if summary["contended"]:
        run.notes.append(environment.busy_note((run.load_at_start, run.load_at_end), _own_threads(run)))
    whole = unsharded_model(run) if run.fsdp is not None else None
    if accelerator.is_main_process:
        model = whole if whole is not None else accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
        # a sharded model's copy already holds the evaluation weights, on the CPU
        device = torch.device("cpu") if whole is not None else run.device
        with evaluation_weights(run.optimizer) if whole is None else contextlib.nullcontext():
            note = export_model(model, run.run_dir)
            if config.sharpness and run.state.status != "diverged":
                write_json(run.run_dir / "sharpness.json",
                           final_sharpness(model, run.train_set, device, config.sharpness_samples,
                                           config.sharpness_iterations, config.sharpness_probes))
        summary["model_exported"] = (run.run_dir / MODEL_FILE).is_file()
        if note:
            run.notes.append(note)
        write_json(run.run_dir / "summary.json", summary)
    if config.log_with:
        accelerator.end_training()
    elif run.fsdp is not None:  # every process leaves a sharded run together
        accelerator.wait_for_everyone()
    return RunResult(run.run_dir, summary, notes=run.notes)


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """The summary of a run that already finished in this config's directory, if any."""
    path = config.run_dir() / "summary.json"
    return read_json(path) if path.is_file() else None


# -- the loop ----------------------------------------------------------------------------------


def train(config: RunConfig, progress=None, resume: bool = False) -> RunResult:
    """Run (or, with ``resume``, continue) one training job; writes config.json, metrics.jsonl,
    summary.json, checkpoints and model.safetensors in its run directory. Resuming a run that
    already finished changes nothing."""
    config.validate()
    if resume:
        config.check_recorded()
    if resume and (done := finished_summary(config)) is not None:
        return RunResult(config.run_dir(), done, already_finished=True)
    run = setup(config, progress)
    start_or_resume(run, resume)
    total = config.epochs * run.steps_per_epoch
    run.task = progress.add_task(run.run_dir.name, total=total, completed=run.state.step) if progress else None
    while run.state.status == "running":
        sums, epoch_steps = run_epoch(run)
        end_epoch(run, sums, epoch_steps)
    result = finish(run)
    if run.task is not None:
        progress.remove_task(run.task)
    if run.state.status == "diverged":
        raise TrainingStopped(
            f"stopped after {config.max_consecutive_skips} consecutive steps with a non-finite loss or gradient "
            f"(step {run.state.step}); the metrics so far are in {run.run_dir}"
            + (f"; {'; '.join(result.notes)}" if result.notes else "")
        )
    return result
