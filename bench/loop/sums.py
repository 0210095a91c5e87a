"""The running sums of one training epoch: its training accuracy and loss, its passes and time.

The metrics stay on the device until the epoch ends (or a checkpoint reads them), and cost as few
operators per step as they can:

- the loss is summed as it always was, one float32 add per step in step order (so a run resumed
  mid-epoch, or counted in any other way, sums the very same numbers); the caller may hand over the
  sum of a batch's losses where it has computed it already;
- a whole batch's outputs wait in a list and are turned into predictions, compared with their labels
  and counted in one go, when a step begins with :data:`COUNT_EVERY` batches or :data:`HELD_VALUES`
  values waiting: a count of correct predictions is an integer, the same in any order;
- a whole batch's samples are counted on the host, where their number is known.

A pass on part of a batch (a variant that selects or splits samples) counts, on the device, only the
samples no earlier pass of the step has seen.

A skipped step's batch counts nowhere where the host decides the skip: :meth:`EpochSums.begin_step` marks
where a step's counts begin and :meth:`EpochSums.drop_step` takes them back (the sums are replaced, never
changed in place, so the mark is the values themselves: nothing is copied). A step undone on the device
(see :mod:`bench.loop.step`) keeps its counts: taking them back would need the host to read its flag.
Between the two nothing may count the waiting outputs (:meth:`EpochSums.metrics`): a drop then raises.
"""

from __future__ import annotations

from typing import Any

import torch

#: Steps whose outputs wait before their predictions are compared and counted together.
COUNT_EVERY = 32
#: Output values (samples x classes) held at most while they wait: 4 MiB of float32.
HELD_VALUES = 1 << 20


class EpochSums:
    """Training accuracy and loss sums of an epoch on the device; passes, samples and time on the host."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None):
        saved = saved or {}
        self.device = device
        self.correct = torch.tensor(float(saved.get("correct", 0.0)), device=device)
        self.loss_sum = torch.tensor(float(saved.get("loss_sum", 0.0)), device=device)
        self.seen = int(saved.get("seen", 0))  # whole batches' samples
        self._seen_on_device = torch.zeros((), dtype=torch.long, device=device)  # samples of partial passes
        self._waiting: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outputs, labels) not counted yet
        self._held = 0  # values in the waiting outputs
        self._step_start: tuple | None = None  # the counts as the current step found them (see begin_step)
        self.passes: int = saved.get("passes", 0)
        self.sample_passes: float = saved.get("sample_passes", 0.0)
        self.time: float = saved.get("time", 0.0)

    def count_batch(
        self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, loss_sum: torch.Tensor | None = None
    ) -> None:
        """Every sample of a batch, new in this step (``loss_sum``: the float32 sum of ``losses``, where the
        caller has it). Its outputs wait until the next :meth:`begin_step` finds enough waiting."""
        self.loss_sum = self.loss_sum + (losses.float().sum() if loss_sum is None else loss_sum)
        self.seen += targets.shape[0]
        self._waiting.append((outputs, targets))
        self._held += outputs.numel()

    def count_new(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, new: torch.Tensor) -> None:
        """The samples of a pass that ``new`` (a bool mask on the device) marks as not yet counted."""
        hits = outputs.argmax(-1) == targets
        self.correct = self.correct + (hits & new).sum()
        self.loss_sum = self.loss_sum + torch.where(new, losses.float(), 0.0).sum()
        self._seen_on_device = self._seen_on_device + new.sum()

    def begin_step(self) -> None:
        """Mark the counts as a step finds them, after counting the waiting outputs where at least
        :data:`COUNT_EVERY` batches or :data:`HELD_VALUES` values wait."""
        if len(self._waiting) >= COUNT_EVERY or self._held >= HELD_VALUES:
            self._count_waiting()
        self._step_start = (self.correct, self.loss_sum, self._seen_on_device, self.seen, len(self._waiting), self._held)

    def drop_step(self) -> None:
        """Take back every count since :meth:`begin_step`: the step was skipped, and its batch counts nowhere."""
        if self._step_start is None:
            raise RuntimeError("EpochSums.drop_step needs a begin_step with nothing counted in bulk since")
        self.correct, self.loss_sum, self._seen_on_device, self.seen, waiting, self._held = self._step_start
        del self._waiting[waiting:]

    def _count_waiting(self) -> None:
        self._step_start = None  # the waiting outputs of the step begun, if any, are counted with the others
        if len(self._waiting) == 1:
            ((outputs, labels),) = self._waiting
            self.correct = self.correct + (outputs.argmax(-1) == labels).sum()
        elif self._waiting:
            outputs, labels = zip(*self._waiting)
            self.correct = self.correct + (torch.cat(outputs).argmax(-1) == torch.cat(labels)).sum()
        self._waiting.clear()
        self._held = 0

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(correct, loss sum, samples seen) as 0-dim tensors on the device; no host read."""
        self._count_waiting()
        return self.correct, self.loss_sum, self._seen_on_device + self.seen

    def to_host(self) -> dict[str, Any]:
        """Every sum as a host number (what a checkpoint saves, and :class:`EpochSums` takes back): one host read."""
        correct, loss_sum, seen = torch.stack([t.double() for t in self.metrics()]).tolist()
        return {
            "correct": correct,
            "loss_sum": loss_sum,
            "seen": int(seen),
            "passes": self.passes,
            "sample_passes": self.sample_passes,
            "time": self.time,
        }
