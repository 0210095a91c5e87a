"""``python launch.py perf --harness``: what the training loop costs on top of a bare PyTorch loop,
and what ``--compile`` and ``--channels_last`` buy.

The harness contenders are real runs (:func:`bench.train.setup` on a synthetic dataset of the
requested shape) stepped with :func:`bench.train.train_on`, the function the loop calls every
step: the closure, the skip decision, the training metrics, the schedule. The bare loop is
``zero_grad``, forward, ``cross_entropy``, ``backward``, ``SGD.step``, ``scheduler.step`` on a
copy of the same model and the same batch. Contenders are timed in rounds in a shuffled order
(drift in machine load hits them alike); reported are the median step time, and the median
over rounds of the ratio to the bare loop's time in the same round. The first step of a
compiled contender (the compilation) is reported apart and left out of the timing.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import environment
from .config import ConfigError, RunConfig
from .data import ImageDataset
from .perf import _sync
from .train import epoch_sums, setup, train_on


@dataclass
class Contender:
    name: str
    step: Callable[[], None]
    first_step_s: float = 0.0


def synthetic_dataset(n: int, image_size: int, num_classes: int = 10, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageDataset(images, labels, num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "synthetic")


def _bare(arch_config: RunConfig, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Contender:
    from architectures import create_model

    torch.manual_seed(arch_config.seed)
    model = create_model(arch_config.arch, num_classes=10, in_channels=3).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=arch_config.lr, momentum=arch_config.momentum,
                          weight_decay=arch_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    bf16 = arch_config.mixed_precision == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        scheduler.step()

    return Contender("bare PyTorch loop (SGD)", step)


def _harness(config: RunConfig, data: ImageDataset, x, y, label: str) -> Contender:
    run = setup(config, data=(data, data))
    ids = torch.arange(len(y), device=run.device)
    sums = epoch_sums(run)
    return Contender(label, lambda: train_on(run, x.to(run.device), y.to(run.device), ids, sums))


#: (--compile, --channels_last) combinations timed for each optimizer.
MODES = ((False, False), (False, True), (True, False), (True, True))


def contenders(arch: str, batch_size: int, image_size: int, device: str, optimizers: list[str], output_dir: str,
               compile_backend: str = "inductor", mixed_precision: str = "no", modes=MODES) -> list[Contender]:
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"perf --harness times mixed_precision no or bf16, got {mixed_precision!r}")
    dev = torch.device(device)
    data = synthetic_dataset(batch_size, image_size)
    base = RunConfig(arch=arch, batch_size=batch_size, epochs=1, lr=0.01, cpu=dev.type == "cpu", output_dir=output_dir,
                     threads=torch.get_num_threads(), compile_backend=compile_backend, save_every_epochs=0,
                     mixed_precision=mixed_precision)
    x = ((data.images.float() / 255 - 0.5) / 0.25).to(dev)
    y = data.labels.to(dev)
    found = [_bare(base, x, y, dev)]
    for name in optimizers:
        for compiled, channels_last in modes:
            flags = " ".join(f for f, on in (("--compile", compiled), ("--channels_last", channels_last)) if on)
            config = dataclasses.replace(base, optimizer=name, compile=compiled, channels_last=channels_last).validate()
            found.append(_harness(config, data, x, y, f"harness ({name}{', ' + flags if flags else ''})"))
    return found


def measure(contenders: list[Contender], steps: int, rounds: int, warmup: int, device: str) -> list[dict]:
    dev = torch.device(device)
    for c in contenders:
        _sync(dev)
        start = time.perf_counter()
        c.step()
        _sync(dev)
        c.first_step_s = time.perf_counter() - start
        for _ in range(warmup):
            c.step()
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    ratios: dict[str, list[float]] = {c.name: [] for c in contenders}
    order = random.Random(0)
    bare = contenders[0].name
    for _ in range(rounds):
        this_round = {}
        for c in order.sample(contenders, len(contenders)):
            _sync(dev)
            start = time.perf_counter()
            for _ in range(steps):
                c.step()
            _sync(dev)
            this_round[c.name] = (time.perf_counter() - start) / steps
        for name, seconds in this_round.items():
            times[name].append(seconds)
            ratios[name].append(seconds / this_round[bare])
    return [{"contender": c.name, "step_ms": statistics.median(times[c.name]) * 1e3,
             "ratio_to_bare": statistics.median(ratios[c.name]), "first_step_s": c.first_step_s} for c in contenders]


def to_markdown(rows: list[dict], settings: dict, command: str) -> str:
    load_start, load_end = settings["load"]
    lines = [
        "# Harness overhead, --compile and --channels_last", "",
        f"Generated by `{command}`.", "",
        f"Model {settings['arch']}, batch {settings['batch_size']} of {settings['image_size']}x{settings['image_size']} "
        f"images, {'bf16 autocast' if settings.get('mixed_precision', 'no') == 'bf16' else 'fp32'}, {settings['device']} ({settings['machine']}, {settings['threads']} threads), torch "
        f"{torch.__version__}, compile backend {settings['compile_backend']}. {settings['rounds']} rounds of "
        f"{settings['steps']} steps per contender in shuffled order after {settings['warmup']} warm-up steps: median step "
        "time, and median over rounds of the ratio to the bare loop in the same round. First step: the first call's "
        "time (the compilation, for compiled contenders), not in the medians. "
        f"1-minute load average {load_start:.2f} before, {load_end:.2f} after, on {settings['cores']} cores.", "",
        "| contender | step (ms) | images/s | x bare loop | first step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        images_per_s = settings["batch_size"] / (r["step_ms"] / 1e3)
        lines.append(f"| {r['contender']} | {r['step_ms']:.1f} | {images_per_s:.0f} | {r['ratio_to_bare']:.3f} | "
                     f"{r['first_step_s']:.2f} |")
    return "\n".join(lines) + "\n"


MODE_NAMES = {"eager": (False, False), "channels_last": (False, True), "compile": (True, False),
              "compile+channels_last": (True, True)}


def parse_modes(text: str) -> tuple[tuple[bool, bool], ...]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODE_NAMES]
    if unknown or not names:
        raise ConfigError(f"--modes takes a comma-separated list of {', '.join(MODE_NAMES)}; got {text!r}")
    return tuple(MODE_NAMES[m] for m in names)


def run(args, command: str) -> str:
    load_start = environment.load_average()
    with tempfile.TemporaryDirectory() as output_dir:
        found = contenders(args.arch, args.batch_size, args.image_size, args.device, args.optimizers or ["sgd", "sam"],
                           output_dir, args.compile_backend, getattr(args, "mixed_precision", "no"),
                           parse_modes(args.modes) if isinstance(getattr(args, "modes", None), str) else MODES)
        rows = measure(found, args.steps, args.rounds, args.warmup, args.device)
    settings = dict(vars(args), machine=environment.processor(), threads=torch.get_num_threads(),
                    cores=environment.cpu_count(), load=(load_start or 0.0, environment.load_average() or 0.0))
    return to_markdown(rows, settings, command)
