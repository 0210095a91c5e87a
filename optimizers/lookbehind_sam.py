"""Lookbehind-SAM (Mordido, Malviya, Baratin & Chandar, ICML'24, arXiv 2307.16704), as the official code computes it.

Official code: github.com/chandar-lab/Lookbehind-SAM, ``lookbehind.py`` (``LookbehindSAM``)
and its loop in ``example_cifar.py``.

One step runs k inner SAM steps on the SAME batch, then one "lookbehind" step. With the
slow weights s (what the model holds between steps), u_0 = phi_0 = s, and for j = 1..k:
    g_j    = grad L(u_{j-1})                                   (pass 2j - 1, "ascent")
    u_j    = u_{j-1} + rho g_j / (||g_j|| + 1e-16)             perturbations ACCUMULATE from s
    a_j    = grad L(u_j)                                       (pass 2j, "descent")
    phi_j  = base optimizer step from phi_{j-1} with a_j       (its state, e.g. momentum, persists)
then, per parameter tensor,
    s <- alpha phi_k + (1 - alpha) s,   and the next step starts from u_0 = phi_0 = s.
alpha = -1 (the default) is the adaptive alpha: per tensor,
    alpha = (cos(phi_1 - s, phi_k - s) + 1) / 2     (torch's cosine_similarity, eps 1e-8).
||.|| is one norm over every tensor with a gradient (all groups; each group's own rho).
That is 2k forward-backward passes and k base-optimizer steps per batch; the first pass
of inner step j > 1 is at the point of the previous descent pass, and, as in the
official code, it is run again rather than reused.

Weights between steps: after the lookbehind step the official code sets the fast
weights, the perturbed point and the model to the new slow weights, so the model holds
s between steps and evaluating it evaluates s, as the official loop does (it loads the
slow weights for testing, which then changes nothing). :meth:`evaluation_weights` is the
default there; only in the middle of a cycle of the two-phase form (below) does it swap
s in and the perturbed point back out, bit for bit.

The two-phase form (``perturb()`` / ``descend()`` around your passes) takes one inner
step per call pair; the k-th ``descend()`` takes the lookbehind step. Feeding it the same
batch k times is the official algorithm; ``step(closure)`` does exactly that (it
finishes the current cycle). In the middle of a cycle the optimizer's state holds s,
phi and u (saved with ``state_dict``); between cycles those buffers are kept for reuse
but not saved.

Differences from the official code: BatchNorm running statistics come from the first
pass of a step (at s) only, as everywhere in this project; the official code updates
them in all 2k passes, at the perturbed points. The adaptive alpha stays a tensor (no
host synchronisation; the official code calls ``.item()``). The update is
phi_k + (1 - alpha) (s - phi_k) (``lerp``; the official multiplies and adds: the same up
to rounding). A tensor without a gradient in a pass is neither perturbed nor stepped
(as in the official code) and ends the step bit for bit unchanged; frozen tensors
(``requires_grad=False``) are not touched at all. If
a pass fails (a non-finite gradient) the loop's ``restore()`` puts s back exactly and
ends the cycle, but base-optimizer state advanced by inner steps already taken stays.
The Lookbehind-ASAM variant of the official code is not implemented.

Defaults: rho 0.05, k 2 and the adaptive alpha are the official README's CIFAR commands
(``--rho 0.05 --k 2 --alpha -1``); the paper's grids are k in {2, 5, 10} and a fixed
alpha in {0.2, 0.5, 0.8}. Training in ``example_cifar.py``: SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 128, 200 epochs, MultiStepLR at 50/100/150.
"""

import contextlib

import torch

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting
from .tensors import copy_tensors, global_norm, tensor_dots, tensor_norms

EPS = 1e-16
README = "official README, CIFAR"
#: Buffers of one cycle: the slow weights, the fast weights, the perturbed point, phi_1 - s (adaptive, k >= 3).
BUFFERS = ("slow", "fast", "point", "first")


