"""What one training step dispatches, counted with a torch dispatch mode (``perf --harness``).

- Operators outside the model's forward and backward: every ATen operator the step dispatches, less
  those of the forward-backward passes it ran (counted on the same model and batch as a plain loop
  runs them). On a GPU each is at least one kernel launch: the per-step bookkeeping (flags, sums,
  schedule, snapshot, the optimizer's arithmetic) that bounds small and medium models.
- Host reads: a device value read by the host (``.item()``, ``bool()``, ``int()`` of a tensor, a copy to
  the host). On a GPU each one waits for the device: a synchronisation.

Operators a compiled graph runs inside its own kernels are not dispatched one by one and are not
counted, which is what compiling buys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def _device_of(value) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, and the host reads among them."""

    def __init__(self):
        super().__init__()
        self.operators = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.operators += 1
        if func is _SCALAR_READ:
            self.host_reads += 1
        elif func in _COPIES:
            source, target = _device_of(args[1] if func is _COPIES[1] else args[0]), _device_of(out)
            if source is not None and target is not None and source.type != "cpu" and target.type == "cpu":
                self.host_reads += 1
        return out


def counted(fn: Callable[[], object]) -> OperatorCounter:
    with OperatorCounter() as counter:
        fn()
    return counter


@dataclass(frozen=True)
class StepCounts:
    operators_outside_passes: int  # per step, beyond the forward-backward passes it ran
    host_reads: int  # per step


def step_counts(step: Callable[[], object], forward_backward: Callable[[], object], passes: Callable[[], float]) -> StepCounts:
    """One call of ``step`` counted; ``passes()`` is the forward-backward passes that call ran, each of which
    dispatches what one ``forward_backward()`` does."""
    whole = counted(step)
    ran = passes()
    one_pass = counted(forward_backward)
    return StepCounts(round(whole.operators - ran * one_pass.operators), whole.host_reads)
