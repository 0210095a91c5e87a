"""One optimizer step inside the Accelerate loop: the harness's closure and the skip rule.

The closure runs each pass the optimizer asks for under DDP's synchronisation rule for
that pass (the run's ``ascent_sync``, or the variant's declared one), scales and
unscales fp16 losses, and flags a non-finite loss or gradient on the device.

The skip rule has two forms, with the same result for every step taken.

- **On the host** (a CPU, where reading a flag costs nothing; an fp16 run, whose loss scale is a
  host number; a variant with a loss term). A plain torch optimizer evaluates its closure once,
  before it changes anything, so its one pass decides there (one host read per step). On a CPU,
  so does each pass of a variant that declares ``undone_by_restore`` (nothing but the weights
  moves before its update, and its ``restore`` brings them back): a read per pass, no snapshot.
  Either way the model's buffers (BatchNorm statistics, which the forward pass moves) are copied
  before the step and copied back if it stops. Any other sharpness-aware step runs all its passes
  without looking (a non-finite ascent gradient makes the perturbed weights, and so every later
  pass, non-finite too), and is decided once at its end (one host read); a skipped step is then
  undone from a :class:`StepSnapshot` taken before it began (weights, BatchNorm buffers and the
  optimizer's state as its ``state_dict`` holds it). A step skipped on the host takes back what
  its passes counted in the epoch's training metrics, so its batch counts nowhere; so does one
  undone on the device (below).
- **On the device** (an accelerator otherwise): no host read. Every step is taken, then undone
  on the device where its flag is set (:meth:`StepSnapshot.undo_where`: a select between the
  snapshot and the new values); the loop reads the flags of many steps at once, later (see
  :mod:`bench.loop.epoch`). Host-side values a step changes (a first step's new state, a
  variant's counters) make that step decide on the host instead, except those that follow
  the loop's clock (the random streams, a variant's ``advances_when_skipped``). What its passes
  counted in the training metrics waits with its flag (:meth:`EpochSums.hold`) and is added
  when the loop reads the flags, if the step was taken.

Every process must agree before a step is skipped, or one would wait forever in the next
synchronised backward: the flag is summed across processes, once per step, by every process.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedType

from bench.loop.precision import LossScaler, NonFiniteGradient
from bench.loop.sums import EpochSums
from optimizers import BatchClosure, SharpnessAwareOptimizer
from optimizers.snapshot import StepSnapshot
from optimizers.tensors import GradientCheck


def effective_ascent_sync(optimizer, requested: str) -> str:
    """The ascent synchronisation a run uses, "global" (the ascent pass's gradient all-reduced) or
    "local" (kept per replica): the variant's declared ``ascent_sync`` where it has one ("global": its
    ascent gradient reaches the update; "local": it must stay per replica); "any" takes ``requested``."""
    declared = getattr(type(optimizer), "ascent_sync", "any")
    return requested if declared == "any" else declared


def backward_is_plain(accelerator, scaler: LossScaler | None) -> bool:
    """Whether what ``accelerator.backward`` does here (no DeepSpeed or Megatron, no scaler of its own, no
    accumulation of its own) is ``loss.backward()`` after dividing the loss by 1: called directly, the same
    gradients bit for bit, two operators fewer per pass."""
    return (
        scaler is None
        and accelerator.scaler is None
        and accelerator.gradient_accumulation_steps == 1
        and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        and not accelerator.has_lomo_optimizer
    )


class TrainClosure(BatchClosure):
    """The harness's closure: DDP sync per pass, fp16 scaling, finiteness checks, training metrics.

    Training accuracy and loss count each sample at the first pass that sees it in a step: the
    step's own weights for a two-pass step, each sub-batch's first pass where a variant splits
    the batch, the only pass of a one-pass step.

    With a loss ``regularizer`` (see :mod:`optimizers.regularizer`) every pass trains on
    ``loss_fn(outputs, targets) + regularizer.extra_loss(outputs, ids, epoch, inputs)`` for the
    samples of that pass (``sample_ids`` index the training set); the metrics keep ``loss_fn``.
    """

    def __init__(
        self,
        model,
        loss_fn,
        inputs,
        targets,
        *,
        accelerator,
        ascent_sync: str,
        scaler: LossScaler | None,
        accumulation_steps: int = 1,
        sample_ids=None,
        regularizer=None,
        epoch: int = 0,
        sums: EpochSums | None = None,
        max_grad_norm: float | None = None,
        params: list[torch.Tensor] | None = None,
        plain_backward: bool | None = None,
    ):
        #: a plain torch optimizer's clipping, after its one pass (a variant clips its own descent gradient)
        self.max_grad_norm = max_grad_norm
        self._clear: torch.Tensor | None = None  # a flag the host last read as clear: the next step's, unchanged
        self.task_loss, self.regularizer = loss_fn, regularizer
        if regularizer is not None:
            loss_fn = self._regularised_loss
        # ``plain_backward``: the loop's answer of :func:`backward_is_plain`, kept across its steps; a plain
        # backward is autograd's own (BatchClosure's default)
        self._plain_backward = backward_is_plain(accelerator, scaler) if plain_backward is None else plain_backward
        no_sync = (lambda: accelerator.no_sync(model)) if accelerator.num_processes > 1 else None
        # every parameter, not only those needing a gradient now: a variant may switch requires_grad
        # between passes (ESAM), and each pass's gradients must be unscaled and checked (``params``: the
        # loop's list of them, kept across steps)
        super().__init__(
            model,
            loss_fn,
            inputs,
            targets,
            backward=None if self._plain_backward else self._scaled_backward,
            accumulation_steps=accumulation_steps,
            no_sync=no_sync,
            ascent_sync=ascent_sync,
            params=list(model.parameters()) if params is None else params,
        )
        self.accelerator, self.scaler = accelerator, scaler
        self._world = accelerator.num_processes
        self._pass_sum: torch.Tensor | None = None  # the sum of the last pass's losses, where mean_loss kept it
        self._sums_on_cpu = regularizer is None and inputs.device.type == "cpu"  # where mean_loss keeps it
        self._check = GradientCheck(self.params)  # each pass's gradients: unscaled and checked
        self._start(inputs, targets, sample_ids, epoch, sums)

    def next_batch(self, inputs, targets, sample_ids=None, epoch: int = 0, sums: EpochSums | None = None) -> None:
        """Make this closure the next step's: its batch, its epoch, the sums its metrics go to."""
        super().next_batch(inputs, targets)
        self._start(inputs, targets, sample_ids, epoch, sums)

    def _start(self, inputs, targets, sample_ids, epoch: int, sums: EpochSums | None) -> None:
        self.sample_ids, self.epoch = sample_ids, epoch
        #: The training metrics of the samples counted go to ``sums`` (the loop's running sums of the
        #: epoch), else to fresh sums of this step.
        self.sums = EpochSums(inputs.device) if sums is None else sums
        self._counted = None  # which samples have been counted, once a pass runs on part of the batch
        self._subset = None
        #: Passes flag a non-finite loss or gradient here; with ``defer_check`` (set by take_step for
        #: a sharpness-aware step) nothing reads it until :meth:`nonfinite`, else each pass decides.
        self.defer_check = False
        # a new tensor each step, unless the host read the last one as clear (a flag left on the device may be
        # kept by the loop, to be read with others later)
        clear = self._clear
        self.bad = clear if clear is not None and clear.device == inputs.device else torch.zeros((), device=inputs.device)
        self._clear = None

    def __call__(self, subset=None, **request):
        self._subset = subset
        if self.regularizer is not None:
            self._micro_batches = self._split(subset)
        return super().__call__(subset, **request)

    def _split(self, subset) -> list:
        """(inputs, sample ids) of each micro-batch of a pass, in the order BatchClosure runs them."""
        x, ids = self.inputs, self.sample_ids
        if subset is not None:
            x, ids = x[subset], ids[subset]
        parts = zip(x.tensor_split(self.accumulation_steps), ids.tensor_split(self.accumulation_steps))
        return [(xi, i) for xi, i in parts if len(i)]

    def _regularised_loss(self, outputs, targets):
        inputs, ids = self._micro_batches.pop(0)
        return self.task_loss(outputs, targets) + self.regularizer.extra_loss(outputs, ids, self.epoch, inputs)

    def mean_loss(self, losses):
        """The pass's mean loss; for a step's first pass on a CPU, from the float32 sum the metrics add too: there a
        float32 mean is that sum divided by the count (ATen's ``mean_out``), the same bits from one reduction
        instead of two (a later pass's sum is not counted: its mean is taken as it is)."""
        if self._sums_on_cpu and self.passes == 0 and losses.dtype is torch.float32:
            self._pass_sum = losses.sum()
            return self._pass_sum / losses.numel()
        self._pass_sum = None
        return losses.mean()

    def _scaled_backward(self, loss):
        if self.scaler is None:
            self.accelerator.backward(loss)
        else:
            self.scaler.backward(loss)

    def after_backward(self, loss, phase):
        inv_scale = 1.0 / self.scaler.scale if self.scaler is not None else 1.0
        self._check(inv_scale, found=self.bad, also_check=loss)
        if not self.defer_check and self.nonfinite():
            raise NonFiniteGradient(f"non-finite loss or gradient in a {phase} pass")
        if self.max_grad_norm is not None:  # a plain optimizer's one pass (a variant clips its own descent)
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def flag(self) -> torch.Tensor:
        """Nonzero where any pass so far, on any process, had a non-finite loss or gradient: a 0-dim tensor
        on the device. Every process must call it at the same point (one all-reduce, no host read)."""
        if self._world == 1:
            return self.bad
        return self.accelerator.reduce(self.bad.reshape(1), reduction="sum").reshape(())

    def nonfinite(self) -> bool:
        """:meth:`flag`, read by the host: one host synchronisation."""
        found = bool(self.flag().item())
        self._clear = None if found else self.bad  # a sum of no flag set: this process's own is clear
        return found

    def observe(self, outputs, targets, losses, phase):
        if self._subset is None and self._counted is None:
            if self.passes > 1:  # a later pass over the whole batch: every sample is counted already
                return
            new = None  # the first pass, over the whole batch: every sample is new
        else:  # a pass on part of the batch: count the samples no earlier pass has seen
            if self._counted is None:
                self._counted = torch.full((self.batch_size,), self.passes > 1, dtype=torch.bool, device=targets.device)
            index = torch.arange(self.batch_size, device=targets.device)
            if self._subset is not None:
                index = index[self._subset]
            new = ~self._counted[index]  # kept on the device: no host synchronisation here
            self._counted[index] = True
        if self.regularizer is not None:  # the metrics report the task loss alone
            losses = self.task_loss(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), targets)
        if new is None:
            self.sums.count_batch(outputs, targets, losses, self._pass_sum)
        else:
            self.sums.count_new(outputs, targets, losses, new)


