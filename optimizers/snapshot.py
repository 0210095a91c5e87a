"""A copy of what one optimizer step changes, taken on the device before it, so that a step found
non-finite at its end can be undone: the model's parameters and buffers and the optimizer's
``state_dict``. Used by the training loop's skip rule and by :class:`optimizers.amp.ScaledStep`."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

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
        self._state_leaves: list = []
        self._state_spec = None

    @torch.no_grad()
    def save(self, optimizer) -> None:
        self.saved = copy_into_kept(self.saved, self.live)
        leaves, self._state_spec = tree_flatten(optimizer.state_dict())
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        self._buffers = copy_into_kept(self._buffers, tensors)
        buffers = iter(self._buffers)
        self._state_leaves = [next(buffers) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for v in leaves]

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        copy_tensors(self.live, self.saved)
        # clones: the optimizer adopts the tensors it is given, and these buffers serve the next save
        leaves = [v.clone() if isinstance(v, torch.Tensor) else v for v in self._state_leaves]
        optimizer.load_state_dict(tree_unflatten(leaves, self._state_spec))
