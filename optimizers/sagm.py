"""SAGM (Wang et al., CVPR'23): sharpness-aware gradient matching.

Paper: "Sharpness-Aware Gradient Matching for Domain Generalization", arXiv 2303.10353.
Official code: Wang-pengfei/SAGM, ``domainbed/sagm/sagm.py`` (used by ``SAGM_DG`` in
``domainbed/algorithms/algorithms.py``).

As the official code computes it:

    e = (rho / (||g|| + 1e-12) - alpha) g          (one global norm)
    g_adv at w + e;   descent gradient (g + g_adv) / 2

so the perturbed point is w + rho g/||g|| - alpha g, and the update averages the
gradients at w and there. alpha multiplies g directly: it is not scaled by the learning
rate. The radius is not tied to the learning rate either: the official rho_scheduler
is a LinearScheduler whose start and end are both 0.05 (a constant; ``hparams["rho"]``
is not read by SAGM_DG), next to a constant learning rate.

Defaults: rho 0.05 (the constant hard-coded in SAGM_DG), alpha 0.001 (the hparams
default, and the README's commands for PACS, VLCS and TerraIncognita; its OfficeHome
and DomainNet commands use 0.0005). Both come from DomainBed (ResNet-50, Adam, lr 1e-5
to 3e-5), not from CIFAR. The official ``adaptive`` option is not implemented.

g reaches the update, so a data-parallel loop must all-reduce the ascent gradient
("global"): every replica then perturbs along the global g, and the descent gradient
(g + g_adv)/2 is averaged as usual. The official code does not do that: it runs both
passes without gradient synchronisation (DDP ``no_sync``), so each replica perturbs
its weights along its own local gradient and takes g_adv there, and only the final
(g + g_adv)/2 is averaged across workers, before the base step. The two agree on one
process; with several, the official g_adv comes from per-replica perturbations, which
this project does not offer for SAGM. BatchNorm statistics come from the first pass,
as the official step zeroes BN momentum for the second. g is kept only within a step.
"""

import torch

from .base import SharpnessAwareOptimizer
from .settings import Setting
from .tensors import global_norm

EPS = 1e-12


class SAGM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source="official DomainBed code", help="perturbation radius"),
        Setting(
            "alpha",
            0.001,
            range="[0, inf)",
            source="official DomainBed hparams",
            help="e = (rho/||g|| - alpha) g: how far the perturbed point steps back along g",
        ),
    )
    paper = "Wang et al., CVPR'23"
    rule = "e = (rho/||g|| - alpha) g; descent (g + g_adv)/2"
    ascent_sync = "global"
    undone_by_restore = True  # e is a function of this step's gradient alone (the g kept for the descent is the next step's anew)

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self._g = []

    def perturbation(self, groups):
        self._g = [(params, [p.grad.clone() for p in params]) for _, params in groups]
        grads = [self.grads(params) for _, params in groups]
        norm = global_norm([g for gs in grads for g in gs])
        for (group, _), g in zip(groups, grads):
            if g:
                torch._foreach_mul_(g, group["rho"] / (norm + EPS) - group["alpha"])
        return grads

    def adjust_gradient(self):
        for params, g in self._g:
            pairs = [(p.grad, gi) for p, gi in zip(params, g) if p.grad is not None]
            if pairs:
                g_adv = [a for a, _ in pairs]
                torch._foreach_mul_(g_adv, 0.5)
                torch._foreach_add_(g_adv, [gi for _, gi in pairs], alpha=0.5)
        self._g = []
