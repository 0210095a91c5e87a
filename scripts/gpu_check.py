"""The GPU check: what the CPU test suite cannot show, in a few minutes on one CUDA GPU.

    bash scripts/gpu_check.sh            # writes results/gpu.md

1. Every optimizer for a few steps in bf16 and in fp16 on a CIFAR ResNet-18 (synthetic
   32x32 batches, so no dataset is needed): the loss stays finite; in fp16 an overflow is
   injected into one step, which must be skipped with the weights untouched and the loss
   scale halved, and training goes on. Peak memory per optimizer.
2. ``perf --harness`` on CUDA for ResNet-18 and WRN-16-8 in bf16: the harness's SGD and SAM
   steps against a bare loop, with --channels_last and --compile; SAM/SGD step ratio and images/s.

Sections are written to the report as they finish, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import environment  # noqa: E402
from bench.config import RunConfig
from bench.loop.epoch import (
    epoch_sums,  # noqa: E402
    train_on,  # noqa: E402
)
from bench.loop.setup import setup  # noqa: E402
from bench.resolve import resolve  # noqa: E402
from bench.studies.perf_harness import (
    contenders,  # noqa: E402
    measure,  # noqa: E402
    synthetic_dataset,  # noqa: E402
)
from bench.variant_flags import filled_by  # noqa: E402
from optimizers import available_optimizers, optimizer_class  # noqa: E402


class Report:
    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        self.lines += lines
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")
        print(*lines, sep="\n", flush=True)


def _overflowing(loss_fn, on_call: int):
    calls = 0

    def loss(outputs, targets):
        nonlocal calls
        calls += 1
        losses = loss_fn(outputs, targets)
        return losses * float("inf") if calls == on_call else losses

    return loss


def check_variant(name: str, precision: str, arch: str, batch: int, steps: int, output_dir: str) -> dict:
    """A few steps; in fp16 the second step's first pass overflows and must be skipped."""
    data = synthetic_dataset(batch * steps, 32)
    cls = optimizer_class(name)
    settings = (
        {"total_steps": steps} if any(filled_by(cls, s.name) == "total_steps" for s in getattr(cls, "settings", ())) else {}
    )
    config = resolve(
        RunConfig(
            arch=arch,
            optimizer=name,
            batch_size=batch,
            epochs=1,
            lr=0.05,
            mixed_precision=precision,
            output_dir=output_dir,
            save_every_epochs=0,
            hyperparameters=settings,
        )
    )
    run = setup(config, data=(data, data))
    device = run.device
    torch.cuda.reset_peak_memory_stats(device)
    x = ((data.images.float() / 255 - 0.5) / 0.25).to(device)
    y = data.labels.to(device)
    losses, skipped_ok, scale_halved = [], None, None
    for i in range(steps):
        xs, ys = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        sums = epoch_sums(run)
        inject = precision == "fp16" and i == 1
        if inject:
            clean_loss_fn, run.loss_fn = run.loss_fn, _overflowing(run.loss_fn, 1)
            before = [p.detach().clone() for p in run.optimizer.param_groups[0]["params"]]
            scale = run.scaler.scale
        skipped = train_on(run, xs, ys, torch.arange(batch, device=device), sums)
        if inject:
            run.loss_fn = clean_loss_fn
            untouched = all(torch.equal(a, p) for a, p in zip(before, run.optimizer.param_groups[0]["params"]))
            skipped_ok = skipped and untouched
            scale_halved = run.scaler.scale == scale / 2
            continue
        losses.append((sums["loss_sum"] / sums["seen"].clamp(min=1)).item())
    return {
        "optimizer": name,
        "precision": precision,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "last_loss": losses[-1] if losses else float("nan"),
        "overflow_skipped": skipped_ok,
        "scale_halved": scale_halved,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def section_variants(report: Report, arch: str, batch: int, steps: int, deadline: float) -> None:
    report.add(
        "## Every optimizer in bf16 and fp16",
        "",
        f"{arch}, batch {batch} of synthetic 32x32 images, {steps} steps, lr 0.05. fp16: the second step's "
        "first pass is made to overflow (loss x inf); it must be skipped with the weights untouched and the "
        "loss scale halved. Peak memory: torch.cuda.max_memory_allocated over the steps.",
        "",
        "| optimizer | precision | losses finite | last loss | overflow skipped, weights untouched | scale halved | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    )
    with tempfile.TemporaryDirectory() as out:
        for name in available_optimizers():
            for precision in ("bf16", "fp16"):
                if time.time() > deadline:
                    report.add(f"| {name} | {precision} | not run: time budget spent | | | | |")
                    continue
                try:
                    r = check_variant(name, precision, arch, batch, steps, out)
                    report.add(
                        f"| {name} | {precision} | {r['losses_finite']} | {r['last_loss']:.4f} | "
                        f"{'' if r['overflow_skipped'] is None else r['overflow_skipped']} | "
                        f"{'' if r['scale_halved'] is None else r['scale_halved']} | {r['peak_mib']:.0f} |"
                    )
                except Exception as err:  # one variant's failure must not hide the others
                    report.add(f"| {name} | {precision} | FAILED: {type(err).__name__}: {str(err)[:120]} | | | | |")
                    traceback.print_exc()
    report.add("")


def section_speed(report: Report, arch: str, batch: int, deadline: float) -> None:
    report.add(f"## Step time: {arch}, batch {batch}, bf16", "")
    if time.time() > deadline:
        report.add("not run: time budget spent", "")
        return
    modes = ((False, False), (False, True), (True, True))
    with tempfile.TemporaryDirectory() as out:
        found = contenders(arch, batch, 32, "cuda", ["sgd", "sam"], out, "inductor", "bf16", modes)
        rows = measure(found, steps=20, rounds=5, warmup=5, device="cuda")
    sgd = {r["contender"].replace("sgd", "X"): r["step_ms"] for r in rows if "(sgd" in r["contender"]}
    report.add(
        "| contender | step (ms) | images/s | x bare loop | SAM/SGD | first step (s) |", "| --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        ratio = r["step_ms"] / sgd[r["contender"].replace("sam", "X")] if "(sam" in r["contender"] else None
        report.add(
            f"| {r['contender']} | {r['step_ms']:.2f} | {batch / (r['step_ms'] / 1e3):.0f} | "
            f"{r['ratio_to_first']:.3f} | {'' if ratio is None else f'{ratio:.2f}'} | {r['first_step_s']:.1f} |"
        )
    report.add("")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "gpu.md"))
    p.add_argument("--budget_s", type=float, default=420.0, help="sections not started by then are marked not run")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.budget_s
    report = Report(Path(args.out))
    env = environment.describe(torch.device("cuda"))
    report.add(
        "# GPU check",
        "",
        "Generated by `bash scripts/gpu_check.sh`.",
        "",
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"processor {env.get('processor')}.",
        "",
    )
    section_variants(report, "resnet18", 128, 4, start + 0.45 * args.budget_s)
    for arch in ("resnet18", "wrn16_8"):
        section_speed(report, arch, 128, deadline)
    report.add(f"Finished in {time.time() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