def evaluation_weights(optimizer):
    """The context in which the model holds the weights to evaluate and export (see
    ``SharpnessAwareOptimizer.evaluation_weights``); plain torch optimizers have nothing to swap."""
    swap = getattr(optimizer, "evaluation_weights", None)
    return swap() if swap is not None else contextlib.nullcontext()


def skips_on_device(device: torch.device, scaler: LossScaler | None, regularizer) -> bool:
    """Whether a run's steps are undone on the device rather than decided on the host (see the module's
    docstring): on an accelerator, unless an fp16 loss scale or a loss term needs each decision on the host."""
    return device.type != "cpu" and scaler is None and regularizer is None


def take_step(
    optimizer,
    closure: TrainClosure,
    snapshot: StepSnapshot | None = None,
    *,
    on_device: bool = False,
    each_pass: bool | None = None,
) -> bool | torch.Tensor:
    """One optimizer step; a non-finite pass skips it, leaving weights and optimizer state as they were.

    Returns whether it was skipped: a bool decided on the host, or, ``on_device``, the step's flag as a
    0-dim device tensor (nonzero: skipped, and undone already) where the step could be undone without a
    host read. On the host, a variant that declares ``undone_by_restore`` decides at each of its passes
    where ``each_pass`` (by default, on a CPU, where a read waits for nothing), else once at its end."""
    snapshot = snapshot or StepSnapshot(closure.model)
    # where the step's counts begin: a skip takes them back; undone on the device, they wait for its flag
    closure.sums.begin_step(held=on_device)
    if on_device:
        snapshot.save(optimizer)
        closure.defer_check = True
        optimizer.step(closure)
        flag = closure.flag()
        if snapshot.undo_where(optimizer, flag):
            closure.sums.hold(flag)
            return flag
        if not bool(flag.item()):  # a host-side change: decided on the host
            closure.sums.keep_step()
            return False
        _undo(optimizer, closure, snapshot)
        return True
    sharpness_aware = isinstance(optimizer, SharpnessAwareOptimizer)
    if each_pass is None:
        each_pass = closure.bad.device.type == "cpu"
    if not sharpness_aware or (each_pass and type(optimizer).undone_by_restore):  # each pass decides, before the update
        snapshot.save_buffers()
        closure.defer_check = False
        try:
            optimizer.step(closure)
            return False
        except NonFiniteGradient:
            if sharpness_aware:
                optimizer.restore()
            snapshot.restore_buffers()
            optimizer.zero_grad()
            closure.sums.drop_step()
            return True
    snapshot.save(optimizer)
    closure.defer_check = True
    optimizer.step(closure)
    if not closure.nonfinite():
        return False
    _undo(optimizer, closure, snapshot)
    return True


def _undo(optimizer, closure: TrainClosure, snapshot: StepSnapshot) -> None:
    if isinstance(optimizer, SharpnessAwareOptimizer):
        optimizer.restore()  # drop a half-done step's bookkeeping (a perturbation still applied)
    snapshot.restore(optimizer)
    optimizer.zero_grad()
    closure.sums.drop_step()
