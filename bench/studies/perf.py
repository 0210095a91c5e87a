"""``python launch.py perf``: the cost of one training step of every optimizer, relative to SGD.

All optimizers train copies of the same model on the same synthetic batches in one
process, in rounds (each in a shuffled order, so drift in machine load hits them
alike); each round times ``steps`` consecutive steps (a multiple of LookSAM's k) of
every optimizer. Reported: the median step time, and the median over rounds of the
ratio to SGD's time in the same round. pytorch-optimizer's SAM, GSAM and FriendlySAM, when installed,
are timed on the same model as external references.
"""

from __future__ import annotations

import copy
import os
import platform
import random
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from architectures import create_model
from architectures.registry import resolve as resolve_architecture
from bench.config import ConfigError
from bench.environment import synchronize
from bench.io import check_writable, write_text
from bench.report.overwrite import check_not_emptied, count_lines
from bench.usage import Parser
from optimizers import BatchClosure, SharpnessAwareOptimizer, available_optimizers, create_optimizer, optimizer_class
from optimizers.registry import canonical_name
from optimizers.regularizer import build_regularizer

SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
ce = nn.CrossEntropyLoss(reduction="none")


class Contender:
    """One optimizer under test: how to build it and how to take a step with it."""

    def __init__(self, name: str, build: Callable, step: Callable, source: str = "this project", memory: Callable | None = None):
        self.name, self.build, self.step, self.source, self.memory = name, build, step, source, memory


def _ours(name: str, num_train: int) -> Contender:
    """This project's optimizer ``name``; a method that is a loss term (``loss_regularizer``) is timed with its
    term attached and active, its sample ids those of a ``num_train``-image epoch."""
    terms = {}

    def build(model):
        own_rule = not getattr(optimizer_class(name), "uses_base_optimizer", True)
        opt = create_optimizer(name, model, **({} if own_rule else SGD))
        device = next(model.parameters()).device
        terms[id(opt)] = build_regularizer(opt, model, num_train, 10, device)
        return opt

    def step(opt, model, x, y, ids):
        term = terms[id(opt)]
        loss_fn = ce
        if term is not None:  # the epoch after the term's start: it is applied
            epoch = getattr(opt, "kl_start", 0) + 1

            def loss_fn(outputs, targets):
                return ce(outputs, targets) + term.extra_loss(outputs, ids, epoch, x)

        closure = BatchClosure(model, loss_fn, x, y)
        opt.step(closure)
        if term is not None:
            term.after_step(model)
        return closure.passes

    def memory(opt) -> int:
        """Bytes kept between steps beyond the base optimizer: the variant's state and its loss term's."""
        term = terms[id(opt)]
        own = opt.extra_state_bytes() if isinstance(opt, SharpnessAwareOptimizer) else 0
        return own + (_tensor_bytes(term.state_dict()) if term is not None else 0)

    return Contender(name, build, step, memory=memory)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _external() -> list[Contender]:
    try:
        import pytorch_optimizer as po
    except ImportError:
        return []
    source = f"pytorch-optimizer {po.__version__}" if hasattr(po, "__version__") else "pytorch-optimizer"

    def plain_closure(model, x, y):
        def closure():
            model.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    def two_pass(opt, model, x, y, ids):
        closure = plain_closure(model, x, y)
        closure()
        opt.step(closure)
        return 2

    def build_gsam(model):
        base = torch.optim.SGD(model.parameters(), **SGD)
        sched = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
        rho = po.ProportionScheduler(sched, max_lr=SGD["lr"], min_lr=0.0, max_value=0.05, min_value=0.05)
        return po.GSAM(model.parameters(), base, model, rho, alpha=0.4)

    def gsam_step(opt, model, x, y, ids):
        opt.set_closure(nn.functional.cross_entropy, x, y)
        opt.step()
        return 2

    return [
        Contender("SAM", lambda m: po.SAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD), two_pass, source),
        Contender("GSAM", build_gsam, gsam_step, source),
        Contender("FriendlySAM", lambda m: po.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.05, **SGD), two_pass, source),
    ]


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(
    arch: str,
    batch_size: int,
    steps: int,
    rounds: int,
    warmup: int,
    image_size: int,
    device: str,
    names: list[str] | None = None,
    external: bool = True,
    channels: int = 3,
) -> list[dict]:
    torch.manual_seed(0)
    dev = torch.device(device)
    template = create_model(arch, num_classes=10, in_channels=channels).to(dev)
    names = names or [n for n in available_optimizers() if n not in ("adam", "adamw")]
    contenders = [_ours(n, batch_size * steps) for n in names] + (_external() if external else [])
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch_size, channels, image_size, image_size, generator=g).to(dev),
            torch.randint(0, 10, (batch_size,), generator=g).to(dev),
            torch.arange(i * batch_size, (i + 1) * batch_size, device=dev),
        )
        for i in range(steps)
    ]
    runs = []
    for c in contenders:
        model = copy.deepcopy(template).train()
        runs.append((c, model, c.build(model), []))
    for c, model, opt, _ in runs:
        for i in range(warmup):
            c.step(opt, model, *batches[i % steps])
    timings: dict[str, list[float]] = {c.name + c.source: [] for c, *_ in runs}
    ratios: dict[str, list[float]] = {c.name + c.source: [] for c, *_ in runs}
    passes: dict[str, float] = {}
    order = random.Random(0)
    for _ in range(rounds):
        this_round = {}
        for c, model, opt, _ in order.sample(runs, len(runs)):
            synchronize(dev)
            start = time.perf_counter()
            total_passes = sum(c.step(opt, model, x, y, ids) for x, y, ids in batches)
            synchronize(dev)
            this_round[c.name + c.source] = (time.perf_counter() - start) / steps
            passes[c.name + c.source] = total_passes / steps
        for key, seconds in this_round.items():
            timings[key].append(seconds)
            ratios[key].append(seconds / this_round["sgd" + "this project"])
    param_bytes = _param_bytes(template)
    rows = []
    for c, _model, opt, _ in runs:
        seconds = statistics.median(timings[c.name + c.source])
        ratio = statistics.median(ratios[c.name + c.source])
        extra = c.memory(opt) / param_bytes if c.memory is not None else None
        rows.append(
            {
                "optimizer": c.name,
                "implementation": c.source,
                "step_ms": seconds * 1e3,
                "ratio_to_sgd": ratio,
                "passes_per_step": passes[c.name + c.source],
                "extra_memory_x_params": extra if c.source == "this project" else None,
                "declared_passes": str(getattr(type(opt), "passes", "1")) if c.source == "this project" else "",
            }
        )
    return rows


