"""ESAM (Du et al., ICLR'22), as in the authors' code.

Stochastic weight perturbation (SWP): after each step every parameter tensor is kept
for the next ascent pass with probability beta; the others get ``requires_grad=False``
there, so autograd never computes their gradients, and the perturbation of the kept
ones is scaled up by 1/beta: e = rho * g / (||g|| + 1e-7) / beta. Every tensor takes
part in the descent pass. The first step keeps every tensor (so does a draw that would
keep none).

Sharpness-sensitive data selection (SDS): with e applied, per-sample losses are
evaluated without gradients (train mode, BatchNorm statistics untouched); the second
forward-backward runs on the gamma fraction of the batch whose loss rose most. SDS
needs a closure that accepts requests (:class:`optimizers.BatchClosure`); in the
two-phase form (perturb/descend) only SWP applies.
"""

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting
from .tensors import data_parallel, global_norm

EPS = 1e-7


class ESAM(SharpnessAwareOptimizer):
    """Only parameters that were trainable (``requires_grad``) when their group was added
    are ever dropped and re-enabled: a parameter the user froze stays frozen and untouched."""

    settings = (
        Setting("rho", 0.05, range="[0, inf)", source="official ResNet-18 script", help="perturbation radius"),
        Setting(
            "beta",
            0.6,
            range="(0, 1]",
            source="official ResNet-18 script",
            help="probability that a tensor takes part in the ascent backward (SWP)",
        ),
        Setting(
            "gamma",
            0.5,
            range="(0, 1]",
            per_group=False,
            source="official ResNet-18 script",
            help="fraction of the batch the second pass runs on (SDS)",
        ),
    )
    paper = "Du et al., ICLR'22"
    rule = (
        "SWP: tensors dropped from the ascent backward w.p. 1 - beta, e scaled 1/beta; "
        "SDS: second pass on the gamma fraction whose loss rose most"
    )
    passes = "1 + 1 no-grad fwd + gamma"
    ascent_sync = "local"

    @classmethod
    def compile_obstacle(cls, settings):
        beta = settings.get("beta", cls.setting("beta").default)
        if beta < 1:
            return (
                f"ESAM with beta {beta} drops a random set of tensors from each ascent backward (requires_grad), "
                "and a compiled model recompiles for every new set; use beta 1 or no --compile"
            )
        return None

    advances_when_skipped = ("kept",)  # a draw from its random stream, which advances too

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        self._trainable: dict[Tensor, None] = {}  # filled by add_param_group, in order
        super().__init__(params, base_optimizer, **kwargs)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._trainable.update((p, None) for p in self.param_groups[-1]["params"] if p.requires_grad)

    def perturbation(self, groups):
        grads = [self.grads(params) for _, params in groups]
        norm = global_norm([g for gs in grads for g in gs])
        for (group, _), g in zip(groups, grads):
            if g:
                torch._foreach_mul_(g, group["rho"] / (norm + EPS) / group["beta"])
        return grads

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        super().perturb(zero_grad)
        for p in self._trainable:  # the descent pass reaches every trainable tensor
            p.requires_grad_(True)

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        super().descend(zero_grad)
        self.drop_tensors()

    def drop_tensors(self) -> None:
        """Draw which tensors the next ascent pass differentiates (each kept with probability beta).

        One draw per parameter, frozen ones included, so the stream does not depend on
        what is frozen; only trainable ones are dropped.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        beta = torch.tensor([group["beta"] for group in self.param_groups for _ in group["params"]])
        keep = torch.rand(len(params), generator=self.generator()) < beta
        if not any(kept for p, kept in zip(params, keep.tolist()) if p in self._trainable):
            keep[:] = True  # a backward pass needs something to differentiate
        self.state["kept"] = keep  # saved with the optimizer, so a resumed run drops the same tensors
        self._apply_kept()

    def _apply_kept(self) -> None:
        """The state's draw on the trainable tensors; before the first draw (a first step undone, say), every one."""
        params = [p for group in self.param_groups for p in group["params"]]
        kept = self.state["kept"].tolist() if "kept" in self.state else [True] * len(params)
        for p, keep in zip(params, kept):
            if p in self._trainable:
                p.requires_grad_(keep)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._apply_kept()

    @without_grad
    def step(self, closure=None):
        if closure is None:
            return super().step(closure)
        plain = not getattr(closure, "accepts_requests", False)
        if plain and any(group["beta"] < 1 for group in self.param_groups) and data_parallel():
            raise RuntimeError(
                "ESAM leaves tensors out of its ascent backward, which a data-parallel all-reduce cannot take: pass a "
                "closure that keeps the ascent pass local, optimizers.BatchClosure(..., no_sync=lambda: "
                "accelerator.no_sync(model), ascent_sync=optimizer.ascent_sync)"
            )
        select = self.gamma < 1
        if select and plain:
            self.warn_once("sds", "ESAM: a plain closure cannot evaluate sample subsets; data selection is off (gamma=1)")
            select = False
        if not select:
            return super().step(closure)
        loss_before = self.evaluate(closure, "ascent", per_sample=True)
        self.perturb()
        loss_after = self.evaluate(closure, "select", per_sample=True, backward=False)
        k = max(1, int(len(loss_after) * self.gamma))
        subset = torch.topk(loss_after - loss_before, k, sorted=False).indices
        self.evaluate(closure, "descent", subset=subset)
        self.descend()
        return loss_before.mean()
