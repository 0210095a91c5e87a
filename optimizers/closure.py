"""The closure contract between a training loop and the sharpness-aware optimizers.

A plain closure, ``closure()``, zeroes the gradients, runs forward and backward on the
whole batch and returns the loss: that is all most variants need, and what
``torch.optim`` optimizers take too.

Some variants need more than "the whole batch, mean loss": ESAM selects the samples
whose loss rises most under the perturbation, bSAM splits the batch into m
sub-batches. They ask a closure for it with keywords, and only a closure that
declares ``accepts_requests = True`` is asked:

    closure(subset=None, per_sample=False, backward=True, phase="descent")

- ``subset``: a ``slice`` or an index tensor selecting part of the batch;
- ``per_sample``: return the per-sample losses (the backward still uses their mean);
- ``backward``: False evaluates under ``no_grad`` and leaves the gradients alone;
- ``phase``: ``"ascent"`` for a pass whose gradient defines a perturbation,
  ``"descent"`` for a pass whose gradient the update uses, ``"select"`` for a
  gradient-free evaluation. A plain call is a descent pass (what a torch optimizer
  asks for). Distributed loops use the phase to decide where gradients are
  all-reduced (see ``bench.loop``); single-process closures may ignore it.

:class:`BatchClosure` implements the contract for the usual (model, loss, batch) case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

PHASES = ("ascent", "descent", "select")


class BatchClosure:
    """Closure over one batch that can evaluate parts of it.

    ``loss_fn(outputs, targets)`` must return per-sample losses (e.g.
    ``nn.CrossEntropyLoss(reduction="none")``). ``backward`` replaces
    ``loss.backward()`` (e.g. ``accelerator.backward``); without it, a whole-batch pass
    differentiates the per-sample losses with the mean's gradient (1/n each) given
    directly, the gradients of ``losses.mean().backward()`` bit for bit with one autograd
    node fewer. With ``accumulation_steps`` A every pass runs as A micro-batches whose
    gradients add up to the full-batch mean.

    Data parallel: ``no_sync`` makes a context in which a backward's gradients stay on this
    process (``lambda: accelerator.no_sync(model)``, or a DDP module's ``no_sync``). Every
    micro-batch but a pass's last runs in it, and so does the ascent pass unless
    ``ascent_sync`` (the optimizer's :attr:`~optimizers.base.SharpnessAwareOptimizer.ascent_sync`)
    is ``"global"``: one all-reduce per step saved, and what ESAM's ascent needs.

    The closure counts its work: ``passes`` forward-backward calls and
    ``sample_passes`` (forward-backward calls weighted by the fraction of the batch
    they used), and keeps the outputs and mean loss of its first pass (see :meth:`observe`).
    """

    accepts_requests = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        backward: Callable[[Tensor], None] | None = None,
        accumulation_steps: int = 1,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        ascent_sync: str = "global",
        params: list[Tensor] | None = None,
    ):
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if ascent_sync not in ("any", "global", "local"):
            raise ValueError(f"ascent_sync must be 'any', 'global' or 'local', got {ascent_sync!r}")
        self.no_sync, self.ascent_sync = no_sync, ascent_sync
        # a pass has no context to enter (none to keep gradients local, and :meth:`context` not overridden)
        self._no_context = no_sync is None and type(self).context is BatchClosure.context
        self.model = model
        self.loss_fn = loss_fn
        self.accumulation_steps = accumulation_steps
        self._backward = backward  # None: autograd's own backward
        self._mean_grads: dict[tuple, Tensor] = {}  # the mean's gradient by (shape, dtype, device), made once
        #: the model's parameters, where the caller keeps the list (each pass zeroes their gradients
        #: without walking the model's modules); None: ``model.zero_grad``
        self.params = params
        self.next_batch(inputs, targets)

    def next_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Make this closure one over another batch, nothing run yet (a loop may keep one closure for all its steps)."""
        self.inputs, self.targets = inputs, targets
        self.passes = 0
        self.sample_passes = 0.0
        self.outputs: Tensor | None = None
        self.loss: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.targets.shape[0]

    def context(self, phase: str, last_micro_batch: bool = True):
        """Context a pass of ``phase`` runs in: ``no_sync()`` where its gradients stay on this process."""
        if self.no_sync is not None and (not last_micro_batch or (phase == "ascent" and self.ascent_sync != "global")):
            return self.no_sync()
        return contextlib.nullcontext()

    def after_backward(self, loss: Tensor, phase: str) -> None:
        """Called after each pass's backward with its mean loss; loops override it (finiteness checks)."""

    def __call__(
        self,
        subset: slice | Tensor | None = None,
        *,
        per_sample: bool = False,
        backward: bool = True,
        phase: str = "descent",
    ) -> Tensor:
        inputs, targets = self.inputs, self.targets
        if subset is not None:
            inputs, targets = inputs[subset], targets[subset]
        n = targets.shape[0]
        # Gradient accumulation: the pass's gradient is the mean over the whole (sub)batch,
        # built from micro-batches whose losses are weighted by their share of it.
        if self.accumulation_steps == 1:  # the whole (sub)batch: no split
            micro = [(inputs, targets)] if n else []
        else:
            micro = list(zip(inputs.tensor_split(self.accumulation_steps), targets.tensor_split(self.accumulation_steps)))
            micro = [(x, y) for x, y in micro if y.shape[0]]
        if not backward:
            with torch.no_grad(), self.context("select"):
                losses = torch.cat([self.loss_fn(self.model(x), y) for x, y in micro])
            return losses.detach() if per_sample else losses.mean().detach()

        if self.params is None:
            self.model.zero_grad(set_to_none=True)
        else:
            for p in self.params:
                p.grad = None
        grad_mode = contextlib.nullcontext() if torch.is_grad_enabled() else torch.enable_grad()
        if len(micro) == 1:  # the whole (sub)batch at once: its mean loss is the pass's
            ((x, y),) = micro
            if self._no_context and torch.is_grad_enabled():  # nothing to enter (a torch optimizer's pass)
                outputs, losses = self._forward_backward(x, y)
            else:
                with grad_mode, self.context(phase):
                    outputs, losses = self._forward_backward(x, y)
            loss = self.mean_loss(losses)
        else:
            outputs, losses = [], []
            with grad_mode:
                for i, (x, y) in enumerate(micro):
                    with self.context(phase, last_micro_batch=i == len(micro) - 1):
                        out = self.model(x)
                        micro_losses = self.loss_fn(out, y)
                        (self._backward or Tensor.backward)(micro_losses.sum() / n)
                    outputs.append(out.detach())
                    losses.append(micro_losses.detach())
            outputs, losses = torch.cat(outputs), torch.cat(losses)
            loss = self.mean_loss(losses)
        self.after_backward(loss, phase)
        self.passes += 1
        self.sample_passes += n / self.batch_size
        self.observe(outputs, targets, losses, phase)
        return losses if per_sample else loss

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One forward and backward of the whole (sub)batch; its outputs and per-sample losses, detached."""
        outputs = self.model(x)
        losses = self.loss_fn(outputs, y)
        self._backward_mean(losses)
        return outputs.detach(), losses.detach()

    def mean_loss(self, losses: Tensor) -> Tensor:
        """A pass's loss: the mean of its per-sample ``losses`` (a loop may override it to keep their sum too)."""
        return losses.mean()

    def _backward_mean(self, losses: Tensor) -> None:
        """The backward of ``losses.mean()``: ``backward``'s, else autograd's from the mean's gradient, 1/numel
        per loss (the very values the mean's own backward passes on)."""
        if self._backward is not None:
            self._backward(losses.mean())
            return
        key = (losses.shape, losses.dtype, losses.device)
        grad = self._mean_grads.get(key)
        if grad is None:
            grad = self._mean_grads[key] = torch.ones(losses.shape, dtype=losses.dtype, device=losses.device) / losses.numel()
        torch.autograd.backward(losses, grad)

    def observe(self, outputs: Tensor, targets: Tensor, losses: Tensor, phase: str) -> None:
        """Called after every backward pass; keeps the outputs and loss of the first one."""
        if self.passes == 1:
            self.outputs, self.loss = outputs, losses.mean()


def accepts_requests(closure: Callable) -> bool:
    return bool(getattr(closure, "accepts_requests", False))
