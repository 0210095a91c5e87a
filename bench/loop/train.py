"""One training run from start (or a checkpoint) to its summary: :func:`train`."""

from __future__ import annotations

from bench.config import RunConfig
from bench.data.batches import (
    MemoryBatches,  # noqa: F401 (re-exported)
    TrainBatches,  # noqa: F401 (re-exported)
    epoch_order,  # noqa: F401 (re-exported)
    global_batch,  # noqa: F401 (re-exported)
)
from bench.errors import RunStopped
from bench.loop.epoch import end_epoch, run_epoch
from bench.loop.finish import finish, finished_summary
from bench.loop.setup import setup, start_or_resume
from bench.loop.state import RunResult
from bench.resolve import check_not_taken, check_recorded, check_same_run, resolve


class TrainingStopped(RunStopped):
    """The run stopped itself (too many consecutive non-finite steps); its files are written."""


# -- the loop ----------------------------------------------------------------------------------


def train(config: RunConfig, progress=None, resume: bool = False) -> RunResult:
    """Run (or, with ``resume``, continue) one training job; writes config.json, metrics.jsonl,
    summary.json, checkpoints and model.safetensors in its run directory. Resuming a run that
    already finished changes nothing."""
    resolve(config)
    if resume:
        check_same_run(config)
        check_recorded(config)
    else:
        check_not_taken(config)
    if resume and (done := finished_summary(config)) is not None:
        return RunResult(config.run_dir(), done, already_finished=True)
    named = config.run_dir()
    run = setup(config, progress, new=not (named / "config.json").is_file())
    if run.run_dir != named:  # named after the data it downloaded: that folder is checked as this one was
        if not resume:
            check_not_taken(config)
        else:
            check_same_run(config)
            check_recorded(config)
            if (done := finished_summary(config)) is not None:
                return RunResult(run.run_dir, done, already_finished=True)
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
