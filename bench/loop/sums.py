"""The running sums of one training epoch: its training accuracy and loss, its passes and time.

The metrics stay on the device until the epoch ends (or a checkpoint reads them), and cost as few
operators per step as they can:

- the loss is summed as it always was, one float32 add per step in step order (so a run resumed
  mid-epoch, or counted in any other way, sums the very same numbers);
- a whole batch's predictions (``argmax``, one operator) wait in a list and are compared with their
  labels and counted every :data:`COUNT_EVERY` steps in one go: a count of correct predictions is an
  integer, the same in any order;
- a whole batch's samples are counted on the host, where their number is known.

A pass on part of a batch (a variant that selects or splits samples) counts, on the device, only the
samples no earlier pass of the step has seen.
"""

from __future__ import annotations

from typing import Any

import torch

#: Steps whose predictions wait before they are compared and counted together: at most this many
#: batches of predicted labels (one integer per sample) are held.
COUNT_EVERY = 32


class EpochSums:
    """Training accuracy and loss sums of an epoch on the device; passes, samples and time on the host."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None):
        saved = saved or {}
        self.device = device
        self.correct = torch.tensor(float(saved.get("correct", 0.0)), device=device)
        self.loss_sum = torch.tensor(float(saved.get("loss_sum", 0.0)), device=device)
        self.seen = int(saved.get("seen", 0))  # whole batches' samples
        self._seen_on_device = torch.zeros((), dtype=torch.long, device=device)  # samples of partial passes
        self._waiting: list[tuple[torch.Tensor, torch.Tensor]] = []  # (predicted, labels) not counted yet
        self.passes: int = saved.get("passes", 0)
        self.sample_passes: float = saved.get("sample_passes", 0.0)
        self.time: float = saved.get("time", 0.0)

    def count_batch(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> None:
        """Every sample of a batch, new in this step."""
        self.loss_sum += losses.float().sum()
        self.seen += targets.shape[0]
        self._waiting.append((outputs.argmax(-1), targets))
        if len(self._waiting) >= COUNT_EVERY:
            self._count_waiting()

    def count_new(self, outputs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, new: torch.Tensor) -> None:
        """The samples of a pass that ``new`` (a bool mask on the device) marks as not yet counted."""
        hits = outputs.argmax(-1) == targets
        self.correct += (hits & new).sum()
        self.loss_sum += torch.where(new, losses.float(), 0.0).sum()
        self._seen_on_device += new.sum()

    def _count_waiting(self) -> None:
        if len(self._waiting) == 1:
            ((predicted, labels),) = self._waiting
            self.correct += (predicted == labels).sum()
        elif self._waiting:
            predicted, labels = zip(*self._waiting)
            self.correct += (torch.cat(predicted) == torch.cat(labels)).sum()
        self._waiting.clear()

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