def to_markdown(rows: list[dict], settings: dict, command: str) -> str:
    lines = [
        "# Step cost of every optimizer, relative to SGD",
        "",
        f"Generated by `{command}`.",
        "",
        f"Model {settings['arch']} ({settings['params']:,} parameters), batch {settings['batch_size']} of "
        f"{settings['image_size']}x{settings['image_size']}x{settings['channels']} images, fp32, {settings['device']} "
        f"({settings['machine']}, {settings['threads']} threads), torch {torch.__version__}. "
        f"{settings['rounds']} rounds of {settings['steps']} steps per optimizer, in shuffled order, after {settings['warmup']} warm-up steps: "
        "median step time, and median over rounds of the ratio to SGD in the same round.",
        "",
        "Extra memory: what the optimizer keeps between steps beyond the base optimizer's state "
        "(weight backup, variant state, and the state of a method's loss term: a buffer of past logits, an EMA model), "
        "in multiples of the parameter bytes. A method that is a loss term is timed with its term attached and active "
        "(a step includes its term's work, such as an EMA model's forward). Declared passes: what the optimizer's class says a step costs.",
        "",
        "| optimizer | implementation | step (ms) | x SGD | fwd-bwd passes / step | declared passes | extra memory (x params) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        extra = "" if r["extra_memory_x_params"] is None else f"{r['extra_memory_x_params']:.2f}"
        lines.append(
            f"| {r['optimizer']} | {r['implementation']} | {r['step_ms']:.1f} | {r['ratio_to_sgd']:.2f} | {r['passes_per_step']:.2f} "
            f"| {r.get('declared_passes', '')} | {extra} |"
        )
    return "\n".join(lines) + "\n"


def check_arguments(args) -> None:
    """Every value checked before any timing: one line for the first bad one."""
    for name, low in (("batch_size", 1), ("image_size", 1), ("channels", 1), ("steps", 1), ("rounds", 1), ("warmup", 0)):
        value = getattr(args, name)
        if value < low:
            raise ConfigError(f"perf: --{name} must be an integer >= {low}, got {value}")
    if not args.recipe:
        try:
            resolve_architecture(args.arch)
        except ValueError as err:
            raise ConfigError(f"perf: {err}") from None
    for name in args.optimizers or ():
        try:
            canonical_name(name)
        except ValueError:
            raise ConfigError(f"perf: unknown optimizer {name!r}; choose one of: {', '.join(available_optimizers())}") from None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"perf: --device {args.device!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": lambda: torch.backends.mps.is_available(),
    }
    if not available.get(device.type, lambda: False)():
        raise ConfigError(f"perf: --device {args.device}: no such device on this machine")
    if args.harness:
        from bench.studies.perf_harness import parse_modes

        parse_modes(args.modes)
    if args.out is not None:
        check_writable(args.out)


