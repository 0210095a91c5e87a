"""The GPU check: what the CPU test suite cannot show, in a few minutes on one CUDA GPU.

    bash scripts/gpu_check.sh [CIFAR10_DIR]   # writes results/gpu.md (and, given the data, the GPU-minutes study)
    python scripts/gpu_check.py --dry_run --out /tmp/gpu.md   # every section on the CPU, tiny sizes

1. Every optimizer for a few steps in bf16 and in fp16 on a CIFAR ResNet-18 (synthetic
   32x32 batches, so no dataset is needed): the loss stays finite; in fp16 an overflow is
   injected into one step, which must be skipped with the weights untouched and the loss
   scale halved, and training goes on. Peak memory per optimizer.
2. ``perf --harness`` on CUDA for ResNet-18 and WRN-16-8 in bf16: the harness's SGD and SAM
   steps against a bare loop, with --channels_last and --compile; SAM/SGD step ratio and images/s;
   operators dispatched and host synchronisations per step (bench/studies/dispatch.py).
3. Host synchronisations of the harness's steps under ``torch.cuda.set_sync_debug_mode("warn")``.
4. A profile of one harness SAM step: the operators that take the most host time, kernels per step.
5. Given the CIFAR-10 folder, the GPU-minutes study (``bench/recipes/cifar10_gpu_minutes.toml``), swept in
   a subprocess within the time left: its wall time, SGD's test accuracy, its tables and per-run file in
   ``results/`` and its paired claims in ``results/claims_gpu_minutes.md``.
6. The targets (:data:`TARGETS`), each reported met or not with its number.

Sections are written to the report as they finish, so a run cut short keeps what it measured.
``--dry_run`` runs every section on the CPU with a small model and few steps (fp16 and
--compile are left out there: fp16 needs CUDA, compiling takes minutes on a CPU); its targets
are shown, not judged. The test suite runs it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import environment  # noqa: E402
from bench.loop.epoch import (
    epoch_sums,  # noqa: E402
    train_on,  # noqa: E402
)
from bench.loop.setup import setup  # noqa: E402
from bench.report import records  # noqa: E402
from bench.studies.dispatch import counted  # noqa: E402
from bench.studies.perf_harness import (  # noqa: E402
    contenders,
    harness_config,
    harness_contender,
    measure,
    synthetic_batch,
    synthetic_dataset,
)
from optimizers import available_optimizers  # noqa: E402

#: What the check must show on a GPU, each judged in the targets section.
TARGETS = (
    ("harness SGD step <= 1.05x the bare loop's (first step-time table, eager)", "sgd_vs_bare", "<=", 1.05),
    ("harness SAM step <= 2.1x the bare SGD step (first step-time table, eager)", "sam_vs_bare", "<=", 2.1),
    ("compiled SAM step faster than eager SAM (first step-time table: compiled / eager)", "sam_compiled_vs_eager", "<", 1.0),
    ("host synchronisations per steady-state step (harness SGD and SAM, sync debug mode)", "syncs_per_step", "<=", 0),
    ("the GPU-minutes study (5 seeds, SGD, SGD at equal passes, SAM, 5 variants) in minutes", "study_minutes", "<=", 8),
    ("SGD's mean test accuracy (%) in the GPU-minutes study", "study_sgd_acc", ">=", 93.5),
)

#: The GPU-minutes study on a dry run: two optimizers, two seeds, one epoch (SGD's twin two) of a 32-image subset
#: in batches of 16 (CPU, fp32); epochs as a one-value axis, so that the recipe's equal-passes twin stays
STUDY_DRY_RUN = [
    "optimizer=['sgd','sam']", "seed=[0,1]", "epochs=[1]", "warmup_epochs=0", "train_subset=32", "batch_size=16",
    "mixed_precision=no", "channels_last=false",
]  # fmt: skip


class Report:
    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        self.lines += lines
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.lines) + "\n")
        print(*lines, sep="\n", flush=True)


def _shown(precision: str) -> str:
    return "fp32" if precision == "no" else precision


class _OverflowWhenArmed:
    """The run's loss, its first evaluation after :meth:`arm` overflowing (its losses times inf): the first
    pass of the step that follows; installed before the run's first step, so the closure the loop keeps across
    steps calls it."""

    def __init__(self, loss_fn):
        self.loss_fn, self.armed = loss_fn, False

    def arm(self) -> None:
        self.armed = True

    def __call__(self, outputs, targets):
        losses = self.loss_fn(outputs, targets)
        if self.armed:
            self.armed = False
            return losses * float("inf")
        return losses


def check_variant(name: str, precision: str, arch: str, batch: int, steps: int, output_dir: str, device: str) -> dict:
    """A few steps; in fp16 the second step's first pass overflows and must be skipped."""
    data = synthetic_dataset(batch * steps, 32)
    config = harness_config(name, arch, batch, device, output_dir, lr=0.05, mixed_precision=precision, total_steps=steps)
    run = setup(config, data=(data, data))
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    x, y = synthetic_batch(data, run.device)
    run.loss_fn = overflow = _OverflowWhenArmed(run.loss_fn)
    losses, skipped_ok, scale_halved = [], None, None
    for i in range(steps):
        xs, ys = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        sums = epoch_sums(run)
        inject = precision == "fp16" and i == 1
        if inject:
            overflow.arm()
            before = [p.detach().clone() for p in run.optimizer.param_groups[0]["params"]]
            scale = run.scaler.scale
        skipped = train_on(run, xs, ys, torch.arange(batch, device=run.device), sums)
        if inject:
            untouched = all(torch.equal(a, p) for a, p in zip(before, run.optimizer.param_groups[0]["params"]))
            skipped_ok = skipped and untouched
            scale_halved = run.scaler.scale == scale / 2
            continue
        _, loss_sum, seen = sums.metrics()
        losses.append((loss_sum / seen.clamp(min=1)).item())
    return {
        "optimizer": name,
        "precision": precision,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "last_loss": losses[-1] if losses else float("nan"),
        "overflow_skipped": skipped_ok,
        "scale_halved": scale_halved,
        "peak_mib": torch.cuda.max_memory_allocated(run.device) / 2**20 if cuda else None,
    }


