"""``python launch.py perf --harness``: what the training loop costs on top of a bare PyTorch loop,
and what ``--compile`` and ``--channels_last`` buy; ``python launch.py perf --recipe NAME``: what the
loop's step costs for every optimizer of a recipe, the cost its table's ``time vs sgd`` measures.

The harness contenders are real runs (:func:`bench.loop.setup.setup` on a synthetic dataset of the
requested shape) stepped with :func:`bench.loop.epoch.train_on`, the function the loop calls every
step: the closure, the skip decision, the training metrics, the schedule. The bare loop is
``zero_grad``, forward, ``cross_entropy``, ``backward``, ``SGD.step``, ``scheduler.step`` on a
copy of the same model and the same batch; where SAM is timed, so is SAM written out in such a loop. Contenders are timed in rounds in a shuffled order
(drift in machine load hits them alike); reported are the median step time, and the median
over rounds of the ratio to the bare loop's time in the same round. The first step of a
compiled contender (the compilation) is reported apart and left out of the timing.

With ``--recipe``, the contenders are the recipe's own runs (one per optimizer of its grid, its first
seed), set up as the loop sets them up (its data, subset, label noise, model, regulariser) and
stepped with :func:`bench.loop.epoch.one_step` on the recipe's real, augmented batches: the very step a
run of that recipe times, a variant's data-dependent decisions and its loss regulariser included.
Each run is first trained to where the steps it is stepped on (the first, the warm-up and the timed
ones) lie in the middle of the recipe's schedule; where they outnumber it, they start at its first
step and run on past its end (size ``--rounds`` and ``--steps`` to the schedule). The ratio is to
the recipe's SGD step in the same round. Where a table's runs are too short to time (a few seconds each: their ratios vary between runs by more
than 15%), this is the quiet, interleaved measurement of the same work.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time

import torch
from torch import nn

from bench import environment
from bench.config import ConfigError, RunConfig
from bench.data.augment import normalize
from bench.data.datasets import ImageDataset
from bench.data.load import load_dataset_splits
from bench.data.names import is_loader_dataset
from bench.environment import synchronize
from bench.loop.epoch import epoch_sums, one_step, train_on
from bench.loop.setup import setup
from bench.resolve import resolve
from bench.studies.bare_loops import bare_sam, bare_sgd
from bench.studies.contender import Contender
from bench.studies.dispatch import step_counts
from bench.studies.recipes import load_recipe
from bench.variant_flags import filled_by
from optimizers import optimizer_class
from optimizers.registry import REFERENCE


def synthetic_dataset(n: int, image_size: int, num_classes: int = 10, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageDataset(images, labels, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "synthetic")


def synthetic_batch(data: ImageDataset, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic dataset's images normalised as the loop normalises them, and its labels, on ``device``."""
    return normalize(data.images, data.mean, data.std).to(device), data.labels.to(device)


def harness_config(optimizer: str, arch: str, batch_size: int, device: str, output_dir: str, **fields) -> RunConfig:
    """A resolved config for stepping ``optimizer`` on synthetic batches: one epoch, no checkpoint, this process's
    threads, a variant's ``total_steps`` (where it declares one) set to ``fields.pop("total_steps", 1)``;
    ``fields`` set any other RunConfig field."""
    total_steps = fields.pop("total_steps", 1)
    cls = optimizer_class(optimizer)
    scheduled = any(filled_by(cls, s.name) == "total_steps" for s in getattr(cls, "settings", ()))
    return resolve(
        RunConfig(
            **{
                "arch": arch,
                "optimizer": optimizer,
                "batch_size": batch_size,
                "epochs": 1,
                "cpu": torch.device(device).type == "cpu",
                "output_dir": output_dir,
                "save_every_epochs": 0,
                "threads": torch.get_num_threads(),
                "hyperparameters": {"total_steps": total_steps} if scheduled else {},
                **fields,
            }
        )
    )


