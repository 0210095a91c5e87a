"""SAF and MESA (Du et al., "Sharpness-Aware Training for Free", NeurIPS'22).

Neither changes the update: both add a trajectory loss to the per-sample training loss,

    lam * tau^2 * KL(softmax(z_ref / tau) || softmax(z / tau)),   kl_start < epoch < kl_end,

(epochs counted from 0, as the official code does), with the gradient through the current
logits z only, and take plain base-optimizer steps (one forward-backward pass). They
differ in the reference z_ref:

- SAF: the sample's own logits from E~ (``past_epochs``) epochs earlier, under that
  epoch's augmentation, kept per sample id in a buffer [N, E~ + 1, C];
- MESA: the logits of an exponential moving average of the model (every state_dict
  entry, decay ``ema_decay``, updated after every step), in eval mode, on the same inputs.

The term lives in a :class:`~optimizers.regularizer.LossRegularizer` that the classes
declare in ``loss_regularizer``; a loop that supports regularisers (``bench.loop``)
builds it and feeds it the sample ids. Driven without one (a bare ``opt.step(closure)``)
the classes are their base optimizer.

Where this follows the official code (AngusDujw/SAF, ``SAF_train.py``, ``MESA_train.py``)
and where not:

- the term, the window, the slot arithmetic of SAF's buffer (slot ``epoch % (E~ + 1)``
  written, slot ``(epoch - E~) % (E~ + 1)`` read) and MESA's EMA (timm's ``ModelEmaV2``
  rule on every floating state_dict entry, the copy in eval mode) are the official ones;
- SAF reads only logits recorded in epoch ``epoch - E~`` itself. The official buffer
  returns what the slot holds: zeros (a uniform target) before epoch E~, or logits
  2 E~ + 1 epochs old for a sample that fell in the dropped last partial batch. Here
  such samples get no term;
- SAF records the logits after the step was taken (a step skipped for a non-finite loss
  records nothing), in float32, and keeps its buffer on the training device (see
  :class:`SAFRegularizer`); the official one is a float32 numpy array on the host;
- MESA copies integer entries (BatchNorm's batch counter) instead of averaging them
  (timm's rule truncates the average, so the counter stays at its initial value);
- both compute the KL from log-softmaxes (the official code takes the log of a softmax).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .base import SharpnessAwareOptimizer
from .grad_mode import without_grad
from .regularizer import WindowedKL
from .settings import Setting

README = "official README and ImageNet run.sh"


class SAFRegularizer(WindowedKL):
    """SAF's term and its logit buffer.

    The buffer (float32 [N, E~ + 1, C], plus the epoch each slot was recorded in) sits on the
    training device: this harness keeps the whole training set there already, and the buffer
    is smaller than the images for its data sets (CIFAR-100, E~ = 2: 60 MB against 150 MB), so
    a step reads and writes it without a host round trip. Each process sees only its shard of
    a batch, and a sample's shard changes from epoch to epoch, so every process keeps the whole
    buffer: after each step the logits and ids the processes noted are all-gathered (one
    collective per step) and every process writes all of them. The buffers stay identical, and
    the checkpoint the main process writes restores every process.
    """

    needs_sample_ids = True

    def __init__(self, model, num_train, num_classes, device, *, past_epochs: int, **settings):
        super().__init__(model, num_train, num_classes, device, **settings)
        self.past_epochs = past_epochs
        slots = past_epochs + 1
        self.logits = torch.zeros(num_train, slots, num_classes, device=self.device)
        self.recorded_in = torch.full((num_train, slots), -1, dtype=torch.long, device=self.device)
        self._noted: list[tuple[Tensor, Tensor, int]] = []

    @property
    def slots(self) -> int:
        return self.past_epochs + 1

    def extra_loss(self, outputs, sample_ids, epoch, inputs):
        if outputs.requires_grad:
            self._noted.append((sample_ids, outputs.detach(), epoch))
        return super().extra_loss(outputs, sample_ids, epoch, inputs)

    def reference(self, outputs, sample_ids, epoch, inputs):
        past = epoch - self.past_epochs
        slot = past % self.slots
        ids = sample_ids.to(self.device)
        z_ref = self.logits[ids, slot].to(outputs.device)
        return z_ref, ((self.recorded_in[ids, slot] == past) & (past >= 0)).to(outputs.device)

    @without_grad
    def after_step(self, model, skipped=False):
        noted, self._noted = self._noted, []
        if skipped or not noted:
            return
        ids = self.gather(torch.cat([i.to(self.device) for i, _, _ in noted]))
        logits = self.gather(torch.cat([z.to(self.device, torch.float32) for _, z, _ in noted]))
        # a sample noted in several passes of the step keeps its first (the step's own weights)
        unique, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full_like(unique, len(ids)).scatter_reduce(0, inverse, torch.arange(len(ids), device=ids.device), "amin")
        epoch = noted[0][2]
        self.logits[ids[first], epoch % self.slots] = logits[first]
        self.recorded_in[ids[first], epoch % self.slots] = epoch

    def state_dict(self):
        return {"logits": self.logits, "recorded_in": self.recorded_in}

    def load_state_dict(self, state):
        self.logits.copy_(state["logits"])
        self.recorded_in.copy_(state["recorded_in"])


class MESARegularizer(WindowedKL):
    """MESA's term and its EMA copy of the model (on the training device, in eval mode)."""

    def __init__(self, model, num_train, num_classes, device, *, ema_decay: float, **settings):
        super().__init__(model, num_train, num_classes, device, **settings)
        self.ema_decay = ema_decay
        self.ema = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)

    def reference(self, outputs, sample_ids, epoch, inputs):
        with torch.no_grad():
            return self.ema(inputs), None

    @without_grad
    def after_step(self, model, skipped=False):
        if skipped:
            return
        model_state = model.state_dict()
        model_state.update(self._first_process_buffers(model, model_state))
        for name, ema_value in self.ema.state_dict().items():
            value = model_state[name].to(ema_value.device)
            if ema_value.is_floating_point():
                ema_value.mul_(self.ema_decay).add_(value, alpha=1 - self.ema_decay)
            else:
                ema_value.copy_(value)

    def _first_process_buffers(self, model, model_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's floating-point buffers as the first process holds them (what data parallelism broadcasts
        at the next forward, and what the run saves): after a step each process's BatchNorm statistics are its
        own shard's. So every process's EMA copy is the same, and the first process's checkpoint restores all.
        One gather per dtype (the identity in a single process)."""
        buffers = dict(model.named_buffers())
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, value in model_state.items():
            if name in buffers and value.is_floating_point():
                by_dtype.setdefault(value.dtype, []).append(name)
        first = {}
        for names in by_dtype.values():
            flat = torch.cat([buffers[n].reshape(-1).to(self.device) for n in names])
            pieces = self.gather(flat[None])[0].split([buffers[n].numel() for n in names])
            first.update({n: piece.view_as(buffers[n]) for n, piece in zip(names, pieces)})
        return first

    def state_dict(self):
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.ema.load_state_dict(state["ema"])


def _window_settings(lam: float, lam_source: str) -> tuple[Setting, ...]:
    return (
        Setting(
            "lam",
            lam,
            range="[0, inf)",
            per_group=False,
            source=lam_source,
            symbol="lambda",
            help="weight of the trajectory loss",
        ),
        Setting(
            "tau",
            5.0,
            range="(0, inf)",
            per_group=False,
            help="temperature of the trajectory loss",
            source="official code and README",
        ),
        Setting(
            "kl_start",
            5,
            kind=int,
            range="[-1, inf)",
            per_group=False,
            source="official code and README",
            help="the term applies from epoch kl_start + 1 (epochs counted from 0)",
        ),
        Setting(
            "kl_end",
            None,
            kind=int,
            range="[0, inf)",
            optional=True,
            per_group=False,
            source="no end (the official 300 / 360 outlast its runs)",
            help="the term applies before epoch kl_end (unset: to the end)",
        ),
    )


class TrajectoryLossOptimizer(SharpnessAwareOptimizer):
    """Plain base-optimizer steps (one pass); the method is the loss term of ``loss_regularizer``.

    Stepped without that term it would silently be its base optimizer, so it refuses to: the
    term is attached by :func:`~optimizers.regularizer.build_regularizer` (which sets
    ``self.regularizer``), and the loop adds its ``extra_loss`` to every pass's loss.
    """

    settings = _window_settings(0.3, README)
    passes = "1"
    extra_memory = 0

    def __init__(self, params, base_optimizer="sgd", **kwargs):
        super().__init__(params, base_optimizer, **kwargs)
        end = self.kl_end
        self.require(
            end is None or end > self.kl_start + 1,
            f"kl_end must be > kl_start + 1 = {self.kl_start + 1} (the term applies for kl_start < epoch < kl_end), got {end}",
        )

    @property
    def perturbs_this_step(self) -> bool:
        return False

    @without_grad
    def descend(self, zero_grad: bool = True) -> None:
        if getattr(self, "regularizer", None) is None:
            name = type(self).__name__
            raise RuntimeError(
                f"{name} is a loss term, not an update rule: without it this step would be a plain {type(self.base_optimizer).__name__} step. Build the "
                f"term with optimizers.regularizer.build_regularizer(optimizer, model, num_train, num_classes, device), add "
                f"its extra_loss(outputs, sample_ids, epoch, inputs) to each pass's per-sample loss and call "
                f"after_step(model) after each step (see optimizers/regularizer.py)"
            )
        super().descend(zero_grad)

    def perturbation(self, groups):
        raise RuntimeError(f"{type(self).__name__} takes no perturbation: perturbs_this_step is always False")

    def logged_values(self):
        return {}


class SAF(TrajectoryLossOptimizer):
    settings = (
        *_window_settings(0.3, f"{README}; SAF_train.py's default is 0.16"),
        Setting(
            "past_epochs",
            2,
            kind=int,
            range="[1, inf)",
            per_group=False,
            symbol="E~",
            source=f"{README}; SAF_train.py's default is 3",
            help="the reference is the sample's logits from this many epochs earlier",
        ),
    )
    paper = "Du et al., NeurIPS'22"
    rule = (
        "base step on CE + lam tau² KL(softmax(z_{e-E~}/tau) || softmax(z/tau)), z_{e-E~} the sample's logits E~ epochs earlier"
    )
    memory_note = "the regulariser's float32 logit buffer, N x (E~ + 1) x C, on the device"
    loss_regularizer = SAFRegularizer


class MESA(TrajectoryLossOptimizer):
    settings = (
        *_window_settings(0.8, f"{README}; MESA_train.py's default is 0.3"),
        Setting(
            "ema_decay",
            0.9998,
            range="[0, 1]",
            per_group=False,
            source="official run.sh, timm's --model-ema-decay default",
            help="decay of the EMA model, updated after every step",
        ),
    )
    paper = "Du et al., NeurIPS'22"
    rule = "base step on CE + lam tau² KL(softmax(z_ema/tau) || softmax(z/tau)), z_ema from an EMA of the model"
    passes = "1 + 1 no-grad fwd (EMA model)"
    memory_note = "the regulariser's EMA copy of the model (1x parameters and buffers)"
    loss_regularizer = MESARegularizer
    sharding_unsupported = "its EMA teacher is a whole, unsharded copy of the model"


__all__ = ["MESA", "SAF", "MESARegularizer", "SAFRegularizer"]