def section_variants(report: Report, plan: dict, deadline: float) -> None:
    arch, batch, steps, precisions = plan["variants_arch"], plan["batch"], plan["variant_steps"], plan["precisions"]
    report.add(
        f"## Every optimizer in {' and '.join(precisions)}",
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
            for precision in precisions:
                if time.time() > deadline:
                    report.add(f"| {name} | {precision} | not run: time budget spent | | | | |")
                    continue
                try:
                    r = check_variant(name, precision, arch, batch, steps, out, plan["device"])
                    report.add(
                        f"| {name} | {precision} | {r['losses_finite']} | {r['last_loss']:.4f} | "
                        f"{'' if r['overflow_skipped'] is None else r['overflow_skipped']} | "
                        f"{'' if r['scale_halved'] is None else r['scale_halved']} | "
                        f"{'' if r['peak_mib'] is None else format(r['peak_mib'], '.0f')} |"
                    )
                except Exception as err:  # one variant's failure must not hide the others
                    report.add(f"| {name} | {precision} | FAILED: {type(err).__name__}: {str(err)[:120]} | | | | |")
                    traceback.print_exc()
    report.add("")


def section_speed(report: Report, plan: dict, arch: str, deadline: float, measured: dict) -> None:
    batch, precision = plan["batch"], plan["precision"]
    report.add(f"## Step time: {arch}, batch {batch}, {_shown(precision)}", "")
    if time.time() > deadline:
        report.add("not run: time budget spent", "")
        return
    with tempfile.TemporaryDirectory() as out:
        found = contenders(arch, batch, 32, plan["device"], ["sgd", "sam"], out, "inductor", precision, plan["modes"])
        rows = measure(found, device=plan["device"], **plan["timing"])
    sgd = {r["contender"].replace("sgd", "X"): r["step_ms"] for r in rows if "(sgd" in r["contender"]}
    report.add(
        "| contender | step (ms) | images/s | x bare loop | SAM/SGD | first step (s) | operators / step | host reads / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    )
    for r in rows:
        ratio = r["step_ms"] / sgd[r["contender"].replace("sam", "X")] if "(sam" in r["contender"] else None
        counts = r["counts"]
        report.add(
            f"| {r['contender']} | {r['step_ms']:.2f} | {batch / (r['step_ms'] / 1e3):.0f} | "
            f"{r['ratio_to_first']:.3f} | {'' if ratio is None else f'{ratio:.2f}'} | {r['first_step_s']:.1f} | "
            f"{'' if counts is None else counts.operators_outside_passes} | {'' if counts is None else counts.host_reads} |"
        )
    if arch == plan["speed_archs"][0]:  # the targets are judged on the first architecture
        by_name = {r["contender"]: r for r in rows}
        measured["sgd_vs_bare"] = by_name["harness (sgd)"]["ratio_to_first"]
        measured["sam_vs_bare"] = by_name["harness (sam)"]["ratio_to_first"]
        if "harness (sam, --compile)" in by_name:
            measured["sam_compiled_vs_eager"] = (
                by_name["harness (sam, --compile)"]["step_ms"] / by_name["harness (sam)"]["step_ms"]
            )
    report.add("")


def _harness_steps(plan: dict, out: str):
    """The harness's eager SGD and SAM steps on the speed section's first architecture (name, step)."""
    arch, batch = plan["speed_archs"][0], plan["batch"]
    data = synthetic_dataset(batch, 32)
    x, y = synthetic_batch(data, plan["device"])
    for name in ("sgd", "sam"):
        config = harness_config(name, arch, batch, plan["device"], out, lr=0.05, mixed_precision=plan["precision"])
        yield name, harness_contender(config, data, x, y, f"harness ({name})").step


def section_syncs(report: Report, plan: dict, deadline: float, measured: dict) -> None:
    """Host synchronisations per steady-state step: the sync debug mode's warnings on CUDA; on a CPU
    (where nothing waits) the host reads a GPU would wait on, counted by the dispatch counter."""
    cuda = plan["device"] == "cuda"
    how = (
        'torch.cuda.set_sync_debug_mode("warn"), warnings per step' if cuda else "host reads counted by bench/studies/dispatch.py"
    )
    report.add(
        "## Host synchronisations per step",
        "",
        f"{plan['speed_archs'][0]}, batch {plan['batch']}, {_shown(plan['precision'])}, 3 steps after 3 warm-up steps; {how}.",
        "",
    )
    if time.time() > deadline:
        report.add("not run: time budget spent", "")
        return
    report.add("| contender | per step |", "| --- | --- |")
    worst = 0.0
    with tempfile.TemporaryDirectory() as out:
        for name, step in _harness_steps(plan, out):
            for _ in range(3):
                step()
            if cuda:
                torch.cuda.synchronize()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        for _ in range(3):
                            step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                per_step = sum("synchroniz" in str(w.message) for w in caught) / 3
            else:
                per_step = sum(counted(step).host_reads for _ in range(3)) / 3
            worst = max(worst, per_step)
            report.add(f"| harness ({name}) | {per_step:g} |")
    measured["syncs_per_step"] = worst
    report.add("")


def section_profile(report: Report, plan: dict, deadline: float) -> None:
    """One harness SAM step under torch.profiler: the operators with the most host time, kernels per step."""
    report.add("## Profile of one harness SAM step", "")
    if time.time() > deadline:
        report.add("not run: time budget spent", "")
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = plan["device"] == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with tempfile.TemporaryDirectory() as out:
        (_, step), *_ = [(n, s) for n, s in _harness_steps(plan, out) if n == "sam"]
        for _ in range(3):
            step()
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))
    report.add(
        f"{plan['speed_archs'][0]}, batch {plan['batch']}, {_shown(plan['precision'])}. Kernels launched in the step: "
        f"{kernels if cuda else 'n/a (CPU)'}. Top operators by host (CPU) self time:",
        "",
        "| operator | calls | host self time (us) |",
        "| --- | --- | --- |",
    )
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    for e in top:
        report.add(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total:.0f} |")
    report.add("")


