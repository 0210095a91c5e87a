"""A copy of what one optimizer step changes, taken on the device before it, so that a step found
non-finite at its end can be undone: the model's parameters and buffers and what the optimizer's
``state_dict`` saves. Used by the training loop's skip rule and by :class:`optimizers.amp.ScaledStep`."""

from __future__ import annotations

import copy

import torch
from torch import nn

from optimizers.base import held_torch_state
from optimizers.grad_mode import without_grad
from optimizers.tensors import KeptCopies, copy_tensors, local_tensor, select_where


class StepSnapshot:
    """What a sharpness-aware step changes, copied on the device before it (no synchronisation), so a
    step found non-finite at its end can be undone: the model's parameters and buffers (BatchNorm
    statistics of a non-finite pass included) and what the optimizer's ``state_dict`` saves (momentum,
    the variant's state, its random streams; read from the optimizer unpacked, see :func:`held_state`).
    The copies go into buffers kept across steps (fused copies, no allocation on the step's path); only
    an undo allocates."""

    def __init__(self, model: nn.Module):
        self.buffers = [local_tensor(t) for t in model.buffers()]
        self.live = [*(local_tensor(t) for t in model.parameters()), *self.buffers]  # a shard, when sharded
        self._kept_buffers = KeptCopies()  # the buffers alone (see save_buffers)
        self._state = None  # the held state's structure (see held_state), its tensors replaced by their slot in _buffers
        self._kept = KeptCopies()  # the copies: of ``live``, then of the held state's tensors

    @property
    def saved(self) -> list[torch.Tensor]:
        """The copies of the model's parameters and buffers."""
        return self._kept.copies[: len(self.live)]

    @property
    def _buffers(self) -> list[torch.Tensor]:
        """The copies of the tensors of the optimizer's held state, by slot."""
        return self._kept.copies[len(self.live) :]

    @without_grad
    def save(self, optimizer) -> None:
        tensors: list[torch.Tensor] = []
        self._state = _structure(held_state(optimizer), tensors)
        self._kept.save([*self.live, *tensors])

    def save_buffers(self) -> None:
        """Copy the model's buffers alone (BatchNorm statistics, which a forward pass moves): all a step changes
        that its optimizer does not bring back itself, where each pass decides before the update. A model
        without buffers costs one check."""
        if self.buffers:
            with torch.no_grad():
                self._kept_buffers.save(self.buffers)

    def restore_buffers(self) -> None:
        """Copy back the buffers :meth:`save_buffers` copied."""
        if self.buffers:
            with torch.no_grad():
                self._kept_buffers.restore()

    @without_grad
    def undo_where(self, optimizer, flag: torch.Tensor) -> bool:
        """Undo the step taken since :meth:`save` where ``flag`` (0-dim, on the step's device) is nonzero,
        without reading it: every weight, buffer and tensor of the optimizer's state on the flag's device is
        selected between its copy and its value now, on the device.

        What lives on the host cannot follow a flag the host does not read. The random streams, and the
        entries of ``optimizer.state`` its class names in ``advances_when_skipped``, keep what the step made
        of them: they follow the loop's clock of attempted steps, as the learning-rate schedule and the data
        order do. Any other host-side change (a number in the state, a tensor on another device, a state
        entry added or removed, as on a first step) returns False with nothing changed: the caller decides
        on the host."""
        tensors: list[torch.Tensor] = []
        structure = _structure(held_state(optimizer), tensors)
        advancing = getattr(type(optimizer), "advances_when_skipped", ())
        now = _undoable(structure, advancing)
        if now != _undoable(self._state, advancing):
            return False
        slots = _slots(now)
        for slot in slots:
            t, kept = tensors[slot], self._buffers[slot]
            if t.device != flag.device or t.shape != kept.shape or t.dtype != kept.dtype:
                return False
        select_where([*self.live, *(tensors[s] for s in slots)], [*self.saved, *(self._buffers[s] for s in slots)], flag)
        return True

    @without_grad
    def restore(self, optimizer) -> None:
        copy_tensors(self.live, self.saved)
        # clones: the optimizer adopts the tensors it is given, and these buffers serve the next save
        optimizer.load_state_dict(as_state_dict(_rebuilt(self._state, [t.clone() for t in self._buffers]), optimizer))


