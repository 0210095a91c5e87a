"""The protocol every sharpness-aware optimizer implements, and the mechanics they share.

A sharpness-aware step is: gradient g at w; perturb w to w + e(g); gradient g_s at
w + e; restore w exactly; let the base optimizer descend with g_s. A variant says
how e is computed (:meth:`SharpnessAwareOptimizer.perturbation`) and, where it
needs to, how the descent gradient is formed (:meth:`adjust_gradient`) or how a
whole step runs (:meth:`step`).

Two ways to drive it, with the same arithmetic:

- ``loss = opt.step(closure)``: the optimizer calls the closure once per pass it
  needs (see :mod:`optimizers.closure`);
- the two-phase form for custom loops::

      loss_fn(model(x), y).backward()
      if opt.perturbs_this_step:
          for _ in range(opt.perturbations):  # one perturb() before each later pass (GAM: three)
              opt.perturb()
              loss_fn(model(x), y).backward()
      opt.descend()

  A variant that takes several inner steps on one batch (Lookbehind-SAM) counts them in
  :attr:`~SharpnessAwareOptimizer.descents_left`: a loop that takes the whole step on each
  batch repeats the above while it is above 1 (see ``examples/transformers_trainer.py``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .closure import accepts_requests
from .drivers import refuse_unsupported_driver
from .grad_mode import without_grad
from .settings import Setting
from .tensors import KeptCopies, copy_by_plan, copy_groups, global_norm, is_sharded, same_tensors, shard_like

if TYPE_CHECKING:
    from .regularizer import LossRegularizer

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


def resolve_base_optimizer(base: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    if isinstance(base, str) and base.lower() in BASE_OPTIMIZERS:
        return BASE_OPTIMIZERS[base.lower()]
    raise ValueError(
        f"unknown base optimizer {base!r}; choose one of: {', '.join(BASE_OPTIMIZERS)} (or pass a torch.optim.Optimizer class)"
    )


def split_params_and_model(params, model: nn.Module | None) -> tuple[Any, nn.Module | None]:
    """Accept a module in place of its parameters; named parameters keep their names."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters()), model or params
    return params, model


def held_torch_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What torch's ``Optimizer.state_dict`` saves, as the optimizer holds it (no packing): its state keyed by the
    parameters themselves, and each group's settings (the group without its ``params``)."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return {"state": dict(optimizer.state), "param_groups": settings}


class RunningStatsFreeze:
    """Keeps BatchNorm running statistics as they were before a perturbed pass.

    :meth:`freeze` copies every running buffer (``num_batches_tracked`` included) and
    :meth:`release` copies them back, bit for bit: a layer in train mode normalises by the
    batch statistics either way, so the passes compute what they would with tracking
    switched off. No module attribute changes, so a compiled model (``torch.compile``)
    sees one graph for every pass instead of recompiling when tracking is toggled.
    """

    def __init__(self, modules: Iterable[_BatchNorm]):
        self.modules = [m for m in modules if m.track_running_stats]
        self.frozen = False
        self._kept = KeptCopies()

    def buffers(self) -> list[Tensor]:
        found = []
        for m in self.modules:
            found += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        return found

    @without_grad
    def freeze(self) -> None:
        if self.frozen or not self.modules:
            return
        self._kept.save(self.buffers())
        self.frozen = True

    @without_grad
    def release(self) -> None:
        if self.frozen:
            self._kept.restore()
        self.frozen = False