def write_kept(path: Path, text: str, force: bool) -> None:
    """``text`` printed, and written to ``path`` unless it replaces a table of more rows there (a narrower
    measurement over a committed one) and ``force`` is not given: one line instead (the measurement printed)."""
    print(text)
    rows = sum("| " in line for line in text.splitlines())  # as count_lines counts the file's
    check = "the table above is this measurement's; --out elsewhere keeps both"
    check_not_emptied(path, rows, count_lines(path, ("| ",)), "table lines", force, check)
    write_text(path, text)


def shown_command(args, parser) -> str:
    """The command a table names at its top: every value given that is not the default, lists and --set
    included, and the thread count where OMP_NUM_THREADS sets it (--force changes no measurement)."""

    def flag(name, value) -> str:
        if isinstance(value, bool):
            return f" --{name}"
        values = value if isinstance(value, list) else [value]
        return f" --{name} " + " ".join(shlex.quote(str(v)) for v in values)

    given = [(k, v) for k, v in vars(args).items() if v != parser.get_default(k) and k not in ("set", "force")]
    threads = os.environ.get("OMP_NUM_THREADS")
    return (
        (f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else "")
        + "python launch.py perf"
        + "".join(flag(k, v) for k, v in given)
        + "".join(f" --set {shlex.quote(s)}" for s in args.set)
    )


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="launch.py perf", description="Time one training step of SGD and every variant.")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, help="image channels (the digits are 8x8x1)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round (a multiple of LookSAM's k=5)")
    p.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="timed rounds per contender, the medians' samples (where the machine's speed drifts, more rounds narrow "
        "the spread between runs of one command: 60 for results/perf_harness_mlp_xeon.md)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizers", nargs="+", default=None)
    p.add_argument("--no_external", action="store_true", help="skip pytorch-optimizer's implementations")
    p.add_argument("--out", default=None, help="default: results/perf.md (results/perf_harness.md with --harness)")
    p.add_argument("--force", action="store_true", help="replace --out even where it holds a table of more rows")
    p.add_argument(
        "--harness",
        action="store_true",
        help="time the harness's step against a bare PyTorch loop, with and without --compile and "
        "--channels_last (for --optimizers, default sgd and the reference method, optimizers.registry.REFERENCE) instead of every optimizer",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="time the loop's own step for every optimizer of this recipe's grid (or --optimizers), on "
        "its real batches, relative to its sgd step: the work its table's `time vs sgd` measures",
    )
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="--recipe: override a recipe field")
    p.add_argument("--data_dir", default=None, help="--recipe: where its dataset is")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --harness")
    p.add_argument(
        "--modes",
        default="eager,channels_last,compile,compile+channels_last",
        help="--harness: the layouts to time, comma-separated from eager, channels_last, compile, compile+channels_last",
    )
    args = p.parse_args(argv)
    check_arguments(args)
    command = shown_command(args, p)
    if args.recipe and args.harness:
        raise ConfigError("perf takes --recipe or --harness, not both")
    if (args.set or args.data_dir) and not args.recipe:
        raise ConfigError("perf: --set and --data_dir apply to --recipe only")
    if args.recipe:
        from bench.studies.perf_harness import run_recipe

        text = run_recipe(args, command)
        write_kept(Path(args.out or f"results/perf_loop_{Path(args.recipe).stem}.md"), text, args.force)
        return 0
    if args.harness:
        from bench.studies.perf_harness import run

        text = run(args, command)
        write_kept(Path(args.out or "results/perf_harness.md"), text, args.force)
        return 0
    names = args.optimizers
    if names and "sgd" not in names:
        names = ["sgd", *names]
    rows = measure(
        args.arch,
        args.batch_size,
        args.steps,
        args.rounds,
        args.warmup,
        args.image_size,
        args.device,
        names,
        external=not args.no_external,
        channels=args.channels,
    )
    params = create_model(args.arch, num_classes=10, in_channels=args.channels).parameters()
    settings = dict(
        vars(args),
        params=sum(p.numel() for p in params),
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
    )
    text = to_markdown(rows, settings, command)
    write_kept(Path(args.out or "results/perf.md"), text, args.force)
    return 0
