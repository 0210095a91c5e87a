"""ASAM (Kwon et al., ICML'21), in the form of the authors' code.

T_w = |w| + eta for every parameter whose name contains "weight" (conv, linear and
normalisation weights), T_w = 1 for the others (biases):
e = rho * T_w^2 * g / ||T_w * g||.
"""

import torch

from .base import SharpnessAwareOptimizer
from .settings import Setting
from .tensors import global_norm

EPS = 1e-16


class ASAM(SharpnessAwareOptimizer):
    settings = (
        Setting("rho", 0.5, range="[0, inf)", source="Kwon et al. 2021, CIFAR-10", help="perturbation radius"),
        Setting(
            "eta",
            0.01,
            range="[0, inf)",
            source="official class default; its CIFAR example passes 0.0",
            help="added to |w| in T_w, so that zero weights are perturbed too",
        ),
    )
    paper = "Kwon et al., ICML'21"
    rule = "T_w = |w| + eta on `*weight*` tensors, 1 on biases; e = rho T_w² g / ||T_w g||"
    undone_by_restore = True  # e is a function of this step's gradient alone

    def _is_weight(self, group, params):
        """Names decide, as in the official code; without names, tensors of rank > 1 count as weights."""
        names = group.get("param_names")
        if names is None:
            self.warn_once(
                "names",
                "ASAM got parameters without names: treating tensors with ndim > 1 as weights "
                "(pass the model or model.named_parameters() to follow the official rule)",
            )
            return [p.dim() > 1 for p in params]
        name_of = dict(zip(map(id, group["params"]), names))
        return ["weight" in name_of[id(p)] for p in params]

    def perturbation(self, groups):
        split = []  # per group: (weights T_w * g, T_w, other gradients g)
        for group, params in groups:
            is_weight = self._is_weight(group, params)
            weights = [p for p, w in zip(params, is_weight) if w]
            t = list(torch._foreach_add(torch._foreach_abs(weights), group["eta"])) if weights else []
            tg = list(torch._foreach_mul(self.grads(weights), t)) if weights else []
            split.append((is_weight, tg, t, [p.grad for p, w in zip(params, is_weight) if not w]))
        norm = global_norm([g for _, tg, _, rest in split for g in tg + rest])
        perturbations = []
        for (group, _), (is_weight, tg, t, rest) in zip(groups, split):
            scale = group["rho"] / (norm + EPS)
            if tg:
                torch._foreach_mul_(tg, t)
                torch._foreach_mul_(tg, scale)
            if rest:
                torch._foreach_mul_(rest, scale)
            weights, others = iter(tg), iter(rest)
            perturbations.append([next(weights) if w else next(others) for w in is_weight])
        return perturbations
