"""GSAM (Zhuang et al., ICLR'22): surrogate-gap guided SAM.

e = rho_t * g / ||g|| (adaptive: rho_t * w^2 * g / || |w| * g ||). After the second
pass, the component of g orthogonal to g_s,
    g_v = g - cos(g, g_s) ||g|| g_s / ||g_s||,
is removed from the descent: g_s - alpha * g_v.

rho_t follows the group's learning rate, so the lr scheduler drives it:
    rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min),
with lr_max the group's initial lr (``initial_lr``, set by torch schedulers) unless
given, and rho_min = rho (a constant radius) unless given.
"""

import torch

from .base import global_dot, global_norm
from .sam import SAM

EPS = 1e-12


class GSAM(SAM):
    ascent_may_be_local = False
    hyperparameters = {"rho": 0.05, "rho_min": None, "alpha": 0.4, "adaptive": False, "lr_max": None, "lr_min": 0.0}

    def validate(self, group):
        super().validate(group)
        rho_min = group["rho"] if group["rho_min"] is None else group["rho_min"]
        self.require(0 <= rho_min <= group["rho"], f"rho_min must be in [0, rho={group['rho']}], got {rho_min}")
        self.require(0 <= group["alpha"] <= 1, f"alpha must be in [0, 1], got {group['alpha']}")

    @staticmethod
    def rho_t(group) -> float:
        rho_max = group["rho"]
        rho_min = rho_max if group["rho_min"] is None else group["rho_min"]
        lr_max = group["lr_max"] if group["lr_max"] is not None else group.get("initial_lr", group["lr"])
        lr_min = group["lr_min"]
        if lr_max <= lr_min:
            return rho_max
        return rho_min + (rho_max - rho_min) * (group["lr"] - lr_min) / (lr_max - lr_min)

    def radius(self, group) -> float:
        group["rho_t"] = self.rho_t(group)
        return group["rho_t"]

    def perturbation(self, groups):
        self._g = [[p.grad.clone() for p in params] for _, params in groups]  # g, for g_v after the second pass
        self._groups = [group for group, _ in groups]
        self._params = [params for _, params in groups]
        return super().perturbation(groups)

    def adjust_gradient(self):
        g_all = [t for ts in self._g for t in ts]
        g_s_all = [p.grad for ps in self._params for p in ps]
        norm_g, norm_s = global_norm(g_all), global_norm(g_s_all)
        cosine = global_dot(g_all, g_s_all) / (norm_g * norm_s + EPS)
        for group, params, g in zip(self._groups, self._params, self._g):
            if not params:
                continue
            g_s = self.grads(params)
            torch._foreach_add_(g, torch._foreach_mul(g_s, -cosine * norm_g / (norm_s + EPS)))  # g is now g_v
            torch._foreach_add_(g_s, g, alpha=-group["alpha"])
        self._g, self._groups, self._params = [], [], []
