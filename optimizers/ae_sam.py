"""AE-SAM (Jiang et al., ICLR'23): SAM only where the loss looks sharp.

Paper: "An Adaptive Policy to Employ Sharpness-Aware Minimization", arXiv 2304.14647.
No official code was found, and the paper's Algorithm 1 could not be read here: the rule
below is taken from secondary transcriptions of it, which agree with each other.

Every step takes g at w and updates moving estimates of the mean and variance of the
squared gradient norm n = ||g||²:

    mu  <- delta mu  + (1 - delta) n
    var <- delta var + (1 - delta) (n - mu)²          (with the mu just updated)
    c_t = (t/T) lambda1 + (1 - t/T) lambda2            (t: steps taken, T: total_steps)

and then a SAM step (e = rho g/||g||, second pass, descent with g_adv) if
n >= mu + c_t sqrt(var), else the base optimizer's step with g (one pass). With
lambda1 < lambda2 the threshold falls during training, so SAM steps become more frequent.

Confirmed (two transcriptions): the two moving averages, the threshold, the linear c_t.
Not confirmed: the defaults delta 0.9, lambda1 -1, lambda2 1 (from memory in this
project's reference notes; secondary sources report about half the steps being SAM steps), and
the initial mu and var: both start at 0 here, the usual start of a moving average (so
the first step is a SAM step unless c_0 > 3). ``total_steps`` is filled in by the harness
(epochs x steps per epoch); through the Python API without it c_t stays at the middle of
the schedule, (lambda1 + lambda2) / 2 (warned once).

The decision needs ||g|| after the first pass: one host synchronisation per step. It
is made at the first query of ``perturbs_this_step`` after the first backward pass and
kept until the step ends; mu, var and t are committed when the step descends (a step
abandoned half-way changes nothing) and live in the state dict. g reaches the update on
plain steps and decides the kind of step, so a data-parallel loop must all-reduce the
ascent gradient ("global"): every replica then takes the same decision.
"""

from .grad_mode import without_grad
from .sam import SAM
from .settings import Setting
from .ss_sam import allocate_backup
from .tensors import global_norm

NOT_CONFIRMED = "not confirmed against the paper"


class AESAM(SAM):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source="SAM's CIFAR-10 radius", help="perturbation radius"),
        Setting(
            "delta",
            0.9,
            range="[0, 1)",
            per_group=False,
            source=NOT_CONFIRMED,
            help="decay of the moving mean and variance of ||g||²",
        ),
        Setting(
            "lambda1",
            -1.0,
            range="[-10, 10]",
            per_group=False,
            source=NOT_CONFIRMED,
            help="c_t at the end of training (threshold mu + c_t std)",
        ),
        Setting("lambda2", 1.0, range="[-10, 10]", per_group=False, source=NOT_CONFIRMED, help="c_t at the start of training"),
        Setting(
            "total_steps",
            None,
            kind=int,
            range="[1, inf)",
            optional=True,
            per_group=False,
            source="the run's length (unset: c_t stays at (lambda1 + lambda2) / 2)",
            help="optimizer steps in the whole run (for c_t)",
        ),
    )
    paper = "Jiang et al., ICLR'23"
    rule = "SAM step iff ||g||² >= mu + c_t std (moving mean and std of ||g||²; c_t from lambda2 to lambda1), else a step with g"
    passes = "1 + fraction of SAM steps"
    ascent_sync = "global"

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.state["ae_sam"] = {"mu": 0.0, "var": 0.0, "step": 0, "sam_steps": 0}
        self._pending: tuple[bool, dict] | None = None
        allocate_backup(self)

    def is_adaptive(self, group) -> bool:
        return False

    def threshold_factor(self) -> float:
        """c_t for the coming step."""
        if self.total_steps is None:
            self.warn_once("total_steps", "AE-SAM: without total_steps c_t stays at (lambda1 + lambda2) / 2")
            return (self.lambda1 + self.lambda2) / 2
        progress = min(self.state["ae_sam"]["step"] / self.total_steps, 1.0)
        return progress * self.lambda1 + (1 - progress) * self.lambda2

    @property
    def perturbs_this_step(self) -> bool:
        """Decided from the gradients in ``.grad`` (the first pass's) at the first query of a step."""
        if self._pending is None:
            n = float(global_norm([g for _, params in self.params_with_grad() for g in self.grads(params)])) ** 2
            state = self.state["ae_sam"]
            mu = self.delta * state["mu"] + (1 - self.delta) * n
            var = self.delta * state["var"] + (1 - self.delta) * (n - mu) ** 2
            sam = n >= mu + self.threshold_factor() * var**0.5
            self._pending = (sam, {"mu": mu, "var": var, "step": state["step"] + 1, "sam_steps": state["sam_steps"] + sam})
        return self._pending[0]

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        if self._pending is None:  # a loop that never asked took a plain step with g (in .grad): count it so
            self.perturbs_this_step  # noqa: B018 (updates the statistics)
            self._pending[1]["sam_steps"] = self.state["ae_sam"]["sam_steps"]
        pending = self._pending[1]
        super().descend(zero_grad)
        self.state["ae_sam"] = pending

    @without_grad
    def restore(self) -> None:
        super().restore()
        self._pending = None  # descend calls this after reading it; elsewhere it abandons the step

    @without_grad
    def step(self, closure=None):
        if closure is None:
            return super().step(closure)
        self.restore()  # a step abandoned half-way starts over
        loss = self.evaluate(closure, "ascent")
        if self.perturbs_this_step:
            self.perturb()
            self.evaluate(closure, "descent")
        self.descend()
        return loss

    def logged_values(self) -> dict[str, float]:
        state = self.state["ae_sam"]
        fraction = state["sam_steps"] / state["step"] if state["step"] else 0.0
        return {**super().logged_values(), "sam_fraction": fraction}