def held_state(optimizer) -> dict:
    """What ``optimizer.state_dict()`` saves, as the optimizer holds it, without packing (a sharpness-aware
    optimizer's :meth:`~optimizers.base.SharpnessAwareOptimizer.held_state`; a torch optimizer's state keyed by
    its parameters, and its groups' settings): what a step may change, read at the cost of a few dict copies."""
    held = getattr(optimizer, "held_state", None)
    return held() if held is not None else held_torch_state(optimizer)


def as_state_dict(held: dict, optimizer) -> dict:
    """A :func:`held_state` in the form ``optimizer.load_state_dict`` takes: every parameter key replaced by the
    index ``optimizer.state_dict()`` gives that parameter (torch's numbering, read from it: an undo is rare), and
    each group's settings given its parameters' indices."""
    numbered = optimizer.state_dict()["param_groups"]
    index = {id(p): i for group, saved in zip(optimizer.param_groups, numbered) for p, i in zip(group["params"], saved["params"])}
    packed = {
        key: {index[id(k)] if isinstance(k, torch.Tensor) else k: v for k, v in value.items()} if type(value) is dict else value
        for key, value in held.items()
    }
    packed["param_groups"] = [{**settings, "params": saved["params"]} for settings, saved in zip(held["param_groups"], numbered)]
    return packed


class _Slot(int):
    """Where a tensor stood in a saved structure: its index in the list of tensors saved with it."""


_ATOMIC = frozenset((int, float, bool, str, bytes, type(None)))


def _structure(value, tensors: list[torch.Tensor]):
    """A copy of ``value``'s containers (plain dicts, lists and tuples, as every optimizer's state_dict here
    holds), each tensor appended to ``tensors`` and replaced by its :class:`_Slot`, every other value
    copied whole (a later step may change it in place)."""
    kind = type(value)
    if kind in _ATOMIC:  # most leaves (a param group's settings, its parameters' indices): checked first
        return value
    if kind is dict:  # its leaves handled here, a number without a call (a state holds a dict per parameter)
        copied = {}
        for key, item in value.items():
            if type(item) in _ATOMIC:
                copied[key] = item
            elif type(item) is torch.Tensor:
                copied[key] = _append_slot(item, tensors)
            else:
                copied[key] = _structure(item, tensors)
        return copied
    if kind is list or kind is tuple:
        if all(type(item) in _ATOMIC for item in value):
            return value[:]
        return kind(_structure(item, tensors) for item in value)
    if isinstance(value, torch.Tensor):
        return _append_slot(value, tensors)
    return copy.deepcopy(value)


def _append_slot(tensor: torch.Tensor, tensors: list[torch.Tensor]) -> _Slot:
    """``tensor`` appended to ``tensors``; its slot there."""
    tensors.append(tensor)
    return _Slot(len(tensors) - 1)


def _undoable(structure: dict, advancing: tuple[str, ...]) -> dict:
    """A saved state_dict structure without what a step undone on the device leaves advanced: the random
    streams' states (``generators``) and the named entries of its ``state``."""
    kept = {key: value for key, value in structure.items() if key != "generators"}
    if advancing and isinstance(kept.get("state"), dict):
        kept["state"] = {key: value for key, value in kept["state"].items() if key not in advancing}
    return kept


def _slots(structure) -> list[int]:
    """The tensor slots in a structure, in order."""
    if type(structure) is _Slot:
        return [structure]
    if type(structure) is dict:
        return [slot for item in structure.values() for slot in _slots(item)]
    if type(structure) in (list, tuple):
        return [slot for item in structure for slot in _slots(item)]
    return []


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
