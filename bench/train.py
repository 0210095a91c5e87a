"""The Accelerate-wrapped training loop.

One plain loop for every optimizer: each step builds a closure over the batch and
calls ``optimizer.step(closure)``; the optimizer decides how many passes it takes.
The optimizer is not passed through ``accelerator.prepare``: Accelerate's wrapper
hides the variants' methods and runs its loss-scaler step once per ``step()`` call,
which does not fit a step made of several passes. The closure instead runs each pass
under the prepared model's autocast, handles DDP synchronisation per pass
(``--sam_sync``), gradient accumulation, fp16 loss scaling and the finiteness check
that lets a step be skipped with the weights restored.

Checkpoints (``accelerator.save_state``, model weights as safetensors) hold the model,
the optimizer (base buffers and variant state), the scheduler, every RNG, the loss
scale and the position in the data order, so a resumed run repeats exactly what the
uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures import create_model
from optimizers import BatchClosure, SharpnessAwareOptimizer, create_optimizer

from .amp import LossScaler, NonFiniteGradient
from .augment import augment, default_augmentation, normalize
from .config import ConfigError, RunConfig
from .data import ImageDataset, load_dataset_splits, training_subset, with_label_noise
from .io import write_json, write_jsonl

EVAL_BATCH = 1024
#: Tracker project name; TensorBoard writes under RUN_DIR/sam-bench/.
TRACKER_PROJECT = "sam-bench"
#: Test hook: the process kills itself (SIGKILL) after this global step.
KILL_AT_STEP = "SAM_BENCH_KILL_AT_STEP"


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite steps); its files are written."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; one line, with what is still there."""


class TrainClosure(BatchClosure):
    """The harness's closure: DDP sync per pass, fp16 scaling, finiteness checks, training metrics."""

    def __init__(self, model, loss_fn, inputs, targets, *, accelerator, sync_ascent: bool,
                 scaler: LossScaler | None, accumulation_steps: int = 1):
        super().__init__(model, loss_fn, inputs, targets, backward=self._scaled_backward,
                         accumulation_steps=accumulation_steps)
        self.accelerator, self.sync_ascent, self.scaler = accelerator, sync_ascent, scaler
        self.correct = torch.zeros((), device=inputs.device)
        self.loss_sum = torch.zeros((), device=inputs.device)
        self.seen = 0

    def context(self, phase: str, last_micro_batch: bool = True):
        if self.accelerator.num_processes > 1 and (not last_micro_batch or (phase == "ascent" and not self.sync_ascent)):
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def _scaled_backward(self, loss):
        if self.scaler is None:
            self.accelerator.backward(loss)
        else:
            self.scaler.backward(loss)

    def after_backward(self, loss, phase):
        # Every process must agree before skipping, or one would wait forever in the next
        # synchronised backward: the flag is summed across processes.
        bad = self.scaler.unscale_(list(self.model.parameters())) if self.scaler else ~torch.isfinite(loss)
        bad = bad.float().reshape(1).to(self.inputs.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item():
            raise NonFiniteGradient(f"non-finite loss or gradient in a {phase} pass")

    def observe(self, outputs, targets, losses, phase):
        # Training metrics come from the passes at the step's own weights: the first pass,
        # and bSAM's noisy points (one per sub-batch).
        if self.passes == 1 or (phase == "ascent" and len(targets) < self.batch_size):
            self.correct += (outputs.argmax(-1) == targets).sum()
            self.loss_sum += losses.float().sum()
            self.seen += len(targets)


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

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _lr_lambda(config: RunConfig, steps_per_epoch: int):
    import math

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


ECE_BINS = 15


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageDataset, images: torch.Tensor, labels: torch.Tensor, accelerator) -> dict[str, float]:
    """Test loss, accuracy and expected calibration error (15 equal-width confidence bins).
    Each process takes every world_size-th batch; the sums are reduced."""
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    bins = torch.zeros(3, ECE_BINS, device=device)  # count, confidence sum, correct sum per bin
    starts = range(accelerator.process_index * EVAL_BATCH, len(labels), accelerator.num_processes * EVAL_BATCH)
    for start in starts:
        x = normalize(images[start : start + EVAL_BATCH], data.mean, data.std)
        y = labels[start : start + EVAL_BATCH]
        outputs = model(x).float()
        loss_sum += nn.functional.cross_entropy(outputs, y, reduction="sum")
        confidence, predicted = outputs.softmax(-1).max(-1)
        index = (confidence.nan_to_num(0.0) * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == y).float())):
            bins[row].index_add_(0, index, values)
    totals = accelerator.reduce(torch.cat([loss_sum.reshape(1), bins.reshape(-1)]), reduction="sum")
    count, confidence, correct = totals[1:].reshape(3, ECE_BINS)
    model.train()
    n = len(labels)
    return {
        "test_loss": (totals[0] / n).item(),
        "test_acc": (correct.sum() / n).item(),
        "test_ece": ((correct - confidence).abs().sum() / n).item(),
    }