def section_study(report: Report, plan: dict, data_dir: str | None, results: Path, deadline: float, measured: dict) -> None:
    """The GPU-minutes study swept in a subprocess (one process: the runs one after another), then its claims."""
    recipe = "cifar10_gpu_minutes"
    report.add("## The GPU-minutes study", "")
    if data_dir is None:
        report.add("not run: pass the CIFAR-10 folder (`bash scripts/gpu_check.sh CIFAR10_DIR`)", "")
        return
    left = deadline - time.time()
    if left < 30:
        report.add("not run: time budget spent", "")
        return
    dry = plan["device"] != "cuda"
    sets = [arg for s in STUDY_DRY_RUN for arg in ("--set", s)] + ["--cpu"] if dry else []
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "launch.py"), "sweep", recipe, "--data_dir", data_dir]
        command += ["--output_dir", out, "--results_dir", str(results), *sets]
        start = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=left, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            report.add(
                f"not finished within the {left:.0f} s left; runs finished before that are lost with the check's folder", ""
            )
            return
        minutes = (time.time() - start) / 60
        if done.returncode != 0:
            report.add(f"failed (exit {done.returncode}): `{(done.stderr or done.stdout).strip().splitlines()[-1]}`", "")
            return
    runs_file = results / f"{recipe}_runs.csv"
    runs = records.read(runs_file)
    fewest = min(r["settings"]["epochs"] for r in runs)
    sgd = [r for r in runs if r["optimizer"] == "sgd" and r["settings"]["epochs"] == fewest]  # at the recipe's epochs
    measured["study_minutes"] = minutes
    measured["study_sgd_acc"] = 100 * statistics.mean(r["final_test_acc"] for r in sgd)
    claims = results / "claims_gpu_minutes.md"
    subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "claims", f"{recipe}={runs_file}", "--out", str(claims)],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    report.add(
        f"{len(runs)} runs in {minutes:.1f} min; SGD at {measured['study_sgd_acc']:.2f}% mean test accuracy over "
        f"{len(sgd)} seeds. Tables: `{(results / recipe).name}.md` and `{runs_file.name}`; claims: `{claims.name}`.",
        "",
    )


