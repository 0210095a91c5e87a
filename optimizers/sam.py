"""SAM (Foret et al., ICLR'21): e = rho * g / ||g||.

``adaptive=True`` (and the ``adaptive_sam`` variant, :class:`AdaptiveSAM`) gives the
"adaptive SAM" of davda54/sam and pytorch-optimizer: e = rho * w^2 * g / || |w| * g ||
on every parameter (use rho around 2.0). It is not the official ASAM operator, which
is :class:`optimizers.asam.ASAM`.

EPS keeps a zero gradient finite: e = 0, and the step is the base optimizer's with
g_s (weight decay and momentum only, if g_s is zero too).
"""

import torch

from .base import SharpnessAwareOptimizer
from .settings import Setting
from .tensors import global_norm

EPS = 1e-12


class SAM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source="Foret et al. 2021, CIFAR-10", help="perturbation radius"),
        Setting(
            "adaptive",
            False,
            kind=bool,
            help="davda54-style e = rho w^2 g / || |w| g || (on the command line: runs adaptive_sam)",
        ),
    )
    paper = "Foret et al., ICLR'21"
    rule = "e = rho g / ||g||"
    undone_by_restore = True  # e is a function of this step's gradient alone

    def is_adaptive(self, group) -> bool:
        return group["adaptive"]

    def perturbation(self, groups):
        grads = [self.grads(params) for _, params in groups]
        weighted = [
            torch._foreach_mul(g, torch._foreach_abs(params)) if g and self.is_adaptive(group) else g
            for (group, params), g in zip(groups, grads)
        ]
        norm = global_norm([t for ts in weighted for t in ts])
        for (group, params), g in zip(groups, grads):
            if g and self.is_adaptive(group):
                torch._foreach_mul_(g, torch._foreach_mul(params, params))
        return self.scale_to_radius(groups, grads, EPS, self.radius, norm)

    def radius(self, group) -> float:
        """The perturbation radius for this step (GSAM's follows the learning rate)."""
        return group["rho"]


class AdaptiveSAM(SAM):
    """SAM with the davda54-style weighting on every tensor: e = rho w^2 g / || |w| g ||."""

    settings = (Setting("rho", 2.0, range="[0, inf)", source="davda54/sam README", help="perturbation radius"),)
    paper = 'davda54/sam\'s "adaptive"'
    rule = "e = rho w² g / || |w| g || on every tensor"

    def is_adaptive(self, group) -> bool:
        return True