def epoch_order(config: RunConfig, num_train: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a function of the seed and the epoch only (so resumable)."""
    return torch.randperm(num_train, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))


def global_batch(train_set: ImageDataset, images, labels, order, i: int, batch_size: int, aug, generator):
    """Step ``i``'s whole batch, augmented and normalised. Every process draws the augmentation of
    the whole batch and keeps its shard, so what is trained on does not depend on the process count."""
    batch = order[i * batch_size : (i + 1) * batch_size]
    return normalize(augment(images[batch], aug, generator), train_set.mean, train_set.std), labels[batch]


def take_step(optimizer, closure) -> bool:
    """One optimizer step; a non-finite pass skips it with the weights restored. Returns whether it was skipped."""
    try:
        optimizer.step(closure)
        return False
    except NonFiniteGradient:
        if isinstance(optimizer, SharpnessAwareOptimizer):
            optimizer.restore()
        optimizer.zero_grad()
        return True


# -- sharpness ---------------------------------------------------------------------------------

#: One radius for every optimizer, so the SAM sharpness of their models is comparable.
SHARPNESS_RHO = 0.05


def final_sharpness(model: nn.Module, train_set: ImageDataset, device, samples: int = 1024) -> dict[str, float]:
    """Sharpness of the trained model on a fixed subset of its (possibly noisy) training set, unaugmented."""
    from .sharpness import measure_sharpness

    keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:samples]
    x = normalize(train_set.images[keep].to(device), train_set.mean, train_set.std)
    y = train_set.labels[keep].to(device)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
    result = measure_sharpness(model, nn.functional.cross_entropy, batches, rho=SHARPNESS_RHO, seed=0)
    return {**result, "samples": len(y), "rho": SHARPNESS_RHO}


def measure_run_sharpness(run: Path, samples: int | None = None) -> dict[str, float]:
    """Sharpness of a finished run's exported model; writes sharpness.json next to it."""
    from safetensors.torch import load_file

    from .io import read_json

    config = RunConfig.from_dict(read_json(run / "config.json"), ignore=("run_id", "world_size", "device", "versions"))
    train_set, _ = load_dataset_splits(config.dataset, config.data_dir)
    if config.train_subset:
        train_set = training_subset(train_set, config.train_subset)
    if config.label_noise:
        train_set, _ = with_label_noise(train_set, config.label_noise, config.seed)
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.images.shape[1])
    model.load_state_dict(load_file(run / "model.safetensors"))
    result = final_sharpness(model, train_set, torch.device("cpu"), samples or config.sharpness_samples)
    write_json(run / "sharpness.json", result)
    return result


# -- checkpoints -------------------------------------------------------------------------------

COMPLETE = "complete.json"


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> None:
    """Write to a temporary folder, mark it complete, then rename: a crash never leaves a partial checkpoint."""
    root = run_dir / "checkpoints"
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / COMPLETE, {"step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # any unreadable file: say which checkpoint and what is left
        others = [p.name for p in checkpoints(checkpoint.parent.parent) if p != checkpoint]
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"checkpoint {checkpoint} is unreadable ({type(err).__name__}: {reason}); "
            + (f"earlier checkpoints are intact in {checkpoint.parent}: {', '.join(others)}; "
               "remove the bad one to resume from them" if others else "no earlier checkpoint is left")
        ) from None


