"""GAM (Zhang et al., CVPR'23): gradient-norm aware minimisation, accelerated form.

Paper: "Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
Generalization", arXiv 2303.03108 (Algorithm 2, "Accelerated GAM", reproduced in the
README of the official code). Official code: xxgege/GAM, ``gam/gam.py`` with the
hyperparameters set in ``main_cifar.py``.

Four passes on one batch (all norms global over the parameters with a gradient, eps 1e-12):

    g0 at w
    g1 at w + rho' g0 / ||g0||
    h = g1 - g0;            w2 = w + rho h / ||h||;     g2 at w2
    g3 at w2 + rho' g2 / ||g2||
    d  = alpha g1 + (1 - alpha) g3
    pm = g0 + |1 - beta| g2
    d <- d - gamma (pm - cos(pm, d) ||pm|| d / ||d||)      (remove gamma x the part of pm orthogonal to d)
    restore w; base step with d

Paper versus code. Algorithm 2 mixes pm = beta g0 + (1 - beta) g2; the code uses
g0 + |grad_beta_2| g2 with grad_beta_2 = 1 - grad_beta_0 (``main_cifar.py``), so g0
keeps weight 1. This file follows the code (``beta`` is ``grad_beta_0``, the paper's
beta; ``alpha`` is ``grad_beta_1``, the paper's alpha, used as in the paper). The
argparse defaults (beta_1 = 1, beta_2 = -1, beta_3 = 1) never reach GAM: ``main_cifar.py``
replaces them per dataset and architecture and always sets beta_2 = 1 - beta_0 and
beta_3 = 1 - beta_1. The code's eps sits in both cos's denominator and ||d||'s.

Defaults: ``main_cifar.py``'s CIFAR-10 ResNet setting: rho (``grad_norm_rho``) 0.2,
rho' (``grad_rho``) 0.03, alpha 0.1, beta 0.1, gamma 0.05 (CIFAR-100 ResNet: 0.2, 0.02,
0.6, 0.5, 0.03). Both radii are constant there (a ProportionScheduler with equal max and
min). The official ``adaptive`` option is not implemented.

g0 and g2 reach the update, so a data-parallel loop must all-reduce the gradients of
all four passes ("global" ascent): every replica computes the same points and d. The
official code does not: it runs the four passes without gradient synchronisation (DDP
``no_sync``), each replica moving along its own local gradients, and averages only the
final d across workers, before the base step (the same on one process, not with
several). BatchNorm statistics come from the first pass (frozen from the second on, as
the official code). g0, g1 and g2 are held only within a step: the persistent extra
memory is the weight backup.

Two-phase form: call ``perturb()`` after each of the first three backward passes
(``perturbations`` is 3), then ``descend()`` after the fourth. A loop that calls ``perturb()`` once (the generic SAM
loop) gets a warning and a SAM step of radius rho' (descent with g1).
"""

import torch

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting
from .tensors import global_dot, global_norm

EPS = 1e-12
GAM_SOURCE = "official main_cifar.py, CIFAR-10 ResNet"


