"""Momentum-SAM, MSAM (Becker, Altrock & Risse, arXiv 2401.12033, 2024), as the authors' SGD code computes it.

Official code: github.com/MarlonBecker/MSAM, ``optimizer/msam.py`` (class ``MSAM``).

MSAM perturbs along the momentum instead of a fresh gradient, so it takes ONE
forward-backward pass per step. The weights the model holds between steps are the
perturbed ones,
    w~ = w - rho * c * v,        c = 1 / (||v|| + 1e-12)   (c = 0 before the first step),
with v the momentum buffer and ||v|| one norm over every buffer of every group. A step
receives g = grad L(w~) and, per tensor:
    d  = g + weight_decay * w~        weight decay on the PERTURBED weights (official code)
    w  = w~ + rho * c * v             undo the last perturbation
    v  = momentum * v + d             (v = d on a tensor's first step)
    w  = w - lr * v
then recomputes c from the new buffers and stores w~ = w - rho * c * v again.

:meth:`evaluation_weights` swaps the unperturbed w = w~ + rho c v in (computed exactly as
the next step would compute it) and puts w~ back bit for bit afterwards: the harness
evaluates and exports w, and checkpoints w~ with (v, c) in the optimizer's state, so a
resumed run continues bit for bit. The official loop moves to w and back around each
evaluation by adding and subtracting rho c v, which is exact only up to rounding.

Paper and code: the paper's algorithm has no weight decay; the code adds it to the
gradient, computed at w~ (kept here). The code's ``nesterov`` argument is unused (not
offered here). The code allows one parameter group; here every group has its own lr,
momentum, weight_decay and rho, and c is one norm over all groups (with one group this
is the official update). The code restores, updates and re-perturbs only the tensors
that got a gradient this step and normalises by their buffers only; here every tensor
that has a buffer is restored and re-perturbed and counts in the norm, while only
tensors with a gradient are updated (the same whenever every tensor gets a gradient,
as in the official runs). The code creates the buffers as zeros for every parameter at
construction; here a tensor gets its buffer with its first gradient (the same values).
The AdamW variant (``optimizer/adamW_msam.py``) is not implemented.

Defaults: the authors' CIFAR-100 WRN-16-4 config (``configs/CIFAR100_WRN16_4.ini``, and
the README's MSAM command): rho 3, lr 0.5, momentum 0.9, weight decay 5e-4 (the
ResNet-50 config: lr 0.1, weight decay 1e-3; the class default rho is 0.3). Through the
harness (``bench.resolve.optimizer_settings``) a variant with its own update rule gets the
run's ``--lr``, and the run's ``--momentum`` and ``--weight_decay`` where it declares
them, as this one does: an MSAM run takes all three from the run's flags (the flags'
defaults when not given, not the class defaults above), and its own flag ``--rho`` on
top; ``--optimizer`` and ``--nesterov`` do not apply. Through the Python API the class
defaults hold unless given.

BatchNorm: the one pass updates the running statistics, at w~, as in the official loop
(nothing is frozen: ``freezes_batchnorm`` is False). The official ``main.py`` re-estimates
them at w with an extra forward-only epoch after training; this project does not.
"""

import contextlib

import torch

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting
from .tensors import copy_tensors, global_norm

EPS = 1e-12
CONFIG = "authors' CIFAR-100 WRN-16-4 config"


class MSAM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 3.0, range="[0, inf)", source=CONFIG, help="perturbation radius along the momentum"),
        Setting("lr", 0.5, range="[0, inf)", source=CONFIG, help="learning rate (the harness's --lr)"),
        Setting("momentum", 0.9, range="[0, 1)", source=CONFIG, help="momentum of the buffer v"),
        Setting(
            "weight_decay",
            5e-4,
            range="[0, inf)",
            source=CONFIG,
            help="L2 weight decay, added to the gradient at the perturbed weights",
        ),
    )
    paper = "Becker et al., arXiv'24"
    rule = "one pass at w~ = w - rho v/||v||; v = mu v + g(w~) + wd w~; w -= lr v"
    passes = "1"
    extra_memory = 1
    memory_note = "momentum buffer; no base optimizer"
    uses_base_optimizer = False
    #: The one pass updates the BatchNorm statistics, at w~, as in the official loop.
    freezes_batchnorm = False
    undone_by_restore = True  # its one pass moves nothing; the update follows it

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        if base_optimizer not in ("sgd", None):
            raise ValueError(f"MSAM has its own update rule; base optimizer {base_optimizer!r} does not apply")
        super().__init__(params, None, **kwargs)

    # -- the one-pass protocol: the pass is the descent pass, at the stored (perturbed) weights

    @property
    def perturbs_this_step(self) -> bool:
        return False

    def perturb(self, zero_grad: bool = True):
        raise NotImplementedError("MSAM takes one pass per step: backward at the stored weights, then descend()")

    def _inverse_norm(self, device) -> torch.Tensor:
        """c: 1 / (||v|| + 1e-12) as of the last step, 0 before the first."""
        c = self.state.get("inverse_norm")
        return torch.zeros((), device=device) if c is None else c.to(device)

    def _buffered(self) -> list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]]:
        """(group, tensors that have a momentum buffer, their buffers) for every group."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if "momentum_buffer" in self.state[p]]
            out.append((group, params, [self.state[p]["momentum_buffer"] for p in params]))
        return out

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        """The MSAM update from the gradient at w~ in ``.grad``; leaves the model at the new w~."""
        self.clip_descent_gradient()  # g, before weight decay joins it, as a plain loop's clip_grad_norm_
        with_grad = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        for group, params in with_grad:  # d = g + wd * w~ (the model still holds w~)
            if params and group["weight_decay"]:
                torch._foreach_add_(self.grads(params), params, alpha=group["weight_decay"])
        self._perturb_along_momentum(+1.0)  # back to w
        for group, params in with_grad:
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        buffers = [b for _, _, bs in self._buffered() for b in bs]
        if buffers:
            self.state["inverse_norm"] = 1.0 / (global_norm(buffers) + EPS)
        self._perturb_along_momentum(-1.0)  # to the new w~
        if zero_grad:
            self.zero_grad()

    def _perturb_along_momentum(self, sign: float) -> None:
        """w += sign * rho * c * v on every tensor with a buffer (+1: w~ to w, -1: w to w~)."""
        for group, params, buffers in self._buffered():
            if params:
                scale = self._inverse_norm(params[0].device) * (sign * group["rho"])
                torch._foreach_add_(params, torch._foreach_mul(buffers, scale))

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The unperturbed w = w~ + rho c v in the model (as the next step computes it); w~ back bit for bit afterwards."""
        with torch.no_grad():
            params = [p for _, ps, _ in self._buffered() for p in ps]
            kept = [p.detach().clone() for p in params]
            self._perturb_along_momentum(+1.0)
        try:
            yield
        finally:
            if params:
                with torch.no_grad():
                    copy_tensors(params, kept)
