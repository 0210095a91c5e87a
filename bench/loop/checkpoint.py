"""Checkpoints and the exported model.

A checkpoint holds the model (``model.safetensors``), each process's random number generators
(Accelerate's ``random_states_N.pkl``) and, in ``trainer_state.pt``, the optimizer (base buffers and
variant state), the scheduler, the loop's :class:`~bench.loop.TrainState` and a loss term's state: a
resumed run repeats exactly what the uninterrupted one would have done. What differs between processes
(each one's running sums of the epoch; a variant's state built from a per-replica ascent gradient) is
written by each process other than the first to its own ``trainer_state_N.pt``.

Nothing in a checkpoint can run code when it is read: the model is safetensors, and every pickle-format
file is read with ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain containers
only. ``complete.json`` is written last and lists every file with its SHA-256; a resume checks them
all first, names a damaged checkpoint in one line and resumes from the newest intact one. A checkpoint
is written to a temporary folder, then renamed: a crash never leaves a partial one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file
from torch import nn

from bench.errors import UserError
from bench.io import atomic_path, read_json, write_json

COMPLETE = "complete.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
#: the state that process N > 0 holds on its own (see save_checkpoint's ``per_process``)
PROCESS_STATE_FILE = "trainer_state_{}.pt"
#: how each process's random generators are named by Accelerate (the only files it reads back)
RNG_FILE = "random_states_{}.pkl"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read; one line, with what is still there."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    accelerator, run_dir: Path, step: int, keep: int, objects: dict[str, Any], per_process: tuple[str, ...] = ()
) -> None:
    """Write checkpoint ``step`` of the run: the model and random generators (Accelerate), then the
    ``state_dict`` of each of ``objects`` (every process takes part: a sharded optimizer gathers), the
    first process's in one file and, of those named in ``per_process``, each other process's in its own;
    then the manifest."""
    root = run_dir / "checkpoints"
    tmp, final = root / f".tmp_step_{step:08d}", root / f"step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    states = {name: obj.state_dict() for name, obj in objects.items()}
    failure = None
    if per_process and not accelerator.is_main_process:
        own = tmp / PROCESS_STATE_FILE.format(accelerator.process_index)
        try:
            torch.save({name: states[name] for name in per_process}, own)
        except Exception as err:  # OSError, or torch.save's RuntimeError on a full disk
            failure = f"{own} could not be written ({type(err).__name__}: {err})"
    _stop_together(accelerator, failure)  # every file is there before the manifest lists them
    if accelerator.is_main_process:
        try:
            torch.save(states, tmp / STATE_FILE)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            manifest = {name: sha256(tmp / name) for name in files}
            complete = {"step": step, "world_size": accelerator.num_processes, "per_process": list(per_process)}
            write_json(tmp / COMPLETE, {**complete, "sha256": manifest})
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            for old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as err:  # a full disk, a folder gone: every process stops, none waits for the others
            failure = f"checkpoint {final} could not be written ({type(err).__name__}: {err})"
    _stop_together(accelerator, failure)


def _stop_together(accelerator, failure: str | None) -> None:
    """Every process learns whether any failed (one all-reduce, which each reaches), and all raise if one did:
    a process that went on alone would wait forever in the next collective."""
    failed = failure is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item())
    if failed:
        raise CheckpointError(failure or "another process could not write or read the checkpoint; its message says why")


def _complete(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's complete.json (step, world_size, sha256), or None when unreadable."""
    try:
        complete = read_json(checkpoint / COMPLETE)
    except (OSError, ValueError):
        return None
    return complete if isinstance(complete, dict) else None


def damage(checkpoint: Path, world_size: int, complete: dict[str, Any] | None) -> str | None:
    """Why ``checkpoint`` cannot be trusted (None when every file it needs matches the manifest in its
    ``complete``, the content of its complete.json, each process's own state among them where it has one)."""
    if complete is None:
        return f"{COMPLETE} is unreadable"
    manifest = complete.get("sha256")
    if not isinstance(manifest, dict):
        return "it has no file manifest (written by an earlier version, whose pickled state is never read)"
    needed = [MODEL_FILE, STATE_FILE, *(RNG_FILE.format(rank) for rank in range(world_size))]
    if complete.get("per_process"):
        needed += [PROCESS_STATE_FILE.format(rank) for rank in range(1, world_size)]
    for name in [*needed, *sorted(set(manifest) - set(needed))]:
        path = checkpoint / name
        if name not in manifest:
            return f"{name} is not in its manifest"
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != manifest[name]:
            return f"{name} does not match its SHA-256"
    return None


def load_checkpoint(accelerator, run_dir: Path, objects: dict[str, Any], per_process: tuple[str, ...] = ()) -> list[str]:
    """Load the newest intact checkpoint into the model, the random generators and ``objects`` (those named in
    ``per_process`` from this process's own file); returns a note per damaged checkpoint passed over.
    CheckpointError when none is intact or one cannot be loaded."""
    notes, world = [], accelerator.num_processes
    for checkpoint in reversed(checkpoints(run_dir)):
        complete = _complete(checkpoint)
        saved_by = complete.get("world_size") if complete is not None else None
        if isinstance(saved_by, int) and saved_by != world:
            raise CheckpointError(
                f"{run_dir} was run by {saved_by} process(es), this resume by {world}: resume it with {saved_by} "
                "(the data each process reads, and so the result, depend on the number)"
            )
        why = damage(checkpoint, world, complete)
        if why is None:
            break
        notes.append(f"checkpoint {checkpoint} is damaged ({why}); not used")
    else:
        raise CheckpointError(f"{'; '.join(notes)}; no intact checkpoint is left in {run_dir / 'checkpoints'}")
    failure = None
    try:
        # read first by the same weights-only reader Accelerate uses, which Accelerate would let fail silently
        accelerate_load(checkpoint / RNG_FILE.format(accelerator.process_index))
        accelerator.load_state(str(checkpoint))
        states = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        saved_own = complete.get("per_process") or []
        if saved_own and not accelerator.is_main_process:
            own = checkpoint / PROCESS_STATE_FILE.format(accelerator.process_index)
            states.update(torch.load(own, map_location="cpu", weights_only=True))
        if set(per_process) - set(saved_own):  # written by an earlier version, with process 0's state only
            notes.append(
                f"checkpoint {checkpoint.name} holds process 0's state only (an earlier version's): the other processes "
                f"resume their {' and '.join(sorted(set(per_process) - set(saved_own)))} from it, which may make the run "
                "differ from an uninterrupted one (this epoch's training metrics, a per-replica ascent's state)"
            )
        for name, obj in objects.items():
            obj.load_state_dict(states[name])
    except Exception as err:  # a file that matches its manifest but does not load: say which checkpoint
        reason = " ".join(str(err).split())
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in reason:  # never loaded otherwise
            reason = "it holds objects beyond tensors and plain values, which are never unpickled here"
        reason = reason[:200]
        failure = (
            f"checkpoint {checkpoint} cannot be loaded ({type(err).__name__}: {reason}); move it aside to resume from an "
            "earlier one, or start the run again"
        )
    _stop_together(accelerator, failure)
    if notes:
        notes.append(f"resumed from {checkpoint.name}")
    return notes


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