class LookbehindSAM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source=README, help="radius of each of the k ascent steps"),
        Setting(
            "k_steps",
            2,
            kind=int,
            range="[1, inf)",
            per_group=False,
            source=README,
            help="inner SAM steps on each batch (2k passes per step)",
        ),
        Setting(
            "alpha",
            -1.0,
            range="[-1, 1]",
            per_group=False,
            source=README,
            help="slow-weights step s <- alpha phi_k + (1 - alpha) s; -1: adaptive, (cos + 1) / 2 per tensor",
        ),
    )
    paper = "Mordido et al., ICML'24"
    rule = (
        "k SAM steps on one batch, the ascents accumulating from the slow weights s; "
        "s <- alpha phi_k + (1 - alpha) s, alpha = (cos(phi_1 - s, phi_k - s) + 1)/2 per tensor"
    )
    passes = "2k"
    extra_memory = 3
    memory_note = "slow weights, fast weights, perturbed point (k >= 2); +1 with the adaptive alpha and k >= 3"

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.require(
            self.alpha == -1.0 or 0.0 < self.alpha <= 1.0, f"alpha must be -1 (adaptive) or in (0, 1], got {self.alpha!r}"
        )
        self.state["inner"] = 0  # inner steps taken in the current cycle
        self._spare: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # the buffers, kept between cycles

    # -- buffers ---------------------------------------------------------------------------------

    def _cycle_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _in_cycle(self) -> list[torch.Tensor]:
        """The tensors of the cycle under way (empty between cycles)."""
        return [p for p in self._cycle_params() if "slow" in self.state[p]]

    def _buffers(self, params, key: str) -> list[torch.Tensor]:
        """``key``'s buffer of each tensor, in the optimizer state for the cycle (reused across cycles)."""
        out = []
        for p in params:
            state = self.state[p]
            if key not in state:
                spare = self._spare.get(p, {}).pop(key, None)
                fits = spare is not None and spare.shape == p.shape and spare.dtype == p.dtype and spare.device == p.device
                state[key] = spare if fits else torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(state[key])
        return out

    def _end_cycle(self, params) -> None:
        for p in params:
            for key in BUFFERS:
                if key in self.state[p]:
                    self._spare.setdefault(p, {})[key] = self.state[p].pop(key)
        self.state["inner"] = 0
        self.leave_perturbed_pass()

    def extra_state_bytes(self) -> int:
        spare = [t for buffers in self._spare.values() for t in buffers.values()]
        return super().extra_state_bytes() + sum(t.numel() * t.element_size() for t in spare)

    @property
    def descents_left(self) -> int:
        """The inner steps left in the cycle on this batch, the coming one included (k between cycles)."""
        return self.k_steps - self.state["inner"]

    # -- one inner step: perturb() after a pass at u_{j-1}, descend() after the pass at u_j ---------

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        """u_j = u_{j-1} + rho g / ||g|| (in the model); the first of a cycle saves the slow weights."""
        self.refuse_second_perturb()
        if self.state["inner"] == 0 and not self._in_cycle():
            params = self._cycle_params()
            if params:
                copy_tensors(self._buffers(params, "slow"), params)
        groups = self.params_with_grad()
        scale = global_norm([p.grad for _, ps in groups for p in ps]) + EPS
        for group, params in groups:
            if params:
                torch._foreach_add_(params, torch._foreach_mul(self.grads(params), group["rho"] / scale))
        self.enter_perturbed_pass(zero_grad)

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        """phi_j from phi_{j-1} with the gradient at u_j; after the k-th, the lookbehind step."""
        params = self._in_cycle()
        j, k = self.state["inner"] + 1, self.k_steps
        if params:
            last = j == k
            if not last:  # keep u_j for the next inner step
                copy_tensors(self._buffers(params, "point"), params)
            copy_tensors(params, self._buffers(params, "slow" if j == 1 else "fast"))
        self.base_step()
        if zero_grad:
            self.zero_grad()
        if not params:
            self.state["inner"] = 0 if j == k else j
            return
        if j < k:
            copy_tensors(self._buffers(params, "fast"), params)
            if j == 1 and self.alpha == -1.0 and k >= 3:  # phi_1 - s for the adaptive alpha ("fast" moves on)
                first = self._buffers(params, "first")
                copy_tensors(first, params)
                torch._foreach_sub_(first, self._buffers(params, "slow"))
            copy_tensors(params, self._buffers(params, "point"))
            self.state["inner"] = j
            return
        self._lookbehind(params)
        self._end_cycle(params)

    def _lookbehind(self, params) -> None:
        """The model holds phi_k: s <- alpha phi_k + (1 - alpha) s, in the model."""
        slow = self._buffers(params, "slow")
        k = self.k_steps
        if self.alpha != -1.0:
            torch._foreach_lerp_(params, slow, 1.0 - self.alpha)
            return
        if k == 1:  # phi_1 = phi_k: cos = 1, alpha = 1, s <- phi_1 (the model already holds it)
            return
        first = self._buffers(params, "first") if k >= 3 else self._buffers(params, "fast")
        if k == 2:  # "fast" still holds phi_1
            torch._foreach_sub_(first, slow)
        last = self._buffers(params, "point")  # free now: phi_k - s
        copy_tensors(last, params)
        torch._foreach_sub_(last, slow)
        # one cosine per tensor, over every shard of a sharded one (F.cosine_similarity's: each norm at least 1e-8)
        cosines = tensor_dots(first, last) / (tensor_norms(first).clamp_min(1e-8) * tensor_norms(last).clamp_min(1e-8))
        for p, s, cosine in zip(params, slow, cosines):
            p.lerp_(s, 1 - (cosine + 1) / 2)

    @without_grad
    def restore(self) -> None:
        """After a failed pass: the slow weights back, bit for bit, and the cycle abandoned."""
        params = self._in_cycle()
        if params:
            copy_tensors(params, self._buffers(params, "slow"))
        self._end_cycle(params)

    # -- the whole step ------------------------------------------------------------------------------

    @without_grad
    def step(self, closure=None):
        """The k inner steps on the closure's batch (what is left of the current cycle); the first pass's loss."""
        if closure is None:
            return self.descend_after_passes()
        loss = None
        while True:
            value = self.evaluate(closure, "ascent")
            loss = value if loss is None else loss
            self.perturb()
            self.evaluate(closure, "descent")
            self.descend()
            if self.state["inner"] == 0:
                return loss

    @contextlib.contextmanager
    def evaluation_weights(self):
        """Between steps the model holds the slow weights: nothing to do. In the middle of a
        two-phase cycle, the slow weights in, the current weights back afterwards, bit for bit."""
        params = self._in_cycle()
        if not params:
            yield
            return
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            copy_tensors(params, [self.state[p]["slow"] for p in params])
        try:
            yield
        finally:
            with torch.no_grad():
                copy_tensors(params, kept)
