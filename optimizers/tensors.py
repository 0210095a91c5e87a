"""Multi-tensor helpers for plain and sharded tensors, shared by the optimizers and the loops that drive them.

Norms, inner products and copies over lists of tensors, on ``torch._foreach_*`` kernels and with no host
synchronisation. A sharded tensor (a DTensor, such as an FSDP2 parameter or its gradient) counts whole:
its norm and its inner products sum over every process's shard, the same result on every process.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import Tensor

try:  # sharded parameters (FSDP2's fully_shard) are DTensors
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (each process holds a part of it, e.g. an FSDP2 parameter or its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a sharded tensor's local shard (writing to it writes ``t``), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _sums_over_shards(tensors: list[Tensor], local_sums: Tensor) -> Tensor:
    """``local_sums[i]`` is this process's part of a sum over the elements of ``tensors[i]``; returns
    the whole sums, one per tensor. A sharded tensor's parts are added over the mesh dimensions it
    is sharded along (one all-reduce per mesh and placement; replicated dimensions hold copies and
    are not added); a plain tensor's part is its whole."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if not is_sharded(t):
            continue
        if not all(p.is_shard() or p.is_replicate() for p in t.placements):
            raise ValueError(f"cannot sum over a tensor placed as {t.placements}: only sharded or replicated tensors")
        if any(p.is_shard() for p in t.placements):
            groups.setdefault((t.device_mesh, tuple(t.placements)), []).append(i)
    if not groups:
        return local_sums
    local_sums = local_sums.clone()
    for (mesh, placements), index in groups.items():
        partial = [Partial("sum") if p.is_shard() else Replicate() for p in placements]
        rows = torch.tensor(index, device=local_sums.device)
        total = DTensor.from_local(local_sums[rows], mesh, partial, run_check=False).full_tensor()
        local_sums[rows] = total.to(local_sums.dtype)
    return local_sums


