"""The end of a run: its summary, the exported model, the sharpness measurement."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from typing import Any

import torch
from torch import nn

from architectures import create_model
from bench import environment
from bench.config import ConfigError, RunConfig
from bench.data.batches import (
    MemoryBatches,  # noqa: F401 (re-exported)
    TrainBatches,  # noqa: F401 (re-exported)
    epoch_order,  # noqa: F401 (re-exported)
    global_batch,  # noqa: F401 (re-exported)
)
from bench.io import read_json, write_json
from bench.loop import sharding
from bench.loop.checkpoint import MODEL_FILE, export_model
from bench.loop.sharpness import final_sharpness
from bench.loop.state import Run, RunResult
from bench.loop.step import evaluation_weights


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


# -- the summary -------------------------------------------------------------------------------


def _selected_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch a user would pick, among those whose test accuracy was measured (every one where the test set
    is never read): by validation accuracy when there is a validation split (model selection never reads the
    test set), else by test accuracy (the "best" some papers report)."""
    key = "val_acc" if rows[-1].get("val_acc") is not None else "test_acc"
    tested = [r for r in rows if r.get("test_acc") is not None] or rows
    return max(tested, key=lambda r: r[key] if r.get(key) is not None else -1.0)


def summary_of(run: Run) -> dict[str, Any]:
    config, state, rows = run.config, run.state, run.state.rows
    best, last = _selected_row(rows), rows[-1]
    held_out = {
        f"final_{k}": last.get(k)
        for split in run.splits
        for k in (f"{split.name}_acc", f"{split.name}_loss", f"{split.name}_ece")
    }
    if any(s.name == "val" for s in run.splits):
        held_out["best_val_acc"] = best.get("val_acc")
    return {
        "run_id": config.run_id(),
        "status": state.status,
        "dataset": config.dataset,
        "arch": config.arch,
        "optimizer": config.optimizer,
        "base_optimizer": config.base_optimizer,
        "seed": config.seed,
        **held_out,
        "best_test_acc": best.get("test_acc"),
        "best_epoch": best["epoch"],
        "final_train_loss": last["train_loss"],
        "epochs_completed": len(rows),
        "steps": state.step,
        "stopped_early": state.status == "stopped_early",
        "skipped_steps": state.skipped,
        "wall_time_s": state.wall_time_s,
        "cpu_time_s": state.cpu_time_s,
        "train_time_s": sum(r["epoch_time_s"] for r in rows),
        # what a table's time ratio uses: every kind of step counted, a burst confined to its epoch
        "step_time_s": _median([r.get("step_time_mean_s") for r in rows]),
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "passes_per_step": sum(r["passes_per_step"] for r in rows) / len(rows),
        "sample_passes_per_step": sum(r["sample_passes_per_step"] for r in rows) / len(rows),
        "peak_memory_bytes": _peak_memory(run.device),
        "num_params": run.num_params,
        "num_classes": run.train_set.num_classes,
        "world_size": run.accelerator.num_processes,
        "torch_threads": torch.get_num_threads(),
        "load_at_start": run.load_at_start,
        "load_at_end": run.load_at_end,
        "contended": environment.contended((run.load_at_start, run.load_at_end), _own_threads(run))
        or os.environ.get(environment.SIDE_BY_SIDE) == "1",
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
    model = create_model(run.config.arch, num_classes=run.train_set.num_classes, in_channels=run.train_set.channels)
    model.load_state_dict(state)
    return model


def plain_copy(run: Run, model: nn.Module) -> nn.Module:
    """An uncompiled copy of a compiled model, on its device: sharpness differentiates twice, which a
    compiled backward does not allow."""
    plain = create_model(run.config.arch, num_classes=run.train_set.num_classes, in_channels=run.train_set.channels)
    plain.load_state_dict(model.state_dict())
    return plain.to(run.device)


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
                write_json(
                    run.run_dir / "sharpness.json",
                    final_sharpness(
                        plain_copy(run, model) if config.compile else model,
                        run.train_set,
                        device,
                        config.sharpness_samples,
                        config.sharpness_iterations,
                        config.sharpness_probes,
                    ),
                )
        summary["model_exported"] = (run.run_dir / MODEL_FILE).is_file()
        if note:
            run.notes.append(note)
        write_json(run.run_dir / "summary.json", summary)
    if config.log_with:
        accelerator.end_training()
    elif accelerator.num_processes > 1:  # every process leaves together
        accelerator.wait_for_everyone()
    return RunResult(run.run_dir, summary, notes=run.notes)


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """The summary of a run that already finished in this config's directory, if any."""
    path = config.run_dir() / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        raise ConfigError(
            f"{path} cannot be read as a run's summary: move it aside, and --resume finishes the run again from its "
            "newest checkpoint"
        )
    return summary