def recipe_contenders(
    recipe_name: str,
    sets: list[str],
    output_dir: str,
    data_dir: str | None = None,
    optimizers: list[str] | None = None,
    steps_taken: int = 0,
) -> tuple[list[Contender], dict[str, tuple[int, int]]]:
    """One contender per optimizer of the recipe's grid (its first seed; ``optimizers`` narrows them),
    SGD first: the loop's own step on the recipe's batches, each run trained first to where the
    ``steps_taken`` steps still to come are centred in its schedule (from its first step where they
    outnumber it). Returns them, and for each optimizer the steps it was trained first and its
    schedule's length in steps (runs of one recipe may train for different numbers of epochs)."""
    recipe = load_recipe(recipe_name)
    extra = [f"data_dir={data_dir}"] if data_dir else []
    configs: dict[str, RunConfig] = {}
    for config in recipe.runs([*sets, *extra], output_dir=output_dir):
        configs.setdefault(config.optimizer, config)
    wanted = optimizers or list(configs)
    missing = [name for name in ["sgd", *wanted] if name not in configs]
    if missing:
        raise ConfigError(
            f"perf --recipe {recipe.name}: its grid has no {', '.join(missing)} "
            f"(it has {', '.join(configs)}); the ratios are to its sgd runs"
        )
    found, data, placements = [], None, {}
    for name in dict.fromkeys(["sgd", *wanted]):
        config = resolve(dataclasses.replace(configs[name], threads=torch.get_num_threads(), sharpness=False))
        if data is None and not is_loader_dataset(config.dataset):  # decoded once, shared by every contender
            data = load_dataset_splits(config.dataset, config.data_dir)
        run = setup(config, data=data)
        step = LoopStep(run)
        total = run.steps_per_epoch * config.epochs
        start = max(0, (total - steps_taken) // 2)
        for _ in range(start):
            step()
        step.restart_count()
        found.append(Contender(name, step, passes=step.passes))
        placements[name] = (start, total)
    return found, placements


class LoopStep:
    """The loop's step of one run, on through the epochs (a trajectory loss or a schedule that starts
    at some epoch acts as in a run), counting forward-backward passes since ``restart_count``."""

    def __init__(self, run):
        self.run, self.sums, self.taken, self.counted_from = run, epoch_sums(run), 0, 0

    def __call__(self) -> None:
        i = self.taken % self.run.steps_per_epoch
        if self.taken and i == 0:
            self.run.state.epoch += 1
        one_step(self.run, i, self.sums)
        self.taken += 1

    def restart_count(self) -> None:
        self.sums.passes, self.counted_from = 0, self.taken

    def passes(self) -> float:
        return self.sums.passes / max(1, self.taken - self.counted_from)


def harness_contender(config: RunConfig, data: ImageDataset, x, y, label: str) -> Contender:
    run = setup(config, data=(data, data))
    x, y = x.to(run.device), y.to(run.device)
    ids = torch.arange(len(y), device=run.device)
    sums = epoch_sums(run)
    before = [0]

    def step():
        before[0] = sums.passes
        train_on(run, x, y, ids, sums)

    def forward_backward():
        with run.accelerator.autocast():
            loss = nn.functional.cross_entropy(run.model(x), y)
        loss.backward()
        run.model.zero_grad(set_to_none=True)

    return Contender(label, step, forward_backward=forward_backward, last_passes=lambda: sums.passes - before[0])


#: (--compile, --channels_last) combinations timed for each optimizer.
MODES = ((False, False), (False, True), (True, False), (True, True))


def contenders(
    arch: str,
    batch_size: int,
    image_size: int,
    device: str,
    optimizers: list[str],
    output_dir: str,
    compile_backend: str = "inductor",
    mixed_precision: str = "no",
    modes=MODES,
) -> list[Contender]:
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"perf --harness times mixed_precision no or bf16, got {mixed_precision!r}")
    dev = torch.device(device)
    data = synthetic_dataset(batch_size, image_size)
    fields = {"lr": 0.01, "compile_backend": compile_backend, "mixed_precision": mixed_precision}
    x, y = synthetic_batch(data, dev)
    found = [bare_sgd(harness_config("sgd", arch, batch_size, device, output_dir, **fields), x, y, dev)]
    if REFERENCE in optimizers:  # SAM's own cost: what its harness step adds is measured against it
        rho = {s.name: s.default for s in optimizer_class(REFERENCE).settings}["rho"]  # the harness run's radius
        found.append(bare_sam(harness_config(REFERENCE, arch, batch_size, device, output_dir, **fields), x, y, dev, rho))
    for name in optimizers:
        for compiled, channels_last in modes:
            flags = " ".join(f for f, on in (("--compile", compiled), ("--channels_last", channels_last)) if on)
            config = harness_config(
                name, arch, batch_size, device, output_dir, **fields, compile=compiled, channels_last=channels_last
            )
            found.append(harness_contender(config, data, x, y, f"harness ({name}{', ' + flags if flags else ''})"))
    return found