def tensor_norms(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of each tensor, as a 1-dim tensor (a sharded tensor's norm is over all its shards)."""
    if not tensors:
        return torch.zeros(0)
    if not any(map(is_sharded, tensors)):
        return torch.stack(torch._foreach_norm(tensors))
    squares = torch.stack(torch._foreach_norm([local_tensor(t) for t in tensors])).square()
    return _sums_over_shards(tensors, squares).sqrt()


def global_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm over a list of tensors, as a 0-dim tensor (no host synchronisation; sharded
    tensors: over every process's shards, the same on every process)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(tensor_norms(tensors))


def tensor_dots(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """The inner product of each pair of tensors, as a 1-dim tensor (a sharded pair's over all its shards)."""
    if not a:
        return torch.zeros(0)
    if not any(is_sharded(x) or is_sharded(y) for x, y in zip(a, b)):
        return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)])
    for x, y in zip(a, b):
        if is_sharded(x) != is_sharded(y) or (is_sharded(x) and tuple(x.placements) != tuple(y.placements)):
            raise ValueError("a pair of tensors is sharded differently: their inner product needs them sharded alike")
    local = torch.stack([torch.vdot(local_tensor(x).reshape(-1), local_tensor(y).reshape(-1)) for x, y in zip(a, b)])
    return _sums_over_shards(a, local)


def global_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Inner product of two lists of tensors, as a 0-dim tensor (sharded pairs: over every shard)."""
    if not a:
        return torch.zeros(())
    return tensor_dots(a, b).sum()


def copy_tensors(destinations: list[Tensor], sources: list[Tensor]) -> None:
    """``destinations[i].copy_(sources[i])`` for every i, one fused call per (device, dtype) pair;
    sharded tensors copy their local shards (both sides sharded alike)."""
    for into, out_of in copy_groups(destinations, sources):
        torch._foreach_copy_(into, out_of)


def copy_groups(destinations: list[Tensor], sources: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """The (destinations, sources) lists of :func:`copy_tensors`, one pair per fused call (made once, they can
    be copied again while the tensors stay the same)."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for d, s in zip(destinations, sources):
        d, s = local_tensor(d), local_tensor(s)
        # on a GPU the fused kernel needs one device and dtype per list; a mixed list (BatchNorm's
        # integer counters among float buffers) falls back to one kernel per tensor
        into, out_of = groups.setdefault((d.device, d.dtype, s.device, s.dtype), ([], []))
        into.append(d)
        out_of.append(s)
    return list(groups.values())


def same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether two lists hold the very same tensor objects, in order (a kept copy plan still applies)."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


def copy_by_plan(plan: list[tuple[list[Tensor], list[Tensor]]]) -> None:
    """The fused copies of a plan :func:`copy_groups` made."""
    for into, out_of in plan:
        torch._foreach_copy_(into, out_of)


def copy_into_kept(kept: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
    """Copy ``tensors`` into ``kept`` (buffers from an earlier call, reallocated when they no longer
    fit) with :func:`copy_tensors`, and return the buffers: a snapshot that allocates only when shapes change."""
    fits = len(kept) == len(tensors) and all(
        k.shape == t.shape and k.dtype == t.dtype and k.device == t.device and is_sharded(k) == is_sharded(t)
        for k, t in zip(kept, tensors)
    )
    if not fits:
        kept = [torch.empty_like(t) for t in tensors]
    copy_tensors(kept, tensors)
    return kept


class KeptCopies:
    """Copies of a list of tensors in buffers kept across calls: :meth:`save` copies the tensors in, :meth:`restore`
    copies them back, one fused copy per (device, dtype) group either way. While the tensors saved are the very
    same objects as last time (a step saves the same ones every time), the buffers and their copies' grouping
    are reused; otherwise they are made again, allocating only where shapes change. As for a torch optimizer,
    the tensors are moved (``.to``) before their first save, never after."""

    def __init__(self):
        self.sources: list[Tensor] = []  # what was last saved (held, so no other tensor takes their ids)
        self.copies: list[Tensor] = []
        self._save: list[tuple[list[Tensor], list[Tensor]]] = []
        self._restore: list[tuple[list[Tensor], list[Tensor]]] | None = None  # made at the first restore

    def save(self, tensors: list[Tensor]) -> None:
        if same_tensors(tensors, self.sources):
            copy_by_plan(self._save)
            return
        self.copies = copy_into_kept(self.copies, tensors)
        self.sources, self._save, self._restore = tensors, copy_groups(self.copies, tensors), None

    def restore(self) -> None:
        """Copy the saved values back into the tensors last saved."""
        if self._restore is None:
            self._restore = copy_groups(self.sources, self.copies)
        copy_by_plan(self._restore)


def select_where(destinations: list[Tensor], sources: list[Tensor], flag: Tensor) -> None:
    """``destinations[i]`` becomes ``sources[i]`` where the 0-dim ``flag`` is nonzero and stays bit for bit
    as it is where it is zero, decided on the device: no host read. Per group of :func:`copy_groups`: one
    select over the concatenated tensors and one fused copy back; sharded tensors select their local shards."""
    conditions: dict[torch.device, Tensor] = {}
    for into, out_of in copy_groups(destinations, sources):
        device = into[0].device
        if device not in conditions:
            conditions[device] = flag.to(device) != 0
        chosen = torch.where(
            conditions[device], torch.cat([t.reshape(-1) for t in out_of]), torch.cat([t.reshape(-1) for t in into])
        )
        torch._foreach_copy_(into, [c.view(t.shape) for c, t in zip(chosen.split([t.numel() for t in into]), into)])


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """This process's shard of the whole tensor ``value`` (the same on every process), sharded as ``like`` is
    (no communication)."""
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def data_parallel() -> bool:
    """Whether this process is one of several in a torch.distributed group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class GradientCheck:
    """Unscales and checks the gradients of one list of parameters, kept by a loop that checks them every pass:
    their grouping by (device, dtype), the grouping of their gradients (a gradient has its parameter's device
    and dtype), is worked out once. As for a torch optimizer, the parameters are moved (``.to``) before it is
    made, never after."""

    def __init__(self, params: list[Tensor]):
        self.params = list(params)
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            groups[local_tensor(p).device, p.dtype].append(p)
        #: (device, dtype, whether any is sharded, the parameters, a 1.0 on the device) per group
        self.groups = [(device, dtype, any(map(is_sharded, ps)), ps, _one(device)) for (device, dtype), ps in groups.items()]

    def covers(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are the very parameters this check was made for, in order."""
        return same_tensors(params, self.params)

    def __call__(self, inv_scale: float = 1.0, found: Tensor | None = None, also_check: Tensor | None = None) -> Tensor:
        """Multiply the gradients by ``inv_scale`` in place (1.0: leave them) and return a 0-dim float flag,
        nonzero if any gradient (or ``also_check``, left unscaled) holds an inf or a NaN: ``found`` when given
        (the flag is set in it, never cleared, so one tensor gathers a whole step), else a new one on the first
        gradient's device. One fused kernel per (device, dtype); no host synchronisation."""
        grads = []  # (device, dtype, gradients, 1.0) of each group that has any
        for device, dtype, sharded, ps, one in self.groups:
            same = [g for p in ps if (g := p.grad) is not None]
            if same:
                grads.append((device, dtype, [local_tensor(g) for g in same] if sharded else same, one))
        if found is None:
            device = grads[0][0] if grads else (also_check.device if also_check is not None else torch.device("cpu"))
            found = torch.zeros((), device=device)
        found_device = found.device
        if also_check is not None:
            check = also_check.detach() if also_check.requires_grad else also_check
            where = (check.device, check.dtype)
            for device, dtype, same, _ in grads if inv_scale == 1.0 else ():
                if (device, dtype) == where:  # checked with its gradients: x 1 leaves it
                    same.append(check)
                    break
            else:  # left unscaled
                torch._amp_foreach_non_finite_check_and_unscale_([check], found, _one(found_device))
        for device, _, same, one in grads:
            flag = found if device == found_device else torch.zeros((), device=device)
            scale = one if inv_scale == 1.0 else torch.full((), inv_scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(same, flag, scale)
            if flag is not found:
                found += flag.to(found_device)
        return found


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A 1.0 on ``device``, made once: the unscale factor of an unscaled pass costs no kernel."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones((), device=device)
    return one