def section_targets(report: Report, plan: dict, measured: dict) -> None:
    judged = plan["device"] == "cuda"
    report.add(
        "## Targets",
        "",
        "Each target with what this check measured" + ("" if judged else " (a dry run on the CPU: shown, not judged)") + ".",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    )
    for text, key, op, bound in TARGETS:
        value = measured.get(key)
        if value is None:
            shown, met = "not measured", "not known"
        else:
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
            met = ("yes" if ok else "no") if judged else "not judged (dry run)"
        report.add(f"| {text} | {shown} | {met} |")
    report.add("")


#: Sizes of a real check (CUDA) and of a dry run (CPU).
PLANS = {
    "cuda": dict(
        device="cuda", variants_arch="resnet18", batch=128, variant_steps=4, precisions=("bf16", "fp16"), precision="bf16",
        speed_archs=("resnet18", "wrn16_8"), modes=((False, False), (False, True), (True, False), (True, True)),
        timing=dict(steps=20, rounds=5, warmup=5),
    ),
    "cpu": dict(
        device="cpu", variants_arch="smallcnn", batch=8, variant_steps=3, precisions=("bf16",), precision="no",
        speed_archs=("smallcnn",), modes=((False, False), (False, True)), timing=dict(steps=2, rounds=2, warmup=1),
    ),
}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "gpu.md"))
    p.add_argument("--budget_s", type=float, default=420.0, help="sections not started by then are marked not run")
    p.add_argument("--dry_run", action="store_true", help="every section on the CPU, tiny sizes (targets not judged)")
    p.add_argument("--study_data", help="the CIFAR-10 folder: run the GPU-minutes study too (after the other sections)")
    p.add_argument("--study_s", type=float, default=510.0, help="seconds the GPU-minutes study may take")
    p.add_argument("--results_dir", default=str(ROOT / "results"), help="where the study writes its tables and claims")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check (--dry_run runs every section on the CPU)", file=sys.stderr)
        return 2
    plan = PLANS["cpu" if args.dry_run else "cuda"]
    start = time.time()
    deadline = start + args.budget_s
    report = Report(Path(args.out))
    env = environment.describe(torch.device(plan["device"]))
    where = f"GPU {env['gpu']}" if plan["device"] == "cuda" else "a dry run on the CPU (no GPU)"
    report.add(
        "# GPU check",
        "",
        "Generated by `bash scripts/gpu_check.sh`" + (" --dry_run" if args.dry_run else "") + ".",
        "",
        f"{where}, torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if plan["device"] == "cuda" else "")
        + f", processor {env.get('processor')}.",
        "",
    )
    measured: dict = {}
    section_variants(report, plan, start + 0.4 * args.budget_s)
    for arch in plan["speed_archs"]:
        section_speed(report, plan, arch, start + 0.8 * args.budget_s, measured)
    section_syncs(report, plan, deadline, measured)
    section_profile(report, plan, deadline)
    section_study(report, plan, args.study_data, Path(args.results_dir), time.time() + args.study_s, measured)
    section_targets(report, plan, measured)
    report.add(f"Finished in {time.time() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
