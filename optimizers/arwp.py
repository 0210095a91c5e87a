"""Adaptive random weight perturbation, ARWP (Li, Tao, Yan, Lei, Wu, Fang, He & Huang, TMLR'24,
arXiv 2404.00357), as the official code computes it.

Official code: github.com/nblt/mARWP, ``utils.py`` (class ``ARWP``; loop and noise schedule in
``train_rwp_cos.py``, defaults in ``scripts/run_rwp.sh``).

One forward-backward pass per step, at randomly perturbed weights. Before the pass, for
every trainable tensor w (per group; noise from the optimizer's own generator, tensor by
tensor in group order):
    tensor with > 1 dimension:  e[f] ~ N(0, ((s_t + 1e-16) ||w[f]||)^2)   per output filter f (w[f] = w[f, ...])
    1-dimensional tensor:       e    ~ N(0, (s_t (||w|| + 1e-16))^2)
    e[f] <- e[f] / sqrt(1 + eta F_f),   F_f = sum of F over filter f (for a 1-D tensor: each element's own F)
    s_t = std (1 + inc (1 - cos(pi t / T)) / 2)      (t: steps taken, T: total_steps)
then g = grad L(w + e); w is restored bit for bit; F <- beta F + g^2 (F = g^2 the first
time, no (1 - beta)); the base optimizer steps with g. There is no F before the first
step (no scaling). With eta = 0 and inc = 0 this is plain RWP with filter-wise noise.

The schedule needs T, the run's total number of steps: ``total_steps`` (the harness is
meant to fill it in, see ``filled_by``). Without it s_t stays at ``std`` for the whole run.

Paper and code: the defaults are the code's CIFAR-100 script (``run_rwp.sh``: std 0.001,
inc 10, eta 0.1, beta 0.99; its class defaults are std 0.01, eta 1, beta 0.9 and its
argparse default inc 15); training there: SGD lr 0.1, momentum 0.9, weight decay 1e-3,
batch 256, 200 epochs, cosine. The code draws from the global random stream with
``torch.normal``; here from the optimizer's own generator (saved with its state, so a
resumed run draws the same noise). The code adds noise to every tensor of the groups
and restores only those that got a gradient, which would leave a frozen tensor noisy;
here frozen tensors (``requires_grad=False``) are never touched and every noised tensor
is restored. The code keeps one std for all groups; here std, inc, eta and beta may
differ per group. The equations in the paper were not compared line by line; the
noise and F update above are the code's.

m-ARWP (``train_marwp.py``) does not fit this protocol: each of its steps takes the
gradient at w on one batch and the gradient at w + e on a DIFFERENT batch, and mixes
them (lam g_1 + (1 - lam) g_0), consuming two batches per step. A closure here serves
one batch per step, so m-ARWP needs a loop change (a closure that can serve the next
batch, or the loop pairing batches); it is not implemented.

BatchNorm: ``step(closure)``'s one pass updates the running statistics, at w + e, as
in the official loop (nothing is frozen: ``freezes_batchnorm`` is False).

The two-phase form works but wastes its first pass: the noise does not depend on a
gradient, yet the protocol's first pass comes before ``perturb()``; its gradient is
discarded (and both passes update the BatchNorm statistics).
"""

import math

import torch

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .settings import Setting

SCRIPT = "official run_rwp.sh, CIFAR-100"


class ARWP(SharpnessAwareOptimizer):
    settings = (
        Setting(
            "std",
            0.001,
            range="[0, inf)",
            source=SCRIPT,
            help="noise std relative to each filter's norm (at the start of the schedule)",
        ),
        Setting(
            "inc", 10.0, range="[0, inf)", source=SCRIPT, help="the std grows to std (1 + inc) over total_steps on a half cosine"
        ),
        Setting("eta", 0.1, range="[0, inf)", source=SCRIPT, help="noise scaled by 1 / sqrt(1 + eta F)"),
        Setting(
            "beta",
            0.99,
            range="[0, 1)",
            source=SCRIPT,
            help="decay of the accumulated squared gradients F <- beta F + g^2",
        ),
        Setting(
            "total_steps",
            None,
            kind=int,
            range="[1, inf)",
            optional=True,
            per_group=False,
            source="the run's length (none: the std stays constant)",
            help="steps of the whole run, for the std schedule",
        ),
    )
    paper = "Li et al., TMLR'24"
    rule = (
        "one pass at w + e, e ~ N(0, (s_t ||w_filter||)²) / sqrt(1 + eta F_filter), F <- beta F + g²; "
        "s_t: std -> std (1 + inc), half cosine"
    )
    passes = "1"
    extra_memory = 2
    memory_note = "weight backup, F"
    #: The one pass updates the BatchNorm statistics, at w + e, as in the official code.
    freezes_batchnorm = False

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.state["step"] = 0

    # -- the noise ---------------------------------------------------------------------------

    def noise_std(self, group) -> float:
        """s_t for ``group`` at the current step."""
        if self.total_steps is None:
            return group["std"]
        scale = -math.cos(self.state["step"] * math.pi / self.total_steps) * 0.5 + 0.5
        return group["std"] * (scale * group["inc"] + 1)

    def logged_values(self) -> dict[str, float]:
        return {"noise_std": self.noise_std(self.param_groups[0])} if self.param_groups else {}

    def perturbation(self, groups):
        """e for every tensor of ``groups``, drawn whether or not it has a gradient (gradients are not used)."""
        noise = []
        for group, params in groups:
            s = self.noise_std(group)
            es = []
            for p in params:
                e = self.standard_normal(p)
                if p.dim() > 1:
                    filters = torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1)
                    e.mul_(((s + 1e-16) * filters).reshape(-1, *[1] * (p.dim() - 1)))
                else:
                    e.mul_(s * (torch.linalg.vector_norm(p) + 1e-16))
                fisher = self.state[p].get("fisher")
                if fisher is not None and p.dim() > 1:  # F summed over each filter
                    per_filter = fisher.reshape(p.shape[0], -1).sum(dim=1)
                    e.div_(torch.sqrt(1 + group["eta"] * per_filter).reshape(-1, *[1] * (p.dim() - 1)))
                elif fisher is not None:  # a 1-D tensor's "filters" are its elements
                    e.div_(torch.sqrt(1 + group["eta"] * fisher))
                es.append(e)
            noise.append(es)
        return noise

    def _trainable(self):
        return [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]

    @without_grad
    def _add_noise(self) -> None:
        groups = self._trainable()
        self.save_weights([p for _, params in groups for p in params])
        for (_, params), e in zip(groups, self.perturbation(groups)):
            if params:
                torch._foreach_add_(params, e)

    # -- the protocol --------------------------------------------------------------------------

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        """Two-phase form: the first pass's gradient is not needed; w + e, BatchNorm frozen."""
        self.refuse_second_perturb()
        self._add_noise()
        self.enter_perturbed_pass(zero_grad)

    def adjust_gradient(self) -> None:
        """F <- beta F + g^2 with the gradient at w + e (which is also the descent gradient)."""
        for group, params in self.params_with_grad():
            for p in params:
                state = self.state[p]
                if "fisher" not in state:
                    state["fisher"] = p.grad * p.grad
                else:
                    state["fisher"].mul_(group["beta"]).addcmul_(p.grad, p.grad)
        self.state["step"] += 1

    @without_grad
    def step(self, closure=None):
        """One pass at w + e, then restore w and the base step with that gradient."""
        if closure is None:
            return self.descend_after_passes()
        self._add_noise()
        loss = self.evaluate(closure, "descent")
        self.descend()
        return loss
