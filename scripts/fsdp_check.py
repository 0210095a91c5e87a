"""Sharded against unsharded: every sharpness-aware variant on FSDP2-sharded parameters must take
the steps one unsharded process takes on the whole batch.

Run on two processes (CUDA and NCCL when there are GPUs, else CPU and gloo)::

    torchrun --nproc_per_node 2 scripts/fsdp_check.py [--device cuda|cpu] [--variants sam gsam ...]

Each process holds half of every parameter (``fully_shard`` on every layer and the root) and
trains on half of each batch; FSDP averages the gradients, so the gradient of every pass is
the whole batch's, and SAM's ascent is the global one. Checks, in float64 (tolerance 1e-10):

- ``reductions``: global_norm, global_dot and tensor_norms of sharded gradients equal the unsharded ones;
- ``mlp/<variant>``: four steps on an MLP with a LayerNorm (uneven shards: 5 and 3 rows over 2 processes),
  interrupted after two by a checkpoint round trip (the gathered optimizer and model state loaded
  into a fresh sharded model and optimizer), against four uninterrupted unsharded steps;
- ``cnn/<variant>``: four steps on a small CNN with BatchNorm, the statistics taken over both
  processes' shards (the harness's --sync_bn), parameters and running statistics compared;
- ``clip/<variant>``: the MLP's four steps with ``max_grad_norm`` (the descent gradient clipped by its
  global norm over the uneven shards), for every variant that takes a gradient step.

bSAM runs with msharpness 1 and ESAM with gamma 1: with more sub-batches (bSAM) or a selected
fraction (ESAM) each process splits or selects within its own half, as under DDP, which one
process on the whole batch does not reproduce. Variants that declare ``sharding_unsupported``
are listed as SKIP. Process 0 prints one PASS, FAIL or SKIP line per check; the exit status is 1
if any check failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from bench.config import RunConfig  # noqa: E402
from bench.loop.sharding import (
    FullOptimizerState,  # noqa: E402
    full_model_state,  # noqa: E402
    load_full_model_state,  # noqa: E402
)
from bench.loop.sync_bn import convert_sync_batchnorm  # noqa: E402
from bench.resolve import optimizer_settings  # noqa: E402
from optimizers import BatchClosure, SharpnessAwareOptimizer, available_optimizers, create_optimizer, optimizer_class  # noqa: E402
from optimizers.regularizer import build_regularizer  # noqa: E402
from optimizers.tensors import global_dot, global_norm, tensor_norms  # noqa: E402

TOLERANCE = 1e-10
STEPS = 4
#: Settings under which one process on the whole batch is the oracle (see the module docstring).
ORACLE_SETTINGS = {"bsam": {"msharpness": 1}, "esam": {"gamma": 1.0}}
CNN_VARIANTS = ("sam", "gsam", "asam", "looksam", "bsam")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()


def batches(kind: str, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (16, 6) if kind == "mlp" else (8, 1, 8, 8)
    return [
        (
            torch.randn(*shape, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 3, (shape[0],), generator=g).to(device),
        )
        for _ in range(STEPS)
    ]


def shard(model: nn.Module, mesh, sync_bn: bool) -> nn.Module:
    if sync_bn:
        model = convert_sync_batchnorm(model, torch.device(mesh.device_type))
    for module in model:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


#: the global norm the ``clip/`` checks clip the descent gradient to (below the tiny MLP's gradient norms)
CLIP = 0.2


def settings(name: str, clip: bool = False) -> dict:
    config = RunConfig(optimizer=name, batch_size=16, max_grad_norm=CLIP if clip else None)
    return {**optimizer_settings(config, num_train=64), **ORACLE_SETTINGS.get(name, {})}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def make(name: str, model: nn.Module, device, clip: bool = False) -> torch.optim.Optimizer:
    """The optimizer, with the loss term its class declares attached (this check's loss is the task loss alone:
    it compares the sharded update with the unsharded one; the terms are checked in tests/test_regularizers.py)."""
    opt = create_optimizer(name, model, seed=0, **settings(name, clip))
    build_regularizer(opt, model, 64, 10, device)
    return opt


def check_variant(name: str, kind: str, mesh, device, rank: int, world: int) -> str:
    build, clip = (cnn, False) if kind == "cnn" else (mlp, kind == "clip")
    data = batches("cnn" if kind == "cnn" else "mlp", device)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    reference = build().to(device)
    opt = make(name, reference, device, clip)
    for x, y in data:
        opt.step(BatchClosure(reference, loss_fn, x, y))

    def sharded():
        model = shard(build().to(device), mesh, sync_bn=kind == "cnn")
        return model, make(name, model, device, clip)

    model, opt = sharded()
    part = len(data[0][1]) // world
    for step, (x, y) in enumerate(data):
        if kind == "mlp" and step == STEPS // 2:  # checkpoint round trip: gathered state into a fresh model and optimizer
            optimizer_state = FullOptimizerState(opt, is_writer=True).state_dict()
            model_state = [full_model_state(model)]
            dist.broadcast_object_list(model_state, src=0)
            model, opt = sharded()
            load_full_model_state(model, model_state[0])
            FullOptimizerState(opt, is_writer=True).load_state_dict(optimizer_state)
        local = slice(rank * part, (rank + 1) * part)
        opt.step(BatchClosure(model, loss_fn, x[local], y[local]))

    got = {k: whole(v) for k, v in model.state_dict().items()}
    want = reference.state_dict()
    errors = {k: relative_error(got[k].double(), want[k].double()) for k in want if want[k].is_floating_point()}
    worst = max(errors, key=errors.get)
    moved = max(relative_error(p.detach(), q) for p, q in zip(reference.parameters(), build().to(device).parameters()))
    if errors[worst] > TOLERANCE or moved < 1e-3:
        return f"FAIL {kind}/{name}: relative error {errors[worst]:.1e} in {worst} (weights moved {moved:.1e})"
    return f"PASS {kind}/{name}: largest relative error {errors[worst]:.1e} (weights moved {moved:.1e})"


def check_reductions(mesh, device, rank: int, world: int) -> str:
    data = batches("mlp", device)[0]
    loss_fn = nn.functional.cross_entropy
    reference = mlp().to(device)
    loss_fn(reference(data[0]), data[1]).backward()
    model = shard(mlp().to(device), mesh, sync_bn=False)
    part = len(data[1]) // world
    loss_fn(model(data[0][rank * part : (rank + 1) * part]), data[1][rank * part : (rank + 1) * part]).backward()
    g_ref = [p.grad for p in reference.parameters()]
    w_ref = [p.detach() for p in reference.parameters()]
    g = [p.grad for p in model.parameters()]
    w = [p.detach() for p in model.parameters()]
    pairs = {
        "global_norm": (global_norm(g), global_norm(g_ref)),
        "global_dot": (global_dot(g, w), global_dot(g_ref, w_ref)),
        "tensor_norms": (tensor_norms(g), tensor_norms(g_ref)),
    }
    errors = {k: relative_error(a.to(device), b) for k, (a, b) in pairs.items()}
    worst = max(errors, key=errors.get)
    verdict = "PASS" if errors[worst] <= TOLERANCE else "FAIL"
    return f"{verdict} reductions: largest relative error {errors[worst]:.1e} ({worst})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="*", default=None, help="variant names (default: every sharpness-aware one)")
    args = parser.parse_args(argv)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(args.device, (world,))
    names = args.variants or [n for n in available_optimizers() if issubclass(optimizer_class(n), SharpnessAwareOptimizer)]
    checks = [("reductions", None)] + [(n, "mlp") for n in names] + [(n, "cnn") for n in names if n in CNN_VARIANTS]
    clipped = [n for n in names if optimizer_class(n).clips_descent and not optimizer_class(n).sharding_unsupported]
    checks += [(n, "clip") for n in clipped]  # max_grad_norm: the global norm over uneven shards
    failed = False
    for name, kind in checks:
        reason = getattr(optimizer_class(name), "sharding_unsupported", "") if kind else ""
        try:
            if reason:
                line = f"SKIP {kind}/{name}: {reason}"
            elif kind is None:
                line = check_reductions(mesh, device, rank, world)
            else:
                line = check_variant(name, kind, mesh, device, rank, world)
        except Exception as err:  # one check's failure does not hide the others
            line = f"FAIL {kind}/{name}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if rank == 0:
                traceback.print_exc(file=sys.stderr)
        failed |= line.startswith("FAIL")
        if rank == 0:
            print(line, flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
