"""One epoch of training: the steps, the periodic checkpoints, the epoch's metrics row."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from bench.data.batches import (
    MemoryBatches,  # noqa: F401 (re-exported)
    TrainBatches,  # noqa: F401 (re-exported)
    epoch_order,  # noqa: F401 (re-exported)
    global_batch,  # noqa: F401 (re-exported)
)
from bench.io import write_jsonl
from bench.loop.checkpoint import save_checkpoint
from bench.loop.state import Run, TrainState
from bench.loop.step import TrainClosure, evaluation_weights, take_step
from bench.loop.sums import EpochSums
from optimizers import SharpnessAwareOptimizer


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- one epoch ---------------------------------------------------------------------------------


def epoch_sums(run: Run) -> EpochSums:
    """The running sums of the current epoch: those a checkpoint saved mid-epoch, else fresh ones."""
    return EpochSums(run.device, run.state.epoch_sums)


def one_step(run: Run, i: int, sums: EpochSums) -> bool | torch.Tensor:
    """Train on step ``i`` of the epoch; returns whether the step was skipped (see
    :func:`bench.loop.step.take_step`: a bool, or a flag on the device)."""
    x, y, ids = run.batches.batch(run.state.epoch, i)
    return train_on(run, x, y, ids, sums)


def train_on(run: Run, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, sums: EpochSums) -> bool | torch.Tensor:
    """One optimizer step on a whole (global) batch, of which this process trains its shard."""
    config, world, rank = run.config, run.accelerator.num_processes, run.accelerator.process_index
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if world > 1:  # this process's shard of the global batch
        local_batch = config.batch_size // world
        shard = slice(rank * local_batch, (rank + 1) * local_batch)
        x, y, ids = x[shard], y[shard], ids[shard]
    closure = run.closure
    if closure is None:  # the run's first step: one closure serves every step
        closure = run.closure = TrainClosure(
            run.model,
            run.loss_fn,
            x,
            y,
            accelerator=run.accelerator,
            ascent_sync=run.ascent_sync,
            scaler=run.scaler,
            accumulation_steps=config.grad_accum_steps,
            sample_ids=ids,
            regularizer=run.regularizer,
            epoch=run.state.epoch,
            sums=sums,
            max_grad_norm=None if isinstance(run.optimizer, SharpnessAwareOptimizer) else config.max_grad_norm,
            params=run.params,
            plain_backward=run.plain_backward,
        )
    else:
        closure.next_batch(x, y, ids, run.state.epoch, sums)
    skipped = take_step(run.optimizer, closure, run.snapshot, on_device=run.skip_on_device)
    if run.regularizer is not None:  # every process, taken or skipped: it may gather across processes
        run.regularizer.after_step(run.accelerator.unwrap_model(run.model), skipped=skipped)
    if run.scaler is not None:
        run.scaler.update(skipped=skipped)
    run.scheduler.step()
    sums.passes += closure.passes  # the metrics went to sums on the device
    sums.sample_passes += closure.sample_passes
    return skipped


def run_epoch(run: Run) -> tuple[dict[str, Any], int]:
    """Train until the epoch ends or the run must stop; returns the epoch's sums and steps taken."""
    config, state = run.config, run.state
    sums = epoch_sums(run)
    lap = time.perf_counter()
    pending: list[bool | torch.Tensor] = []  # skip flags the host has not counted yet
    for i in range(state.step_in_epoch, run.steps_per_epoch):
        skipped = one_step(run, i, sums)
        state.step, state.step_in_epoch = state.step + 1, i + 1
        if run.task is not None:
            run.progress.advance(run.task)
        if isinstance(skipped, torch.Tensor):  # read with others, once per max_consecutive_skips steps (or sooner)
            pending.append(skipped)
            if len(pending) >= config.max_consecutive_skips:
                count_skips(run, pending, sums)
        elif pending:  # decided on the host, after flags not read yet: counted in order
            pending.append(skipped)
            count_skips(run, pending, sums)
        else:  # decided on the host
            _count_skip(state, skipped, config.max_consecutive_skips)
        if state.status == "running" and config.max_steps is not None and state.step >= config.max_steps:
            state.status = "stopped_early"
        if state.status != "running" or state.step_in_epoch == run.steps_per_epoch:
            break
        if config.save_every_steps and state.step % config.save_every_steps == 0:
            count_skips(run, pending, sums)
            if state.status != "running":
                break
            sums.time += time.perf_counter() - lap
            lap = time.perf_counter()
            state.epoch_sums = sums.to_host()
            checkpoint(run)
    count_skips(run, pending, sums)
    sums.time += time.perf_counter() - lap
    if state.status != "running":
        run.batches.close()
    return sums.to_host(), state.step_in_epoch


