"""A copy of what one optimizer step changes, taken on the device before it, so that a step found
non-finite at its end can be undone: the model's parameters and buffers and the optimizer's
``state_dict``. Used by the training loop's skip rule and by :class:`optimizers.amp.ScaledStep`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from optimizers.tensors import copy_into_kept, copy_tensors, local_tensor


class StepSnapshot:
    """What a sharpness-aware step changes, copied on the device before it (no synchronisation), so a
    step found non-finite at its end can be undone: the model's parameters and buffers (BatchNorm
    statistics of a non-finite pass included) and the optimizer's ``state_dict`` (momentum, the
    variant's state, its random streams). The copies go into buffers kept across steps (fused
    copies, no allocation on the step's path); only an undo allocates."""

    def __init__(self, model: nn.Module):
        self.live = [local_tensor(t) for t in [*model.parameters(), *model.buffers()]]  # a shard, when sharded
        self.saved: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []  # one per tensor in the optimizer's state_dict
        self._state = None  # the state_dict's structure, its tensors replaced by their index in _buffers

    @torch.no_grad()
    def save(self, optimizer) -> None:
        self.saved = copy_into_kept(self.saved, self.live)
        tensors: list[torch.Tensor] = []
        self._state = _structure(optimizer.state_dict(), tensors)
        self._buffers = copy_into_kept(self._buffers, tensors)

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        copy_tensors(self.live, self.saved)
        # clones: the optimizer adopts the tensors it is given, and these buffers serve the next save
        optimizer.load_state_dict(_rebuilt(self._state, [t.clone() for t in self._buffers]))


class _Slot(int):
    """Where a tensor stood in a saved structure: its index in the list of tensors saved with it."""


_ATOMIC = (int, float, bool, str, bytes, type(None))


def _structure(value, tensors: list[torch.Tensor]):
    """A copy of ``value``'s containers (plain dicts, lists and tuples, as every optimizer's state_dict here
    holds), each tensor appended to ``tensors`` and replaced by its :class:`_Slot`, every other value
    copied whole (a later step may change it in place)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if type(value) is dict:
        return {key: _structure(item, tensors) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_structure(item, tensors) for item in value)
    return value if type(value) in _ATOMIC else copy.deepcopy(value)


def _rebuilt(structure, tensors: list[torch.Tensor]):
    """The structure :func:`_structure` copied, its slots filled from ``tensors``."""
    if type(structure) is _Slot:
        return tensors[structure]
    if type(structure) is dict:
        return {key: _rebuilt(item, tensors) for key, item in structure.items()}
    if type(structure) in (list, tuple):
        return type(structure)(_rebuilt(item, tensors) for item in structure)
    # a copy: the optimizer adopts what it is given, and the snapshot may be restored from again
    return structure if type(structure) in _ATOMIC else copy.deepcopy(structure)
