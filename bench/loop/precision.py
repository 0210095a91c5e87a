"""Dynamic loss scaling for fp16 across the passes of a sharpness-aware step.

Every pass of a step uses the same scale; the gradients are unscaled right after
each backward (the loop's closure, with the inverse of :attr:`LossScaler.scale`), so every variant sees
true gradients (Fisher SAM, F-SAM and bSAM depend on their magnitude). A non-finite
gradient in any pass makes the loop skip the step (see :mod:`bench.loop.step`), leave the
weights as they were and call ``update(skipped=True)``, which halves the scale.
The scale doubles after ``growth_interval`` clean steps. ``torch.amp.GradScaler``
does not fit: it allows one unscale per optimizer between updates, and a SAM step
needs one per pass.
"""

from __future__ import annotations

from torch import Tensor


class NonFiniteGradient(RuntimeError):
    pass


class LossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, backoff: float = 0.5, growth: float = 2.0):
        self.scale, self.growth_interval, self.backoff, self.growth = init_scale, growth_interval, backoff, growth
        self.clean_steps = 0

    def backward(self, loss: Tensor) -> None:
        (loss.float() * self.scale).backward()

    def update(self, skipped: bool) -> None:
        if skipped:
            self.scale *= self.backoff
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
