"""What ``perf --harness`` times: one contender's step, and what it needs to count what that step dispatches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    first_step_s: float = 0.0
    passes: Callable[[], float] | None = None  # forward-backward passes per timed step
    #: one forward-backward pass of its model on its batch, and the passes its last step ran: for
    #: counting what a step dispatches beyond its passes (bench.studies.dispatch)
    forward_backward: Callable[[], None] | None = None
    last_passes: Callable[[], float] = lambda: 1.0
