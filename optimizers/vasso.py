"""VaSSO (Li & Giannakis, NeurIPS'23): variance-suppressed sharpness-aware optimisation.

Paper: "Enhancing Sharpness-Aware Optimization Through Variance Suppression", arXiv
2309.15639. Official code: BingcongLi/VaSSO, ``solver/vasso.py``.

The perturbation follows a moving average d of the gradients instead of the noisy g:

    first step: d = g;   later: d <- (1 - theta) d + theta g      (theta weights the NEW g)
    e = rho d / (||d|| + 1e-7)

then the usual second pass at w + e, restore, and the base step with g_adv. d is
per-parameter state (1x parameters); a parameter without a gradient in a step keeps its
d untouched and is not perturbed, as in the official code.

Defaults: theta 0.9 and rho 0.05 are the official config defaults; the official
``train.sh`` (WRN-28-10, CIFAR-100 with cutout, SGD lr 0.1, wd 1e-3) runs rho 0.2.

BatchNorm: the official loop runs both passes in train mode without freezing the
running statistics; so does this one (``freezes_batchnorm = False``). The ascent
gradient only moves d and e, so a data-parallel loop may keep it per replica ("any";
each replica then has its own d, and a checkpoint keeps the first process's).
"""

import torch

from .base import SharpnessAwareOptimizer
from .settings import Setting
from .tensors import copy_tensors

EPS = 1e-7
VASSO_SOURCE = "official config default; train.sh runs rho 0.2 on CIFAR-100"


class VaSSO(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source=VASSO_SOURCE, help="perturbation radius"),
        Setting(
            "theta",
            0.9,
            range="[0, 1]",
            source="official config default",
            help="weight of the new gradient in the moving average d",
        ),
    )
    state_from_ascent = True
    paper = "Li & Giannakis, NeurIPS'23"
    rule = "d <- (1 - theta) d + theta g (d = g at first); e = rho d / ||d||"
    extra_memory = 2
    memory_note = "weight backup, d"
    freezes_batchnorm = False

    def perturbation(self, groups):
        for group, params in groups:
            known = [p for p in params if "d" in self.state[p]]
            for p in params:
                if "d" not in self.state[p]:
                    self.state[p]["d"] = p.grad.clone()
            if known:
                torch._foreach_lerp_([self.state[p]["d"] for p in known], self.grads(known), group["theta"])
        e = [self.grads(params) for _, params in groups]  # g is no longer needed: e goes where it was
        for ei, (_, params) in zip(e, groups):
            if ei:
                copy_tensors(ei, [self.state[p]["d"] for p in params])
        return self.scale_to_radius(groups, e, EPS)
