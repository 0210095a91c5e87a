"""SS-SAM (Zhao et al.): stochastic scheduled SAM.

Paper: "SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for Efficiently
Training Deep Neural Networks", arXiv 2203.09962 (reworked as "Randomized
Sharpness-Aware Training", RST, OpenReview 8foynpwwRb). No official code was found.

Each step draws a Bernoulli trial with probability p_t: 1 is a SAM step
(e = rho g / ||g||, two passes), 0 the base optimizer's step with g (one pass). So a
step costs 1 + p_t passes on average. The paper studies constant, piecewise, linear and
trigonometric schedules; two are implemented:

- constant: p_t = p (``p_end`` unset);
- linear:   p_t = p + (p_end - p) min(t / total_steps, 1), t the steps taken so far.

The linear schedule needs the length of training, ``total_steps``: the harness fills it
in (epochs x steps per epoch); through the Python API without it the schedule stays at p
(warned once).

Draws come from the optimizer's own random stream (:meth:`generator`, saved in its state
together with the step count), so a resumed run makes the same choices. The draw is made
at the first query of ``perturbs_this_step`` in a step and kept until the step ends (the
descent), so every query in a step agrees. A step abandoned half-way (``restore()``)
forgets its draw; the next step draws anew. The stream is seeded when the optimizer is
built, so processes built alike (same seed, same model) draw alike: every replica of a
data-parallel run takes the same passes. The ascent gradient only defines e ("any").

Default p 0.5: about 1.5 passes per step, the average cost the abstract compares with
SAM; the paper's recommended schedule was not confirmed. rho 0.05 is SAM's.
"""

import torch

from .grad_mode import without_grad
from .sam import SAM
from .settings import Setting


def allocate_backup(opt) -> None:
    """Allocate the weight backup now rather than at the first SAM step, which may come late or
    never: the memory a run needs is taken from the start, whatever the step choices."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                opt._backup[p] = torch.empty_like(p, memory_format=torch.preserve_format)


class SSSAM(SAM):
    settings = (
        Setting("rho", 0.05, range="[0, inf)", source="SAM's CIFAR-10 radius", help="perturbation radius"),
        Setting(
            "p",
            0.5,
            range="[0, 1]",
            per_group=False,
            source="about 1.5 passes per step",
            help="probability of a SAM step (at the start of training, with p_end)",
        ),
        Setting(
            "p_end",
            None,
            range="[0, 1]",
            optional=True,
            per_group=False,
            source="p (a constant schedule)",
            help="probability at the end of training (linear schedule)",
        ),
        Setting(
            "total_steps",
            None,
            kind=int,
            range="[1, inf)",
            optional=True,
            per_group=False,
            source="the run's length (unset: the schedule stays at p)",
            help="optimizer steps in the whole run (for the schedule)",
        ),
    )
    paper = "Zhao et al., arXiv'22"
    rule = "each step a SAM step with probability p_t (constant, or linear from p to p_end), else a plain step with g"
    undone_by_restore = False  # a step's draw of its passes advances its own stream
    passes = "1 + p_t (mean)"

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        self.state["ss_sam"] = {"step": 0, "sam_steps": 0}
        self._draw: bool | None = None
        self.generator()  # seed the stream now: processes built alike draw alike
        allocate_backup(self)

    def probability(self) -> float:
        """p_t for the coming step."""
        if self.p_end is None:
            return self.p
        if self.total_steps is None:
            self.warn_once("total_steps", "SS-SAM: p_end needs total_steps; the schedule stays at p")
            return self.p
        progress = min(self.state["ss_sam"]["step"] / self.total_steps, 1.0)
        return self.p + (self.p_end - self.p) * progress

    @property
    def perturbs_this_step(self) -> bool:
        if self._draw is None:
            self._draw = bool(torch.rand((), generator=self.generator()).item() < self.probability())
        return self._draw

    @without_grad
    def restore(self) -> None:
        super().restore()
        self._draw = None  # ends the step's draw (descend calls this too, after the draw was used)

    def is_adaptive(self, group) -> bool:
        return False

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        sam = self._draw is True
        super().descend(zero_grad)
        counts = self.state["ss_sam"]
        self.state["ss_sam"] = {"step": counts["step"] + 1, "sam_steps": counts["sam_steps"] + sam}

    def logged_values(self) -> dict[str, float]:
        counts = self.state["ss_sam"]
        fraction = counts["sam_steps"] / counts["step"] if counts["step"] else 0.0
        return {**super().logged_values(), "p": self.probability(), "sam_fraction": fraction}