class GAM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.2, range="[0, inf)", source=GAM_SOURCE, help="radius of the gradient-norm ascent (grad_norm_rho)"),
        Setting("rho_prime", 0.03, range="[0, inf)", source=GAM_SOURCE, help="radius of the two SAM-like ascents (grad_rho)"),
        Setting("alpha", 0.1, range="[0, 1]", source=GAM_SOURCE, help="d = alpha g1 + (1 - alpha) g3 (grad_beta_1)"),
        Setting(
            "beta",
            0.1,
            range="[0, 1]",
            source=GAM_SOURCE,
            help="pm = g0 + |1 - beta| g2 (grad_beta_0; the paper has beta g0 + (1 - beta) g2)",
        ),
        Setting(
            "gamma",
            0.05,
            range="[0, inf)",
            source=GAM_SOURCE,
            help="weight of the removed component of pm orthogonal to d (grad_gamma)",
        ),
    )
    paper = "Zhang et al., CVPR'23"
    rule = (
        "g0..g3 at w, w+rho'ĝ0, w2 = w+rho (g1-g0)/||g1-g0||, w2+rho'ĝ2; "
        "d = alpha g1 + (1-alpha) g3 minus gamma x the part of g0 + |1-beta| g2 orthogonal to d"
    )
    passes = "4"
    perturbations = 3
    memory_note = "weight backup; g0, g1, g2 only within a step"
    ascent_sync = "global"
    undone_by_restore = True  # its points are functions of this step's gradients; restore() drops them

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self._stage, self._groups, self._kept = 0, [], []

    def _take_grads(self) -> list[list[torch.Tensor]]:
        """This pass's gradients of the step's parameters (zeros where one got none), leaving .grad empty."""
        grads = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in params] for _, params in self._groups]
        self.zero_grad()
        return grads

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        """Move to the next of GAM's points: w + rho' ĝ0, then w2, then w2 + rho' ĝ2."""
        if self._stage == 0:
            self._groups = self.params_with_grad()
            self.save_weights([p for _, params in self._groups for p in params])
            self.enter_perturbed_pass(zero_grad=False)  # BatchNorm statistics frozen; the gradients are read below
        elif self._stage == 3:
            raise RuntimeError("GAM takes four passes: call descend() after the fourth")
        grads = self._take_grads()
        if self._stage == 1:  # h = g1 - g0 from w, not from the first perturbed point
            h = [torch._foreach_sub(g1, g0) if g1 else [] for g1, g0 in zip(grads, self._kept[0])]
            self.return_to_saved()
            self._ascend(h, "rho")
        else:
            self._ascend(grads, "rho_prime")
        self._kept.append(grads)
        self._stage += 1

    def _ascend(self, directions, radius: str) -> None:
        norm = global_norm([t for ts in directions for t in ts])
        for (group, params), d in zip(self._groups, directions):
            if params:
                torch._foreach_add_(params, torch._foreach_mul(d, group[radius] / (norm + EPS)))

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        if self._stage == 3:
            self._combine()
        elif self._stage in (1, 2):
            self.warn_once(
                "passes",
                f"GAM got {self._stage + 1} of its four passes: this step descends with g1, "
                "a SAM step of radius rho' (call perturb() after each of the first three passes)",
            )
            for (_, params), g1 in zip(self._groups, self._kept[1] if self._stage == 2 else self._take_grads()):
                for p, g in zip(params, g1):
                    p.grad = g
        super().descend(zero_grad)

    def _combine(self) -> None:
        """.grad <- d - gamma (pm - cos ||pm|| d / ||d||), d = alpha g1 + (1-alpha) g3, pm = g0 + |1-beta| g2."""
        g0, g1, g2 = self._kept
        g3 = self._take_grads()
        for (group, _), pm, d, a, b in zip(self._groups, g0, g3, g1, g2):
            if d:
                torch._foreach_add_(pm, b, alpha=abs(1.0 - group["beta"]))
                torch._foreach_mul_(d, 1.0 - group["alpha"])
                torch._foreach_add_(d, a, alpha=group["alpha"])
        pm_all, d_all = [t for ts in g0 for t in ts], [t for ts in g3 for t in ts]
        norm_pm, norm_d = global_norm(pm_all), global_norm(d_all)
        cosine = global_dot(pm_all, d_all) / (norm_d * norm_pm + EPS)
        for (group, params), pm, d in zip(self._groups, g0, g3):
            if d:
                torch._foreach_sub_(pm, torch._foreach_mul(d, cosine * norm_pm / (norm_d + EPS)))  # pm is now vertical
                torch._foreach_add_(d, pm, alpha=-group["gamma"])
                for p, di in zip(params, d):
                    p.grad = di

    @without_grad
    def restore(self) -> None:
        """Back to w; also ends the step (or abandons it: a skipped step leaves nothing behind)."""
        super().restore()
        self._reset()

    @without_grad
    def step(self, closure=None):
        if closure is None:
            return super().step(closure)
        self.restore()  # a step abandoned half-way (a skipped step) starts over
        loss = self.evaluate(closure, "ascent")  # g0
        self.perturb()
        self.evaluate(closure, "descent")  # g1
        self.perturb()
        self.evaluate(closure, "ascent")  # g2
        self.perturb()
        self.evaluate(closure, "descent")  # g3
        self.descend()
        return loss