class BackupPlan(NamedTuple):
    """The parameters :meth:`SharpnessAwareOptimizer.save_weights` last saved, and the fused copies (plans of
    ``copy_groups``) that save them into their backups and restore them."""

    params: list[Tensor]
    save: list
    restore: list


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Base of the SAM family: wraps a base optimizer and shares its ``param_groups``.

    ``params``: parameters, parameter groups, named parameters, or the model itself
    (which also lets the optimizer freeze BatchNorm statistics during the second
    pass; pass ``model=`` to get that with explicit parameter groups). ``seed`` seeds
    the optimizer's own random stream (ESAM's tensor dropping, bSAM's noise).
    ``base_optimizer``: "sgd", "adamw", "adam" or a ``torch.optim.Optimizer`` class;
    remaining keyword arguments go to it (lr, momentum, weight_decay, ...).
    Keyword arguments named in :attr:`settings` are the variant's: per-group ones
    (e.g. ``rho``) are defaults that param groups may override, the others (LookSAM's
    ``k``) become attributes of the optimizer.

    A variant describes itself in class attributes, from which the harness builds its
    flags and docs/variants.md its table: :attr:`settings`, :attr:`paper`, :attr:`rule`,
    :attr:`passes`, :attr:`extra_memory`, :attr:`memory_note` and the capabilities below.
    """

    #: Every setting the variant takes (see :class:`optimizers.settings.Setting`).
    settings: ClassVar[tuple[Setting, ...]] = (
        Setting("rho", 0.05, range="[0, inf)", source="Foret et al. 2021, CIFAR-10", help="perturbation radius"),
    )
    #: The paper, as "Authors, Venue'YY".
    paper: ClassVar[str] = ""
    #: The update rule in one line (the file's docstring has the whole of it).
    rule: ClassVar[str] = ""
    #: Forward-backward passes per step.
    passes: ClassVar[str] = "2"
    #: :meth:`perturb` calls in a step that perturbs (two-phase form): one before each pass after the first.
    perturbations: ClassVar[int] = 1
    #: Tensors the size of the parameters kept between steps beyond the base optimizer's state.
    extra_memory: ClassVar[int] = 1
    #: What that memory holds.
    memory_note: ClassVar[str] = "weight backup"
    #: BatchNorm running statistics come from the first pass only.
    freezes_batchnorm: ClassVar[bool] = True
    #: Variants with an update rule of their own (bSAM) set this to False.
    uses_base_optimizer: ClassVar[bool] = True
    #: How a data-parallel loop must treat the ascent (first-pass) gradient:
    #:
    #: - ``"any"``: it only defines the perturbation, so the loop may keep it per replica
    #:   (the paper's m-sharpness) or all-reduce it; the replicas' weights stay equal
    #:   either way, because the descent gradient is all-reduced (SAM, ASAM, Fisher SAM, F-SAM);
    #: - ``"global"``: it reaches the update itself (GSAM's and LookSAM's g_v, bSAM's
    #:   precision), so it must be all-reduced or the replicas drift apart;
    #: - ``"local"``: it must NOT be all-reduced: ESAM's ascent backward leaves tensors
    #:   out, and replicas that left out different tensors would wait on each other.
    ascent_sync: ClassVar[str] = "any"
    #: Whether the state kept between steps is built from the ascent gradient (FriendlySAM's momentum, VaSSO's d):
    #: with an ascent kept per replica each process holds its own, and a checkpoint keeps each process's.
    state_from_ascent: ClassVar[bool] = False
    #: Why the variant cannot work on sharded parameters (FSDP), in a few words; empty when it can.
    #: The harness refuses a sharded run of a variant that gives a reason.
    sharding_unsupported: ClassVar[str] = ""
    #: An extra loss term the training loop must add, with the sample ids, inputs and state
    #: it needs (SAF's past logits, MESA's EMA model); None for the usual loss. See
    #: :mod:`optimizers.regularizer` for what a loop does with it.
    loss_regularizer: ClassVar[type[LossRegularizer] | None] = None
    #: Whether ``max_grad_norm`` applies: the descent gradient clipped by global norm before the update.
    #: False for an update that is not a gradient step (bSAM's), which refuses the setting.
    clips_descent: ClassVar[bool] = True
    #: Host-side entries of ``self.state`` (numbers, host tensors) that follow the loop's clock of attempted
    #: steps: a step undone on the device (see :meth:`optimizers.snapshot.StepSnapshot.undo_where`) leaves
    #: them advanced, as it leaves the learning-rate schedule, the data order and the random streams.
    #: LookSAM's step count (its k-step cycle); ESAM's draw of the tensors its next ascent differentiates.
    advances_when_skipped: ClassVar[tuple[str, ...]] = ()
    #: Whether a step stopped at any of its passes (a non-finite loss or gradient found there) is undone by
    #: :meth:`restore` alone: before its descent, the step moves nothing but the weights :meth:`perturb` saved
    #: (no state, no setting, no random draw), and its update comes after its last pass. A loop that reads each
    #: pass's flag on the host then needs no snapshot of the optimizer (see :func:`bench.loop.step.take_step`).
    #: ``tests/test_step_sync.py`` checks every variant that declares it.
    undone_by_restore: ClassVar[bool] = False
    #: Tells ``torch.amp.GradScaler.step`` to call :meth:`step` as it is, so that the step can refuse it in one
    #: line (see optimizers.drivers) instead of running on gradients unscaled once.
    _step_supports_amp_scaling: ClassVar[bool] = True

    @classmethod
    def compile_obstacle(cls, settings: dict[str, Any]) -> str | None:
        """Why a ``torch.compile``d model would recompile on every step with these settings, or None.
        A compiled model guards on what its passes see (grad mode, which weights need a gradient);
        the shared mechanics change none of it, so one graph serves every pass."""
        return None

    def __init__(
        self,
        params,
        base_optimizer="sgd",
        *,
        model: nn.Module | None = None,
        seed: int | None = None,
        max_grad_norm: float | None = None,
        **kwargs,
    ):
        params, model = split_params_and_model(params, model)
        if max_grad_norm is not None:
            if not type(self).clips_descent:
                raise ValueError(f"{type(self).__name__} takes no max_grad_norm: its update is not a gradient step")
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
                raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm!r}")
        #: the global norm the descent gradient is clipped to before the update (None: not clipped)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        for setting in self.settings:
            if not setting.per_group:
                setattr(self, setting.name, setting.check(kwargs.pop(setting.name, setting.default)))
        defaults = self.group_defaults()
        own = {name: kwargs.pop(name) for name in list(kwargs) if name in defaults}
        super().__init__(params, {**defaults, **own})
        self.base_optimizer: torch.optim.Optimizer | None = None
        #: the loss term this optimizer declares, once attached by optimizers.regularizer.build_regularizer
        self.regularizer = None
        if self.uses_base_optimizer:
            base_cls = resolve_base_optimizer(base_optimizer)
            try:
                self.base_optimizer = base_cls(self.param_groups, **kwargs)
            except TypeError as err:
                raise ValueError(f"{base_cls.__name__}: {err}") from None
            self.param_groups = self.base_optimizer.param_groups
            self.defaults.update(self.base_optimizer.defaults)
        elif kwargs:
            raise ValueError(
                f"{type(self).__name__} has its own update rule and takes no {', '.join(sorted(kwargs))}; "
                f"its settings are: {', '.join(s.name for s in self.settings)}"
            )
        self._batchnorms = RunningStatsFreeze(
            m for m in (model.modules() if model is not None else ()) if isinstance(m, _BatchNorm)
        )
        self._backup: dict[Tensor, Tensor] = {}
        self._backup_plan: BackupPlan | None = None  # see save_weights
        self._perturbed: list[Tensor] = []
        self._in_perturbed_pass = False  # perturb() ran and no descent followed yet
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned: set[str] = set()
        self.register_step_pre_hook(refuse_unsupported_driver)

    # -- self-description ----------------------------------------------------------------------

    @classmethod
    def setting(cls, name: str) -> Setting:
        """The declaration of setting ``name`` (KeyError if the variant has none)."""
        for setting in cls.settings:
            if setting.name == name:
                return setting
        raise KeyError(f"{cls.__name__} has no setting {name!r}; its settings are: {', '.join(s.name for s in cls.settings)}")

    @classmethod
    def group_defaults(cls) -> dict[str, Any]:
        """Per-group settings and their defaults (what every param group carries)."""
        return {s.name: s.default for s in cls.settings if s.per_group}

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """A context in which the model holds the weights to evaluate and export.

        Most variants store the step's own weights w, so this does nothing. A variant whose
        stored weights are something else between steps (perturbed ones, fast weights)
        overrides it to swap the weights that are its result in and out, bit for bit; the
        harness evaluates, measures and exports inside it, and checkpoints outside it.
        """
        return contextlib.nullcontext()

    def logged_values(self) -> dict[str, float]:
        """Values worth logging once per epoch (the first group's radius)."""
        rho = self.param_groups[0].get("rho") if self.param_groups else None
        return {} if rho is None else {"rho": float(rho)}

    # -- configuration -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking each per-group setting (one-line ValueError naming it), then :meth:`validate`.
        A setting of the whole optimizer (LookSAM's ``k``) is refused in a group, where it would be ignored."""
        whole = [s.name for s in self.settings if not s.per_group and isinstance(param_group, dict) and s.name in param_group]
        if whole:
            raise ValueError(
                f"{type(self).__name__}: {', '.join(whole)} is a setting of the whole optimizer, not of a param group; "
                "pass it as a keyword argument"
            )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for setting in self.settings:
                if setting.per_group:
                    group[setting.name] = setting.check(group[setting.name])
            self.validate(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def validate(self, group: dict[str, Any]) -> None:
        """Cross-field checks of ``group`` (each setting alone is checked by its declaration)."""

    @staticmethod
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    # -- shared mechanics ----------------------------------------------------------------------

    def params_with_grad(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """(group, parameters that have a gradient) for every group."""
        return [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; setting the gradients to None, without its profiler range: a step calls it
        once per pass, where the range costs more than the loop over the parameters."""
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @staticmethod
    def grads(params: list[Tensor]) -> list[Tensor]:
        return [p.grad for p in params]

    def save_weights(self, params: list[Tensor]) -> None:
        """Keep an exact copy of ``params`` for :meth:`restore` (buffers and their fused copies are reused
        across steps that save the same parameters)."""
        plan = self._backup_plan
        if plan is None or not same_tensors(plan.params, params):
            backups = [self._backup[p] if p in self._backup else None for p in params]
            for i, (p, b) in enumerate(zip(params, backups)):
                if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                    backups[i] = self._backup[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            plan = self._backup_plan = BackupPlan(params, copy_groups(backups, params), copy_groups(params, backups))
        copy_by_plan(plan.save)
        self._perturbed = plan.params

    @without_grad
    def return_to_saved(self) -> None:
        """Copy the weights :meth:`save_weights` saved back, bit for bit, still in the perturbed pass (a variant
        that moves from w again within a step: GAM)."""
        if self._perturbed:
            copy_by_plan(self._backup_plan.restore)

    @without_grad
    def restore(self) -> None:
        """Copy the saved weights back, bit for bit, and resume BatchNorm statistics."""
        self.return_to_saved()
        self._perturbed = []
        self.leave_perturbed_pass()

    def leave_perturbed_pass(self) -> None:
        """The step's perturbed pass is over (its weights are back, or the step was abandoned): BatchNorm statistics
        resume, and the next :meth:`perturb` is a new step's. A variant's own ``restore`` calls it too."""
        self._in_perturbed_pass = False
        self._batchnorms.release()

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The optimizer's own random stream on ``device``, saved in its state.

        Seeded with ``seed`` when given, else from torch's global generator.
        """
        device = torch.device(device)
        if device not in self._generators:
            seed = self._seed if self._seed is not None else int(torch.randint(2**62, (1,)).item())
            self._generators[device] = torch.Generator(device).manual_seed(seed)
        return self._generators[device]

    def standard_normal(self, like: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like`` from the optimizer's own stream (:meth:`generator`).

        A sharded ``like`` gets its part of the draw the whole tensor would get: every process
        draws the whole tensor and keeps its shard, so the noise does not depend on the sharding.
        """
        noise = torch.randn(like.shape, generator=self.generator(like.device), device=like.device, dtype=like.dtype)
        if is_sharded(like):
            noise = shard_like(noise, like)
        return noise

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # -- the variant's part --------------------------------------------------------------------

    def perturbation(self, groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[list[Tensor]]:
        """e for each group's parameters, from the gradients in ``.grad``.

        May return the gradient tensors themselves, scaled in place: the first-pass
        gradient is not needed once w + e is reached.
        """
        raise NotImplementedError

    @staticmethod
    def scale_to_radius(
        groups, tensors: list[list[Tensor]], eps: float, radius=lambda group: group["rho"], norm: Tensor | None = None
    ) -> list[list[Tensor]]:
        """Scale each group's ``tensors`` in place by radius(group) / (||tensors|| + eps), the norm global
        over all groups unless given: the step onto SAM's sphere that most variants end with."""
        if norm is None:
            norm = global_norm([t for ts in tensors for t in ts])
        for (group, _), ts in zip(groups, tensors):
            if ts:
                torch._foreach_mul_(ts, radius(group) / (norm + eps))
        return tensors

    def adjust_gradient(self) -> None:
        """Form the descent gradient in ``.grad`` from g_s (and whatever the variant kept)."""

    @without_grad
    def clip_descent_gradient(self) -> None:
        """With ``max_grad_norm``: scale every ``.grad`` by min(1, max_grad_norm / (||g|| + 1e-6)), the norm
        global over all parameters (and shards), as ``torch.nn.utils.clip_grad_norm_`` does in a plain loop;
        on the device, no host synchronisation. The ascent direction is never clipped here."""
        if self.max_grad_norm is None:
            return
        grads = [p.grad for _, params in self.params_with_grad() for p in params]
        if grads:
            coef = torch.clamp(self.max_grad_norm / (global_norm(grads) + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].device))

    def base_step(self) -> None:
        """The base optimizer's step with the descent gradient in ``.grad``, clipped first (max_grad_norm)."""
        self.clip_descent_gradient()
        self.base_optimizer.step()
        self._in_perturbed_pass = False

    @property
    def perturbs_this_step(self) -> bool:
        """Whether this step takes the second pass (LookSAM skips it on most steps)."""
        return True

    @property
    def descents_left(self) -> int:
        """:meth:`descend` calls left in this step on its batch, the coming one included: 1, except for a variant
        that takes several inner steps on one batch (Lookbehind-SAM's k); the two-phase form takes one per call."""
        return 1

    # -- the protocol --------------------------------------------------------------------------

    @without_grad
    def perturb(self, zero_grad: bool = True) -> None:
        """Move w to w + e using the gradient in ``.grad``; freeze BatchNorm statistics."""
        self.refuse_second_perturb()
        groups = self.params_with_grad()
        self.save_weights([p for _, params in groups for p in params])
        for (_, params), e in zip(groups, self.perturbation(groups)):
            if params:
                torch._foreach_add_(params, e)
        self.enter_perturbed_pass(zero_grad)

    def refuse_second_perturb(self) -> None:
        """A one-perturbation step's :meth:`perturb` called again before :meth:`descend` (or :meth:`restore`) would
        save the perturbed weights as the step's own: refused in one line, nothing moved."""
        if self._in_perturbed_pass:
            raise RuntimeError(
                f"{type(self).__name__}.perturb() called twice in one step: the weights are perturbed already; "
                "call descend() (or restore()) first"
            )

    def enter_perturbed_pass(self, zero_grad: bool = True) -> None:
        """The weights are at w + e: freeze BatchNorm statistics (where the variant does) and clear the grads."""
        self._in_perturbed_pass = True
        if self.freezes_batchnorm:
            self._batchnorms.freeze()
        if zero_grad:
            self.zero_grad()

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        """Restore w and take the base optimizer's step with the descent gradient."""
        self.restore()
        self.adjust_gradient()
        self.base_step()
        if zero_grad:
            self.zero_grad()

    def evaluate(self, closure: Callable, phase: str, **request) -> Tensor:
        """Call ``closure`` for one pass; only closures that accept requests get keywords."""
        if accepts_requests(closure):
            return closure(phase=phase, **request)
        if request:
            raise TypeError(
                f"{type(self).__name__} needs a closure that accepts {', '.join(request)}= (see optimizers.BatchClosure)"
            )
        with torch.enable_grad():
            return closure()

    @without_grad
    def step(self, closure: Callable[..., Tensor] | None = None) -> Tensor:
        """One full step; ``closure`` zeroes the grads, runs forward and backward, returns the loss."""
        if closure is None:
            return self.descend_after_passes()
        if not self.perturbs_this_step:  # the one pass of this step is the descent pass
            loss = self.evaluate(closure, "descent")
            self.descend()
            return loss
        loss = self.evaluate(closure, "ascent")
        self.perturb()
        self.evaluate(closure, "descent")
        self.descend()
        return loss

    def descend_after_passes(self) -> None:
        """``step()`` with no closure, as a framework that calls ``step()`` itself does (the Transformers
        Trainer): the step's passes ran in the caller's code, :meth:`perturb` between them (where
        :attr:`perturbs_this_step`), and this is their :meth:`descend`; the gradients are left for the
        caller to zero, as a torch optimizer leaves them."""
        if self.perturbs_this_step and not self._in_perturbed_pass:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure, or perturb() between the step's two backward passes "
                "before step() (or descend())"
            )
        self.descend(zero_grad=False)

    # -- state ---------------------------------------------------------------------------------

    def extra_state_bytes(self) -> int:
        """Bytes this variant keeps between steps beyond the base optimizer (state and weight backup)."""
        tensors = [t for state in self.state.values() if isinstance(state, dict) for t in state.values()]
        tensors += list(self._backup.values())
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    def held_state(self) -> dict[str, Any]:
        """What :meth:`state_dict` saves, as this optimizer holds it: its state and its base optimizer's keyed by the
        parameters themselves, the groups' settings without their parameters, the random streams' states. Read every
        step by :class:`optimizers.snapshot.StepSnapshot`, where packing a state_dict would cost more than the copy."""
        held = held_torch_state(self)
        if self.base_optimizer is not None:
            held["base_state"] = dict(self.base_optimizer.state)
        if self._generators:
            held["generators"] = {str(d): g.get_state() for d, g in self._generators.items()}
        return held

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if self.base_optimizer is not None:
            state_dict["base_state"] = self.base_optimizer.state_dict()["state"]
        if self._generators:
            state_dict["generators"] = {str(d): g.get_state() for d, g in self._generators.items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_state", {})
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        if self.base_optimizer is not None:
            self.base_optimizer.load_state_dict({"state": base_state, "param_groups": state_dict["param_groups"]})
            self.param_groups = self.base_optimizer.param_groups
        # the random streams as saved, and only those (one first made after the save is made again when next
        # used, as a fresh optimizer makes it); setting a saved state draws nothing from torch's global stream
        self._generators = {}
        for device, state in generators.items():
            device = torch.device(device)
            self._generators[device] = torch.Generator(device)
            self._generators[device].set_state(state)
