"""Bayesian SAM, bSAM (Moellenhoff & Khan, ICLR'23), as in the authors' JAX code.

An Adam-like natural-gradient method for a Gaussian posterior N(w, 1 / (N s)); it
does not wrap a base optimizer. Each step splits the batch into m sub-batches
(``msharpness``) and, for each sub-batch j:
    noisy point   w + n / sqrt(N s),  n ~ N(0, I)       -> gradient g_j
    perturbed     w + rho * g_j / s  (from the mean w)  -> gradient g_e,j
    gs_j = sqrt(s) * |g_j|
then, with wd = prior_precision / N and N = num_data * augmentation_factor:
    gm <- b1 gm + (1 - b1) (mean_j g_e,j + wd w)
    w  <- w - lr gm / s
    s  <- b2 s + (1 - b2) (mean_j gs_j + damping + wd)
BatchNorm statistics are updated in every pass, as in the official code. State:
gm and s (2x parameters). Noise comes from the optimizer's own generator, drawn
parameter by parameter in param-group order, one draw per sub-batch.
Sub-batches need a closure that accepts requests (:class:`optimizers.BatchClosure`).
"""

import torch

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting

CODE = "authors' code"


class BayesianSAM(SharpnessAwareOptimizer):
    """Parameters that get no gradient in any pass of a step are left exactly as they were
    (noise and perturbation are undone, no prior term); frozen ones are never touched."""

    settings = (
        Setting("lr", 0.5, range="[0, inf)", source=CODE, help="learning rate (the harness's --lr)"),
        Setting(
            "betas",
            (0.9, 0.999),
            kind=tuple,
            range="[0, 1)",
            source=CODE,
            help="decay of the momentum gm and of the precision s",
        ),
        Setting("rho", 0.01, range="[0, inf)", source=CODE, help="perturbation radius"),
        Setting(
            "prior_precision",
            40.0,
            range="[0, inf)",
            source="authors' code; the paper prints 10, a typo per the authors",
            help="precision of the Gaussian prior (weight decay prior_precision / N)",
        ),
        Setting("damping", 0.1, range="[0, inf)", source=CODE, help="added to the precision update"),
        Setting("s_init", 1.0, range="(0, inf)", source=CODE, help="initial precision"),
        Setting(
            "num_data",
            50_000,
            kind=int,
            range="[1, inf)",
            source="CIFAR-10; the harness passes the training-set size",
            help="training-set size",
        ),
        Setting("augmentation_factor", 4, range="(0, inf)", source=CODE, help="N = num_data x augmentation_factor"),
        Setting("msharpness", 8, kind=int, range="[1, inf)", per_group=False, source=CODE, help="sub-batches per step (m)"),
    )
    paper = "Möllenhoff & Khan, ICLR'23"
    rule = "Adam-like natural-gradient update with noise sampling, perturbation from the mean, m sub-batches"
    passes = "2 (on m sub-batches)"
    extra_memory = 3
    memory_note = "backup, gm, s"
    uses_base_optimizer = False
    clips_descent = False
    freezes_batchnorm = False
    ascent_sync = "global"

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        if base_optimizer not in ("sgd", None):
            raise ValueError(f"BayesianSAM has its own update rule; base optimizer {base_optimizer!r} does not apply")
        super().__init__(params, None, **kwargs)

    def perturb(self, zero_grad: bool = True):
        raise NotImplementedError("BayesianSAM samples noise before its first pass: use step(closure)")

    descend = perturb

    @property
    def perturbs_this_step(self) -> bool:
        raise NotImplementedError("BayesianSAM samples noise before its first pass: use step(closure)")

    def _state(self, group, p):
        state = self.state[p]
        if not state:
            state["gm"] = torch.zeros_like(p)
            state["s"] = torch.full_like(p, group["s_init"])
        return state

    @staticmethod
    def n_eff(group) -> float:
        return group["num_data"] * group["augmentation_factor"]

    @without_grad
    def step(self, closure=None):
        if closure is None:
            return self.descend_after_passes()
        m = self.msharpness
        if m > 1 and not getattr(closure, "accepts_requests", False):
            self.warn_once("m", f"BayesianSAM: a plain closure cannot split the batch; using m=1 instead of {m}")
            m = 1
        if m > 1 and closure.batch_size < m:
            raise ValueError(f"BayesianSAM: batch of {closure.batch_size} cannot be split into msharpness={m} sub-batches")
        groups = [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        self.save_weights(params)
        w = [self._backup[p] for p in params]
        g_e_sum = [torch.zeros_like(p) for p in params]
        gs_sum = [torch.zeros_like(p) for p in params]
        seen = [False] * len(params)  # got a gradient in some pass of this step
        losses = []
        chunks = [None] if m == 1 else self._chunks(closure.batch_size, m)
        for chunk in chunks:
            request = {} if chunk is None else {"subset": chunk}
            self._to_noisy_point(groups)
            losses.append(self.evaluate(closure, "ascent", **request))
            i = 0
            for group, ps in groups:
                for p in ps:
                    s = self.state[p]["s"]
                    seen[i] |= p.grad is not None
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    gs_sum[i].addcmul_(s.sqrt(), g.abs())
                    p.copy_(w[i]).addcdiv_(g, s, value=group["rho"])  # perturbed from the mean
                    i += 1
            self.evaluate(closure, "descent", **request)
            got = [i for i, p in enumerate(params) if p.grad is not None]
            if got:
                torch._foreach_add_([g_e_sum[i] for i in got], [params[i].grad for i in got])
            for i in got:
                seen[i] = True
        self.restore()
        i = -1
        for group, ps in groups:
            b1, b2 = group["betas"]
            wd = group["prior_precision"] / self.n_eff(group)
            for p in ps:
                i += 1
                if not seen[i]:  # no gradient anywhere: no update, not even the prior's pull
                    continue
                gm, s = self.state[p]["gm"], self.state[p]["s"]
                gm.mul_(b1).add_(g_e_sum[i].div_(len(chunks)).add_(p, alpha=wd), alpha=1 - b1)
                p.addcdiv_(gm, s, value=-group["lr"])
                s.mul_(b2).add_(gs_sum[i].div_(len(chunks)).add_(group["damping"] + wd), alpha=1 - b2)
        self.zero_grad()
        return torch.stack(losses).mean()

    def _to_noisy_point(self, groups):
        for group, ps in groups:
            for p in ps:
                s = self._state(group, p)["s"]
                p.copy_(self.standard_normal(p)).div_((self.n_eff(group) * s).sqrt()).add_(self._backup[p])

    @staticmethod
    def _chunks(batch_size: int, m: int) -> list[slice]:
        bounds = [round(j * batch_size / m) for j in range(m + 1)]
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]