def _export_model(accelerator, model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


# -- the loop ----------------------------------------------------------------------------------


def train(config: RunConfig, progress=None, resume: bool = False) -> RunResult:
    """Run (or, with ``resume``, continue) one training job; writes config.json,
    metrics.jsonl, summary.json, checkpoints and model.safetensors in its run directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    config.validate()
    AcceleratorState._reset_state()  # runs in one process may differ in mixed precision
    run_dir = Path(config.output_dir) / (config.run_name or config.run_id())
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision, log_with=config.log_with,
                              project_dir=str(run_dir) if config.log_with else None)
    device = accelerator.device
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU (Accelerate applies no fp16 autocast on CPU); use bf16 on CPU")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision bf16 is not supported by this GPU; use fp16")
    set_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with accelerator.main_process_first():  # decode and cache once, then every process reads the cache
        train_set, test_set = load_dataset_splits(config.dataset, config.data_dir)
    if config.train_subset:
        train_set = training_subset(train_set, config.train_subset)
    noisy = None
    if config.label_noise:
        train_set, noisy = with_label_noise(train_set, config.label_noise, config.seed)
    model = create_model(config.arch, num_classes=train_set.num_classes, in_channels=train_set.images.shape[1])
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer(config.optimizer, model, base=config.base_optimizer, **config.optimizer_settings(len(train_set)))
    model = accelerator.prepare(model)

    world, rank = accelerator.num_processes, accelerator.process_index
    sync_ascent = config.sam_sync == "global" or not getattr(optimizer, "ascent_may_be_local", True)
    if world > 1 and sync_ascent and config.optimizer == "esam":
        raise ConfigError("esam needs --sam_sync local under data parallelism: its ascent pass leaves tensors out")
    if config.batch_size % (world * config.grad_accum_steps):
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by processes x grad_accum_steps = {world * config.grad_accum_steps}"
        )
    local_batch = config.batch_size // world
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(train_set)} training images")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
    scaler = LossScaler() if config.mixed_precision == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=config.label_smoothing)
    aug = default_augmentation(config.dataset, cutout=config.cutout)
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    test_images, test_labels = test_set.images.to(device), test_set.labels.to(device)
    aug_generator = torch.Generator(device).manual_seed(config.seed)

    state = TrainState()
    accelerator.register_for_checkpointing(optimizer, scheduler, state)
    if resume and checkpoints(run_dir):
        load_checkpoint(accelerator, checkpoints(run_dir)[-1])
        aug_generator.set_state(state.augmentation_rng.cpu() if device.type == "cpu" else state.augmentation_rng)
        if scaler is not None and state.loss_scale:
            scaler.load_state_dict(state.loss_scale)
    elif accelerator.is_main_process:
        for stale in ("checkpoints", "metrics.jsonl", "summary.json", "model.safetensors", "label_noise.json", "sharpness.json",
                      TRACKER_PROJECT):
            path = run_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if accelerator.is_main_process:
        write_json(
            run_dir / "config.json",
            {**config.to_dict(), "run_id": config.run_id(), "world_size": world, "device": str(device), "versions": _versions()},
        )
        if noisy is not None:
            write_json(run_dir / "label_noise.json", {"fraction": config.label_noise, "seed": config.seed,
                                                      "changed": noisy.tolist()})

    if config.log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers(TRACKER_PROJECT, config={**flat, **{f"hp_{k}": v for k, v in config.hyperparameters.items()}})

    def checkpoint():
        state.augmentation_rng = aug_generator.get_state()
        state.loss_scale = scaler.state_dict() if scaler is not None else None
        save_checkpoint(accelerator, run_dir, state.step, config.keep_checkpoints)

    kill_at = int(os.environ.get(KILL_AT_STEP, 0))
    total_steps = config.epochs * steps_per_epoch
    task = progress.add_task(run_dir.name, total=total_steps, completed=state.step) if progress else None
    stopped_early = diverged = False
    start = time.perf_counter()
    while state.epoch < config.epochs and not (stopped_early or diverged):
        epoch = state.epoch
        sums = state.epoch_sums or {"correct": 0.0, "loss_sum": 0.0, "seen": 0, "passes": 0, "sample_passes": 0.0, "time": 0.0}
        correct = torch.tensor(sums["correct"], device=device)
        loss_sum = torch.tensor(sums["loss_sum"], device=device)
        order = epoch_order(config, len(train_set), epoch).to(device)
        lap = time.perf_counter()
        for i in range(state.step_in_epoch, steps_per_epoch):
            x, y = global_batch(train_set, train_images, train_labels, order, i, config.batch_size, aug, aug_generator)
            shard = slice(rank * local_batch, (rank + 1) * local_batch)
            closure = TrainClosure(
                model, loss_fn, x[shard], y[shard], accelerator=accelerator, sync_ascent=sync_ascent, scaler=scaler,
                accumulation_steps=config.grad_accum_steps,
            )
            skipped = take_step(optimizer, closure)
            state.skipped += skipped
            state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
            if scaler is not None:
                scaler.update(skipped=state.consecutive_skips > 0)
            scheduler.step()
            state.step += 1
            state.step_in_epoch = i + 1
            correct += closure.correct
            loss_sum += closure.loss_sum
            sums["seen"] += closure.seen
            sums["passes"] += closure.passes
            sums["sample_passes"] += closure.sample_passes
            if task is not None:
                progress.advance(task)
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if state.consecutive_skips >= config.max_consecutive_skips:
                diverged = True
            elif config.max_steps is not None and state.step >= config.max_steps:
                stopped_early = True
            if diverged or stopped_early or state.step_in_epoch == steps_per_epoch:
                break
            if config.save_every_steps and state.step % config.save_every_steps == 0:
                sums.update(correct=correct.item(), loss_sum=loss_sum.item(), time=sums["time"] + time.perf_counter() - lap)
                lap = time.perf_counter()
                state.epoch_sums = dict(sums)
                checkpoint()
        sums["time"] += time.perf_counter() - lap
        epoch_steps = state.step_in_epoch
        seen = accelerator.reduce(torch.tensor([correct.item(), loss_sum.item(), float(sums["seen"])], device=device), reduction="sum")
        test = evaluate(model, test_set, test_images, test_labels, accelerator)
        state.rows.append(
            {
                "epoch": epoch + 1,
                "step": state.step,
                "train_loss": (seen[1] / seen[2].clamp_min(1)).item(),
                "train_acc": (seen[0] / seen[2].clamp_min(1)).item(),
                **test,
                "lr": optimizer.param_groups[0]["lr"],
                "rho": _rho(optimizer),
                "epoch_time_s": sums["time"],
                "images_per_s": epoch_steps * config.batch_size / max(sums["time"], 1e-9),
                "passes_per_step": sums["passes"] / max(1, epoch_steps),
                "sample_passes_per_step": sums["sample_passes"] / max(1, epoch_steps),
                "skipped_steps": state.skipped,
            }
        )
        state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, {}
        if accelerator.is_main_process:
            write_jsonl(run_dir / "metrics.jsonl", state.rows)
        if config.log_with:
            accelerator.log({k: v for k, v in state.rows[-1].items() if v is not None}, step=state.step)
        at_interval = (config.save_every_epochs and state.epoch % config.save_every_epochs == 0) or (
            config.save_every_steps and state.step % config.save_every_steps == 0
        )
        if at_interval or state.epoch == config.epochs or stopped_early or diverged:
            checkpoint()

    rows = state.rows
    best = max(rows, key=lambda r: r["test_acc"])
    status = "diverged" if diverged else "stopped_early" if stopped_early else "completed"
    summary = {
        "run_id": config.run_id(),
        "status": status,
        "dataset": config.dataset,
        "arch": config.arch,
        "optimizer": config.optimizer,
        "base_optimizer": config.base_optimizer,
        "seed": config.seed,
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "final_test_ece": rows[-1]["test_ece"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "final_train_loss": rows[-1]["train_loss"],
        "epochs_completed": len(rows),
        "steps": state.step,
        "stopped_early": stopped_early,
        "skipped_steps": state.skipped,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": sum(r["epoch_time_s"] for r in rows),
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "passes_per_step": sum(r["passes_per_step"] for r in rows) / len(rows),
        "sample_passes_per_step": sum(r["sample_passes_per_step"] for r in rows) / len(rows),
        "peak_memory_bytes": _peak_memory(device),
        "num_params": num_params,
        "world_size": world,
    }
    if accelerator.is_main_process:
        _export_model(accelerator, model, run_dir / "model.safetensors")
        if config.sharpness:
            write_json(run_dir / "sharpness.json",
                       final_sharpness(accelerator.unwrap_model(model, keep_fp32_wrapper=False), train_set, device,
                                       config.sharpness_samples))
        write_json(run_dir / "summary.json", summary)
    if config.log_with:
        accelerator.end_training()
    if task is not None:
        progress.remove_task(task)
    if diverged:
        raise TrainingStopped(
            f"stopped after {config.max_consecutive_skips} consecutive steps with a non-finite loss or gradient "
            f"(step {state.step}); the metrics so far are in {run_dir}"
        )
    return RunResult(run_dir, summary)