def measure(contenders: list[Contender], steps: int, rounds: int, warmup: int, device: str) -> list[dict]:
    """Median step time and median per-round ratio to the first contender."""
    dev = torch.device(device)
    for c in contenders:
        synchronize(dev)
        start = time.perf_counter()
        c.step()
        synchronize(dev)
        c.first_step_s = time.perf_counter() - start
        for _ in range(warmup):
            c.step()
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    ratios: dict[str, list[float]] = {c.name: [] for c in contenders}
    order = random.Random(0)
    reference = contenders[0].name
    for _ in range(rounds):
        this_round = {}
        for c in order.sample(contenders, len(contenders)):
            synchronize(dev)
            start = time.perf_counter()
            for _ in range(steps):
                c.step()
            synchronize(dev)
            this_round[c.name] = (time.perf_counter() - start) / steps
        for name, seconds in this_round.items():
            times[name].append(seconds)
            ratios[name].append(seconds / this_round[reference])
    counts = {c.name: step_counts(c.step, c.forward_backward, c.last_passes) for c in contenders if c.forward_backward}
    return [
        {
            "contender": c.name,
            "step_ms": statistics.median(times[c.name]) * 1e3,
            "ratio_to_first": statistics.median(ratios[c.name]),
            "first_step_s": c.first_step_s,
            "passes_per_step": c.passes() if c.passes is not None else None,
            "counts": counts.get(c.name),
        }
        for c in contenders
    ]


def _settings(args, load_start: float | None, **extra) -> dict:
    """What a harness table's header states: the arguments, the machine, and its load before and now."""
    return dict(
        vars(args),
        machine=environment.processor(),
        threads=torch.get_num_threads(),
        cores=environment.cpu_count(),
        load=(load_start or 0.0, environment.load_average() or 0.0),
        **extra,
    )


def _load_line(settings: dict) -> str:
    load_start, load_end = settings["load"]
    return f"1-minute load average {load_start:.2f} before, {load_end:.2f} after, on {settings['cores']} cores."


def to_markdown(rows: list[dict], settings: dict, command: str) -> str:
    lines = [
        "# Harness overhead, --compile and --channels_last",
        "",
        f"Generated by `{command}`.",
        "",
        f"Model {settings['arch']}, batch {settings['batch_size']} of {settings['image_size']}x{settings['image_size']} "
        f"images, {'bf16 autocast' if settings.get('mixed_precision', 'no') == 'bf16' else 'fp32'}, {settings['device']} ({settings['machine']}, {settings['threads']} threads), torch "
        f"{torch.__version__}, compile backend {settings['compile_backend']}. {settings['rounds']} rounds of "
        f"{settings['steps']} steps per contender in shuffled order after {settings['warmup']} warm-up steps: median step "
        "time, and median over rounds of the ratio to the bare loop in the same round. First step: the first call's "
        "time (the compilation, for compiled contenders), not in the medians. " + _load_line(settings),
        "",
        "The bare SAM loop is SAM written out as its reference code takes its step (the two passes, e = rho g / ||g||, w "
        "restored by subtracting e, SGD's step): the cost any SAM step has, against which the harness's SAM step is its "
        "own overhead.",
        "",
        "Operators: ATen operators one step dispatches beyond its forward-backward passes (on a GPU, at least one "
        "kernel launch each; a compiled graph's own kernels are not counted). Host reads: device values the host "
        "reads in one step (on a GPU, a synchronisation each). Counted on one step after the timing "
        "(bench/studies/dispatch.py).",
        "",
        "| contender | step (ms) | images/s | x bare loop | first step (s) | operators / step | host reads / step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        images_per_s = settings["batch_size"] / (r["step_ms"] / 1e3)
        counts = r.get("counts")
        counted_cells = f"{counts.operators_outside_passes} | {counts.host_reads}" if counts else " | "
        lines.append(
            f"| {r['contender']} | {r['step_ms']:.1f} | {images_per_s:.0f} | {r['ratio_to_first']:.3f} | "
            f"{r['first_step_s']:.2f} | {counted_cells} |"
        )
    return "\n".join(lines) + "\n"


MODE_NAMES = {
    "eager": (False, False),
    "channels_last": (False, True),
    "compile": (True, False),
    "compile+channels_last": (True, True),
}


def parse_modes(text: str) -> tuple[tuple[bool, bool], ...]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODE_NAMES]
    if unknown or not names:
        raise ConfigError(f"--modes takes a comma-separated list of {', '.join(MODE_NAMES)}; got {text!r}")
    return tuple(MODE_NAMES[m] for m in names)


