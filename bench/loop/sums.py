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

A skipped step's batch counts nowhere. Where the host decides the skip, :meth:`EpochSums.begin_step` marks
where a step's counts begin and :meth:`EpochSums.drop_step` takes them back (the sums are replaced, never
changed in place, so the mark is the values themselves: nothing is copied); between the two nothing may
count the waiting outputs (:meth:`EpochSums.metrics`): a drop then raises. A step begun ``held`` (one
undone on the device, whose flag the host reads later) keeps its counts aside with its flag
(:meth:`EpochSums.hold`), and :meth:`EpochSums.settle` adds those of the steps taken, in step order, when
the loop has read the flags: the same additions, later. Held outputs past :data:`HELD_VALUES` values
are counted on the device, masked by their steps' flags, without a host read.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self._waiting_values = 0  # values in the waiting outputs
        self._step_start: tuple | None = None  # the counts as the current step found them (see begin_step)
        self._kept: _StepCounts | None = None  # the counts of the step begun held, kept aside
        self._held_steps: list[tuple[bool | torch.Tensor, _StepCounts]] = []  # held steps' (decision, counts), in order
        self._held_values = 0  # values in the held steps' outputs
        self.passes: int = saved.get("passes", 0)
        self.sample_passes: float = saved.get("sample_passes", 0.0)
        self.time: float = saved.get("time", 0.0)

    def count_batch(
        self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, loss_sum: torch.Tensor | None = None
    ) -> None:
        """Every sample of a batch, new in this step (``loss_sum``: the float32 sum of ``losses``, where the
        caller has it). Its outputs wait until the next :meth:`begin_step` finds enough waiting."""
        self._add("loss_sum", losses.float().sum() if loss_sum is None else loss_sum)
        if self._kept is not None:
            self._kept.seen += targets.shape[0]
            self._kept.waiting.append((outputs, targets))
        else:
            self.seen += targets.shape[0]
            self._waiting.append((outputs, targets))
            self._waiting_values += outputs.numel()

    def count_new(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, new: torch.Tensor) -> None:
        """The samples of a pass that ``new`` (a bool mask on the device) marks as not yet counted."""
        hits = outputs.argmax(-1) == targets
        self._add("correct", (hits & new).sum())
        self._add("loss_sum", torch.where(new, losses.float(), 0.0).sum())
        self._add("_seen_on_device", new.sum())

    def _add(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` to the device sum ``name``: a new tensor, never in place (see drop_step); for a step
        begun held, to its counts kept aside."""
        if self._kept is not None:
            self._kept.added.append((name, value))
        else:
            self._add_now(name, value)

    def _add_now(self, name: str, value: torch.Tensor) -> None:
        setattr(self, name, getattr(self, name) + value)

    def begin_step(self, held: bool = False) -> None:
        """Mark the counts as a step finds them, after counting the waiting outputs where at least
        :data:`COUNT_EVERY` batches or :data:`HELD_VALUES` values wait; ``held``: the step's counts are kept
        aside until :meth:`hold` and :meth:`settle` (or :meth:`drop_step`, or :meth:`keep_step`)."""
        if len(self._waiting) >= COUNT_EVERY or self._waiting_values >= HELD_VALUES:
            self._count_waiting()
        self._step_start = (
            self.correct,
            self.loss_sum,
            self._seen_on_device,
            self.seen,
            len(self._waiting),
            self._waiting_values,
        )
        self._kept = _StepCounts() if held else None

    def hold(self, flag: torch.Tensor) -> None:
        """The held step's counts wait for its flag (0-dim, on the device; nonzero: skipped), read later by
        :meth:`settle`. Outputs of waiting steps past :data:`HELD_VALUES` values are counted at once, each
        step's predictions masked by its flag on the device: no host read."""
        if self._kept is None:
            raise RuntimeError("EpochSums.hold needs a step begun held")
        self._queue(flag)
        if self._held_values >= HELD_VALUES:
            self._count_held_outputs()

    def keep_step(self) -> None:
        """The held step was taken, decided on the host: its counts follow those of the steps held before it."""
        if self._kept is not None:
            self._queue(False)
            if all(decision is False for decision, _ in self._held_steps):
                self.settle()

    def _queue(self, decision: bool | torch.Tensor) -> None:
        self._held_steps.append((decision, self._kept))
        self._held_values += sum(outputs.numel() for outputs, _ in self._kept.waiting)
        self._kept = None

    def settle(self, known: Sequence[tuple[torch.Tensor, bool]] = ()) -> None:
        """Add the counts of the held steps that were taken, in step order, and forget those skipped.
        ``known``: (flag, read as nonzero) pairs the caller has read already; the other flags are read here, in
        one host read (none where every one is known or was decided on the host)."""
        if not self._held_steps:
            return
        read = {id(flag): skipped for flag, skipped in known}
        unread = [d for d, _ in self._held_steps if isinstance(d, torch.Tensor) and id(d) not in read]
        if unread:
            read.update(zip(map(id, unread), torch.stack(unread).ne(0).tolist()))
        for decision, counts in self._held_steps:
            if isinstance(decision, torch.Tensor) and read[id(decision)]:
                continue
            for name, value in counts.added:
                self._add_now(name, value)
            self.seen += counts.seen
            self._waiting += counts.waiting
            self._waiting_values += sum(outputs.numel() for outputs, _ in counts.waiting)
        self._held_steps.clear()
        self._held_values = 0
        self._step_start = None  # counts added since any mark

    def _count_held_outputs(self) -> None:
        """Count the correct predictions of the waiting steps' outputs in one go, each sample's masked by its
        step's flag (a step taken on the host: kept), on the device; the steps keep their other counts."""
        outputs, labels, flags, sizes = [], [], [], []
        for decision, counts in self._held_steps:
            for out, lab in counts.waiting:
                outputs.append(out)
                labels.append(lab)
                flags.append(decision if isinstance(decision, torch.Tensor) else None)
                sizes.append(lab.shape[0])
            counts.waiting = []
        device = labels[0].device
        zero = torch.zeros((), device=device)
        taken = torch.stack([zero if f is None else f.to(device, zero.dtype) for f in flags]).eq(0)
        taken = torch.cat([t.expand(n) for t, n in zip(taken, sizes)])  # views and one copy: no host data sent
        self.correct = self.correct + ((torch.cat(outputs).argmax(-1) == torch.cat(labels)) & taken).sum()
        self._held_values = 0

    def drop_step(self) -> None:
        """Take back every count since :meth:`begin_step`: the step was skipped, and its batch counts nowhere."""
        if self._kept is not None:  # a held step decided on the host: nothing of it was added
            self._kept = None
            return
        if self._step_start is None:
            raise RuntimeError("EpochSums.drop_step needs a begin_step with nothing counted in bulk since")
        self.correct, self.loss_sum, self._seen_on_device, self.seen, waiting, self._waiting_values = self._step_start
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
        self._waiting_values = 0

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(correct, loss sum, samples seen) as 0-dim tensors on the device; no host read, unless held steps
        wait for their flags (:meth:`settle`)."""
        self.settle()
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


class _StepCounts:
    """What a held step counted, kept aside: the additions to the device sums in their order, the
    samples of its whole batches, its outputs and labels."""

    def __init__(self):
        self.added: list[tuple[str, torch.Tensor]] = []
        self.seen = 0
        self.waiting: list[tuple[torch.Tensor, torch.Tensor]] = []
