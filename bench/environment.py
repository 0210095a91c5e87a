"""What a run was measured on: processor, GPU, threads, library versions and machine load.

Recorded in every run's config.json and summary.json, so a result that differs between
two machines can be traced to the processor or a library version, and a time measured
while other work shared the CPU can be recognised as such.
"""

from __future__ import annotations

import os
import platform

import accelerate
import numpy
import torch

#: A 1-minute load average above this fraction of the cores counts as contention.
CONTENTION = 1.25


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
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def set_threads(threads: int | None, processes_per_machine: int = 1) -> int:
    """Set torch's intra-op thread count explicitly (default: the cores divided among the processes)."""
    torch.set_num_threads(threads or max(1, cpu_count() // processes_per_machine))
    return torch.get_num_threads()


def contended(load: float | None) -> bool:
    """Whether a 1-minute load average means other work shared the CPU (times are inflated)."""
    return load is not None and load > CONTENTION * cpu_count()


def busy_note(load_at_start: float | None, load_at_end: float | None) -> str | None:
    if contended(load_at_start) or contended(load_at_end):
        loads = ", ".join(f"{v:.1f}" for v in (load_at_start, load_at_end) if v is not None)
        return (f"the machine was busy (1-minute load {loads} on {cpu_count()} cores): this run's times are inflated "
                "and its table rows are flagged as contended")
    return None
