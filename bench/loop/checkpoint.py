"""Checkpoints and the exported model.

A checkpoint (``accelerator.save_state``, weights as safetensors) holds the model, the
optimizer (base buffers and variant state), the scheduler, every RNG and the loop's
:class:`~bench.loop.TrainState`, so a resumed run repeats exactly what the uninterrupted
one would have done. It is written to a temporary folder, marked complete, then renamed:
a crash never leaves a partial checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.errors import UserError
from bench.io import atomic_path, write_json

COMPLETE = "complete.json"
MODEL_FILE = "model.safetensors"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read; one line, with what is still there."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> None:
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
            + (
                f"earlier checkpoints are intact in {checkpoint.parent}: {', '.join(others)}; "
                "remove the bad one to resume from them"
                if others
                else "no earlier checkpoint is left"
            )
        ) from None


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def last_finite_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose model weights are all finite."""
    for checkpoint in reversed(checkpoints(run_dir)):
        weights = checkpoint / MODEL_FILE
        if weights.is_file() and _finite(load_file(weights)):
            return checkpoint
    return None


def export_model(model: nn.Module, run_dir: Path) -> str | None:
    """Write the model's weights to run_dir/model.safetensors; returns None when written, else why not.

    A model with non-finite weights (a diverged run) is never exported as the result: the newest
    checkpoint with finite weights is exported in its place, or nothing when there is none."""
    path = run_dir / MODEL_FILE
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    note = None
    if not _finite(state):
        fallback = last_finite_checkpoint(run_dir)
        if fallback is None:
            path.unlink(missing_ok=True)
            return "the final weights are not finite and no checkpoint holds finite ones: no model exported"
        state = load_file(fallback / MODEL_FILE)
        note = f"the final weights are not finite: exported the weights of {fallback.name}"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return note
