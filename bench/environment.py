"""What a run was measured on: processor, GPU, threads, library versions and machine load.

Recorded in every run's config.json and summary.json, so a result that differs between
two machines can be traced to the processor or a library version, and a time measured
while other work shared the CPU can be recognised as such.
"""

from __future__ import annotations

import os
import platform
import subprocess
from functools import cache
from importlib.metadata import version
from pathlib import Path

import numpy
import torch

#: A 1-minute load average above this fraction of the cores counts as contention (oversubscribed).
CONTENTION = 1.25
#: Load beyond a run's own busy threads that counts as contention: another busy process ran beside it.
SHARED = 0.5


def processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def describe(device: torch.device) -> dict:
    """The machine and the software, for config.json."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "processor": processor(),
        "cpu_count": cpu_count(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": version("accelerate"),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


#: the paths whose changes change what a run computes (for code_version's dirty flag)
CODE_PATHS = ("optimizers", "architectures", "bench", "launch.py", "pyproject.toml")


@cache
def code_version() -> dict:
    """The project's version, and the git commit of its source tree with whether files differ from it
    (``dirty``: uncommitted changes under CODE_PATHS); commit and dirty are None where the code is not a git checkout (an installed wheel)."""
    from optimizers import __version__

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # the code only: a results table or a README edited since the commit does not change what a run computes
    status = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) if commit else None
    return {"version": __version__, "commit": commit, "dirty": None if status is None else bool(status)}


def set_threads(threads: int | None, processes_per_machine: int = 1) -> int:
    """Set torch's intra-op thread count explicitly (default: the cores divided among the processes)."""
    torch.set_num_threads(threads or max(1, cpu_count() // processes_per_machine))
    return torch.get_num_threads()


def own_threads(torch_threads: int | None, processes: int | None) -> int | None:
    """The busy threads a run itself puts on its machine, what its load is compared with (None if unknown)."""
    return (torch_threads or 0) * (processes or 1) or None


def oversubscribed(loads: tuple[float | None, ...], cores: int | None = None) -> bool:
    """Whether a run's 1-minute load averages (at start and end) exceeded 1.25x the cores: more busy
    threads than cores, so its times are inflated by an unknown factor (up to tenfold here)."""
    return any(load is not None and load > CONTENTION * (cores or cpu_count()) for load in loads)


#: set in the environment of a run that a launcher starts beside others on one machine (bench.studies.launchers):
#: its summary says ``contended`` whatever the loads were
SIDE_BY_SIDE = "SAM_BENCH_SIDE_BY_SIDE"


def contended(loads: tuple[float | None, ...], own: float | None = None, cores: int | None = None) -> bool:
    """Whether other work shared the machine during a run, so its times are inflated: it was
    oversubscribed, or a load exceeded the run's own busy threads (``own``: torch threads x processes)
    by more than SHARED.  The second catches a run beside another on a machine with a core to spare:
    both slow down through the caches and memory bandwidth they share (two single-threaded ResNet-8
    runs on 2 cores: ESAM's step ratio 2.02 against 1.73 alone).  A sweep's previous run still weighs
    on the load at start, so the runs of one sequential sweep should use one thread count; a false
    flag only withholds or flags a time ratio."""
    shared = own is not None and any(load is not None and load > own + SHARED for load in loads)
    return shared or oversubscribed(loads, cores)


def busy_note(loads: tuple[float | None, ...], own: float) -> str:
    """The note of a run found ``contended``."""
    shown = ", ".join(f"{v:.1f}" for v in loads if v is not None)
    return (
        f"other work shared the machine (1-minute load {shown} on {cpu_count()} cores, this run's own "
        f"threads {own:g}): this run's times are inflated and its table rows are flagged as contended"
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