def steps_placement(settings: dict) -> str:
    """How each run is brought to its measured steps, and where the steps it is stepped on (the first, the
    warm-up and the timed ones) lie in the recipe's schedule: said once where every run has the same
    schedule, else once for each group of optimizers that shares one."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, placement in settings["placements"].items():
        groups.setdefault(tuple(placement), []).append(name)
    taken = settings["taken"]
    if len(groups) == 1:
        return _placement(*next(iter(groups)), taken)
    each = "; ".join(f"{', '.join(names)}: {_placement(start, total, taken)}" for (start, total), names in groups.items())
    return f"brought to its measured steps as its schedule allows ({each})"


def _placement(start: int, total: int, taken: int) -> str:
    steps = f"the {taken} steps it is then stepped on (the first, the warm-up and the timed ones)"
    if taken < total:
        return f"trained for {start} steps, so that {steps} lie in the middle of its {total}-step schedule"
    if taken == total:
        return f"not trained first: {steps} are its whole {total}-step schedule"
    return (
        f"not trained first: {steps} outnumber its {total}-step schedule and run on past its end, into epochs "
        "no run of it has (the learning-rate formula evaluated past its end)"
    )


def recipe_to_markdown(rows: list[dict], settings: dict, command: str) -> str:
    lines = [
        f"# The loop's step cost for every optimizer of {settings['recipe']}, relative to SGD",
        "",
        f"Generated by `{command}`.",
        "",
        f"Each optimizer's run of the recipe (its first seed), set up as the loop sets it up, "
        f"{steps_placement(settings)}; stepped on with "
        f"the loop's own step on the recipe's real batches, on {settings['device']} ({settings['machine']}, "
        f"{settings['threads']} threads), torch {torch.__version__}. {settings['rounds']} rounds of {settings['steps']} "
        f"steps per optimizer in shuffled order after {settings['warmup']} warm-up steps: median step time, and median "
        "over rounds of the ratio to SGD's step in the same round (what the recipe's table calls `time vs sgd`). "
        + _load_line(settings),
        "",
        "Passes: forward-backward passes per step from then on.",
        "",
        "| optimizer | step (ms) | x SGD | fwd-bwd passes / step |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['step_ms']:.1f} | {r['ratio_to_first']:.2f} | {r['passes_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def run_recipe(args, command: str) -> str:
    load_start = environment.load_average()
    with tempfile.TemporaryDirectory() as output_dir:
        steps_taken = 1 + args.warmup + args.rounds * args.steps
        found, placements = recipe_contenders(args.recipe, args.set, output_dir, args.data_dir, args.optimizers, steps_taken)
        device = found[0].step.run.device
        rows = measure(found, args.steps, args.rounds, args.warmup, str(device))
    settings = _settings(args, load_start, device=str(device), placements=placements, taken=steps_taken)
    return recipe_to_markdown(rows, settings, command)


def run(args, command: str) -> str:
    load_start = environment.load_average()
    with tempfile.TemporaryDirectory() as output_dir:
        found = contenders(
            args.arch,
            args.batch_size,
            args.image_size,
            args.device,
            args.optimizers or ["sgd", REFERENCE],
            output_dir,
            args.compile_backend,
            getattr(args, "mixed_precision", "no"),
            parse_modes(args.modes) if isinstance(getattr(args, "modes", None), str) else MODES,
        )
        rows = measure(found, args.steps, args.rounds, args.warmup, args.device)
    return to_markdown(rows, _settings(args, load_start), command)
