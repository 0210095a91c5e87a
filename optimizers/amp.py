"""Any variant under ``torch.amp.GradScaler``: every pass scaled, each gradient unscaled once before the
variant reads it, an overflow in any pass skipping the whole step, the scale updated once per step.

    scaler = torch.amp.GradScaler("cuda")
    amp = ScaledStep(opt, scaler, model)
    for x, y in loader:

        def loss_fn():  # forward only: ScaledStep zeroes the grads and runs the scaled backward
            with torch.autocast("cuda", dtype=torch.float16):
                return F.cross_entropy(model(x), y)

        loss = amp.step(loss_fn)  # None when an overflow skipped the step

or, in the two-phase form:

        amp.begin()
        amp.backward(loss_at_w)
        if opt.perturbs_this_step:
            for _ in range(opt.perturbations):  # GAM: three
                opt.perturb()
                amp.backward(loss_at_the_perturbed_point)
        amp.descend()  # True when an overflow skipped the step

``GradScaler.step`` does not fit a sharpness-aware step: it unscales once per optimizer and step, and
the variant reads the gradient of every pass. Here each pass's gradient goes through the scaler's own
``unscale_`` (it records that pass's overflow check, which ``update`` reads), right after its backward:
the variant always sees true gradients (Fisher SAM, F-SAM and bSAM depend on their size). The step is
undone when any pass overflowed, from a :class:`~optimizers.snapshot.StepSnapshot` taken before it
(weights, BatchNorm buffers, the optimizer's state): one extra copy of each in memory, one copy of each
per step in time, and one host read per step (the skip decision, as ``GradScaler.step`` makes).
With a plain loss function ESAM and bSAM run as with a plain closure (see optimizers.closure).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from optimizers.base import SharpnessAwareOptimizer
from optimizers.snapshot import StepSnapshot
from optimizers.tensors import GradientCheck


class _Pass:
    """What ``GradScaler.unscale_`` needs of an optimizer (its param groups), one per pass: the scaler keeps
    one record per object and step, so each pass is unscaled through its own."""

    def __init__(self, param_groups):
        self.param_groups = param_groups


class ScaledStep:
    """One sharpness-aware step (or a plain torch optimizer's) per :meth:`step` under ``scaler``."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, model: nn.Module):
        # a prepared optimizer (Accelerate's wrapper, holding it as .optimizer) would step through the scaler
        # itself: the step is driven on the optimizer it wraps
        inner = getattr(optimizer, "optimizer", None)
        self.optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self.scaler = scaler
        self.snapshot = StepSnapshot(model)
        self._passes: list[_Pass] = []
        self._found: Tensor | None = None
        self._check: GradientCheck | None = None  # the optimizer's parameters' grouping, kept while they stay

    # -- the two-phase form: begin(), backward() per pass (perturb() between), descend() ------------------

    def begin(self) -> None:
        """Before a step's first pass: the snapshot an overflow is undone from."""
        self.snapshot.save(self.optimizer)
        self._passes, self._found = [], None

    def backward(self, loss: Tensor) -> None:
        """The scaled backward of one pass, then its gradients unscaled through the scaler."""
        self.scaler.scale(loss).backward()
        self._passes.append(_Pass(self.optimizer.param_groups))
        self.scaler.unscale_(self._passes[-1])
        # the unscaled gradients hold an inf or a NaN wherever a scaled one overflowed
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self._check is None or not self._check.covers(params):
            self._check = GradientCheck(params)
        flag = self._check()
        self._found = flag if self._found is None else self._found + flag

    def descend(self) -> bool:
        """End the step: the variant's descent (a plain optimizer's step), or, when a pass overflowed, the
        weights and the optimizer's state as before it; then the scale's one update. Returns whether skipped."""
        skipped = self._overflowed()
        sharpness_aware = isinstance(self.optimizer, SharpnessAwareOptimizer)
        if skipped and sharpness_aware:
            self.optimizer.restore()  # out of the perturbed pass: BatchNorm statistics resume
        elif sharpness_aware:
            self.optimizer.descend()
        elif not skipped:
            self.optimizer.step()
            self.optimizer.zero_grad()
        self._end(skipped)
        return skipped

    def _overflowed(self) -> bool:
        """Whether any pass of this step overflowed: the step's one host read."""
        return self._found is not None and bool(self._found.item())

    def _end(self, skipped: bool) -> None:
        """Undo a skipped step from the snapshot, then the scale's one update."""
        if skipped:
            self.snapshot.restore(self.optimizer)
            self.optimizer.zero_grad()
        self.scaler.update()
        self._passes = []

    # -- the closure form ---------------------------------------------------------------------------

    def step(self, loss_fn: Callable[[], Tensor]) -> Tensor | None:
        """Every pass the optimizer asks for, with ``loss_fn``'s loss (forward only); the first pass's loss,
        or None when a pass overflowed: then the weights and the optimizer's state are as before the step
        and the scale backs off."""
        self.begin()

        def closure() -> Tensor:
            self.optimizer.zero_grad()
            loss = loss_fn()
            self.backward(loss)
            return loss.detach()

        loss = self.optimizer.step(closure)  # the variant's own step: its passes, perturbations and descent
        skipped = self._overflowed()
        self._end(skipped)
        return None if skipped else loss
