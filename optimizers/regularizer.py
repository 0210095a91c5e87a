"""Loss regularisers: extra per-sample terms that a method adds to the training loss.

Some methods are not update rules but extra loss terms that need more than
``(outputs, targets)``: the identity of each sample (SAF's logits from earlier epochs),
the inputs (MESA's forward of an EMA copy of the model), or state that changes after
every step (MESA's EMA weights). Such a method is registered as an optimizer that takes
plain base-optimizer steps and names its regulariser on its class::

    class SAF(SharpnessAwareOptimizer):
        loss_regularizer = SAFRegularizer

A training loop that supports regularisers does, without naming any method:

1. after building the model (before wrapping it for data parallelism) and the optimizer,
   :func:`build_regularizer` builds ``type(optimizer).loss_regularizer`` (``None``: there
   is nothing to do) and attaches it to the optimizer (``optimizer.regularizer``: an
   optimizer that declares a term refuses to step without it) from the model, the training-set size, the number of classes, the
   device, the optimizer's global (not per-group) settings and, with several processes,
   a ``gather`` that concatenates a tensor over processes (``accelerator.gather``);
2. in every pass, adds ``extra_loss(outputs, sample_ids, epoch, inputs)`` to the
   per-sample loss, for the samples of that pass (the micro-batch, the sub-batch a
   variant requested); ``sample_ids`` index the training set, ``epoch`` counts from 0;
3. after every step calls ``after_step(model, skipped=...)`` with the model itself
   (not its data-parallel wrapper); ``skipped`` is True for a step dropped for a
   non-finite loss or gradient (then whatever ``extra_loss`` noted is dropped too);
   every process must make this call, and every process must have noted as many
   samples, since a regulariser may gather across processes here;
4. checkpoints ``state_dict()`` with the run and restores it with ``load_state_dict()``
   on resume, so that a resumed run repeats the uninterrupted one exactly.

The loop reports the task loss (without the extra term) in its training metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LossRegularizer:
    """The protocol: an extra per-sample loss term, with state kept across steps.

    ``gather(t)``: ``t`` of every process concatenated along dim 0 in process order (the
    identity in a single process). Subclasses take their settings as keyword arguments.
    """

    #: Whether ``extra_loss`` reads ``sample_ids`` as stable indices into the training set (a
    #: loop that cannot give them, such as one reading a shuffled stream, refuses the method).
    needs_sample_ids = False

    def __init__(
        self,
        model: nn.Module,
        num_train: int,
        num_classes: int,
        device: torch.device | str,
        *,
        gather: Callable[[Tensor], Tensor] | None = None,
        **settings: Any,
    ):
        if settings:
            raise ValueError(f"{type(self).__name__} takes no setting(s) {', '.join(sorted(settings))}")
        self.num_train, self.num_classes, self.device = num_train, num_classes, torch.device(device)
        self.gather = gather or (lambda t: t)

    def extra_loss(self, outputs: Tensor, sample_ids: Tensor, epoch: int, inputs: Tensor) -> Tensor:
        """The term per sample (shape ``[len(outputs)]``), differentiable through ``outputs`` only.

        ``inputs`` are what the model turned into ``outputs``. May note ``outputs`` (detached)
        for :meth:`after_step`; outputs that need no gradient (an evaluation pass) are not noted.
        """
        raise NotImplementedError

    def after_step(self, model: nn.Module, skipped: bool = False) -> None:
        """Called once after every step (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_regularizer(
    optimizer, model: nn.Module, num_train: int, num_classes: int, device, gather: Callable[[Tensor], Tensor] | None = None
) -> LossRegularizer | None:
    """The regulariser ``type(optimizer)`` declares, with the optimizer's global settings; None if none."""
    cls = getattr(type(optimizer), "loss_regularizer", None)
    if cls is None:
        return None
    settings = {s.name: getattr(optimizer, s.name) for s in type(optimizer).settings if not s.per_group}
    regularizer = cls(model, num_train, num_classes, device, gather=gather, **settings)
    optimizer.regularizer = regularizer  # the optimizer steps only with its term attached
    return regularizer


def distillation_kl(outputs: Tensor, reference: Tensor, tau: float) -> Tensor:
    """``tau^2 KL(softmax(reference / tau) || softmax(outputs / tau))`` per sample.

    No gradient reaches ``reference``. Computed from log-softmaxes in at least float32
    (the official code takes the log of a softmax, which can underflow to -inf).
    """
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    log_q = F.log_softmax(outputs.to(dtype) / tau, dim=-1)
    log_p = F.log_softmax(reference.detach().to(dtype) / tau, dim=-1)
    return tau**2 * F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


class WindowedKL(LossRegularizer):
    """``lam * tau^2 * KL(softmax(z_ref / tau) || softmax(z / tau))`` for kl_start < epoch < kl_end.

    Subclasses say where ``z_ref`` comes from (:meth:`reference`). ``kl_end`` None: no end.
    """

    def __init__(
        self,
        model,
        num_train,
        num_classes,
        device,
        *,
        lam: float,
        tau: float,
        kl_start: int,
        kl_end: int | None = None,
        gather=None,
        **settings,
    ):
        super().__init__(model, num_train, num_classes, device, gather=gather, **settings)
        self.lam, self.tau, self.kl_start, self.kl_end = lam, tau, kl_start, kl_end

    def active(self, epoch: int) -> bool:
        return self.kl_start < epoch and (self.kl_end is None or epoch < self.kl_end)

    def reference(self, outputs: Tensor, sample_ids: Tensor, epoch: int, inputs: Tensor) -> tuple[Tensor, Tensor | None]:
        """(z_ref, mask): the reference logits and which samples have one (None: all)."""
        raise NotImplementedError

    def extra_loss(self, outputs, sample_ids, epoch, inputs):
        dtype = torch.promote_types(outputs.dtype, torch.float32)
        if not self.active(epoch) or self.lam == 0:
            return torch.zeros(len(outputs), dtype=dtype, device=outputs.device)
        z_ref, has_reference = self.reference(outputs, sample_ids, epoch, inputs)
        term = self.lam * distillation_kl(outputs, z_ref, self.tau)
        return term if has_reference is None else torch.where(has_reference, term, torch.zeros_like(term))
