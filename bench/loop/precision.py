"""Dynamic loss scaling for fp16 across the passes of a sharpness-aware step.

Every pass of a step uses the same scale; the gradients are unscaled right after
each backward (the loop calls :meth:`LossScaler.unscale_`), so every variant sees
true gradients (Fisher SAM, F-SAM and bSAM depend on their magnitude). A non-finite
gradient in any pass makes the loop skip the step (see :mod:`bench.loop.step`), leave the
weights as they were and call ``update(skipped=True)``, which halves the scale.
The scale doubles after ``growth_interval`` clean steps. ``torch.amp.GradScaler``
does not fit: it allows one unscale per optimizer between updates, and a SAM step
needs one per pass.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from optimizers.tensors import local_tensor


class NonFiniteGradient(RuntimeError):
    pass


def unscale_and_check(
    params: list[Tensor], inv_scale: float = 1.0, found: Tensor | None = None, also_check: Tensor | None = None
) -> Tensor:
    """Multiply the gradients by ``inv_scale`` in place (1.0: leave them) and return a 0-dim float flag,
    nonzero if any gradient (or ``also_check``, left unscaled) holds an inf or a NaN: ``found`` when
    given (the flag is set in it, never cleared, so one tensor gathers a whole step), else a new one on
    the first gradient's device. One fused kernel per (device, dtype); no host synchronisation."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]  # a sharded gradient: this process's shard
    if found is None:
        device = grads[0].device if grads else (also_check.device if also_check is not None else torch.device("cpu"))
        found = torch.zeros((), device=device)
    if also_check is not None:
        torch._amp_foreach_non_finite_check_and_unscale_([also_check.detach().reshape(1)], found, _one(found.device))
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for grad in grads:
        by_device[grad.device].append(grad)
    for grad_device, same_device in by_device.items():
        flag = found if grad_device == found.device else torch.zeros((), device=grad_device)
        scale = _one(grad_device) if inv_scale == 1.0 else torch.full((), inv_scale, device=grad_device)
        torch._amp_foreach_non_finite_check_and_unscale_(same_device, flag, scale)
        if flag is not found:
            found += flag.to(found.device)
    return found


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A 1.0 on ``device``, made once: the unscale factor of an unscaled pass costs no kernel."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones((), device=device)
    return one


class LossScaler:
    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, backoff: float = 0.5, growth: float = 2.0):
        self.scale, self.growth_interval, self.backoff, self.growth = init_scale, growth_interval, backoff, growth
        self.clean_steps = 0

    def backward(self, loss: Tensor) -> None:
        (loss.float() * self.scale).backward()

    def unscale_(self, params: list[Tensor]) -> Tensor:
        """Divide the gradients by the scale in place; returns a 0-dim flag, nonzero if any was not finite."""
        return unscale_and_check(params, 1.0 / self.scale)

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