def count_skips(run: Run, pending: list[bool | torch.Tensor], sums: EpochSums) -> None:
    """Count the skipped steps among ``pending`` (the latest steps' flags, in order; those on the device
    read in one host read) and empty it; a run of ``max_consecutive_skips`` skipped steps in a row marks
    the run diverged. Flags read late find a divergence late: the steps after it ran too (skipped, or
    taken where the run recovered), and it is marked diverged all the same, as a run whose steps decide
    on the host would have stopped there. The training sums then add the counts of the steps taken
    (``sums.settle``, given the flags read here)."""
    on_device = [flag for flag in pending if isinstance(flag, torch.Tensor)]
    read = torch.stack(on_device).ne(0).tolist() if on_device else []
    values = iter(read)
    for flag in pending:
        _count_skip(run.state, next(values) if isinstance(flag, torch.Tensor) else flag, run.config.max_consecutive_skips)
    pending.clear()
    sums.settle(list(zip(on_device, read)))


def _count_skip(state: TrainState, skipped: bool, limit: int) -> None:
    state.skipped += skipped
    state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
    if state.consecutive_skips >= limit and state.status == "running":
        state.status = "diverged"


def checkpoint(run: Run) -> None:
    state = run.state
    now = (time.perf_counter(), time.process_time())
    state.wall_time_s += now[0] - run.segment_start[0]
    state.cpu_time_s += now[1] - run.segment_start[1]
    run.segment_start = now
    state.augmentation_rng = run.aug_generator.get_state()
    state.loss_scale = run.scaler.state_dict() if run.scaler is not None else None
    save_checkpoint(run.accelerator, run.run_dir, state.step, run.config.keep_checkpoints, run.checkpointed, run.per_process)


# -- end of an epoch ---------------------------------------------------------------------------


def epoch_row(run: Run, sums: dict[str, Any], epoch_steps: int) -> dict[str, Any]:
    """The epoch's metrics: training sums reduced over processes, then every held-out split."""
    totals = torch.tensor([sums["correct"], sums["loss_sum"], float(sums["seen"])], device=run.device)
    if run.accelerator.num_processes > 1:
        totals = run.accelerator.reduce(totals, reduction="sum")
    correct, loss_sum, seen = totals.tolist()
    held_out = {}
    epoch, every = run.state.epoch + 1, run.config.test_every_epochs
    # a last row is due, unless the test set is never read (0: a tuning's trials)
    test_due = every > 0 and (epoch % every == 0 or epoch >= run.config.epochs or run.state.status != "running")
    with evaluation_weights(run.optimizer):
        for split in run.splits:
            if split.name != "test" or test_due:
                held_out.update(split.evaluate(run.model, run.accelerator, flips=run.config.test_flips))
    logged = getattr(run.optimizer, "logged_values", dict)()
    return {
        "epoch": run.state.epoch + 1,
        "step": run.state.step,
        # no sample counted (every step skipped): no training metric, rather than a made-up 0
        "train_loss": finite_or_none(loss_sum / seen) if seen else None,
        "train_acc": correct / seen if seen else None,
        **{k: finite_or_none(v) for k, v in held_out.items()},
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
