"""The command line's vocabulary: every run flag, the one configuration field it sets, and its group.

:data:`FLAGS` is the one table. Parsing (``dest`` is the field), the resume check and every
error message read it, and a message names the flag as the user typed it. The seed project's
spellings are kept: ``--optimizer`` is the base optimizer (field ``base_optimizer``),
``--sam_type`` the variant (field ``optimizer``: the registered optimizer a run trains with,
a variant or a plain sgd/adamw/adam), ``--arch_type`` (or ``--arch``) the model.

Nothing here imports torch: the variant flags come from ``declarations.json`` (see
:mod:`bench.cli.declarations`), so ``python launch.py --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.cli import declarations
from bench.usage import Parser

#: The option groups of ``launch.py --help``, in order.
GROUPS = {
    "data": "data",
    "model": "model",
    "optimizer": "optimizer (the variant's own settings are in the next group)",
    "training": "training",
    "checkpoints": "checkpoints, resume and recipes",
    "processes": "processes and precision",
    "output": "output and measurement",
}


@dataclass(frozen=True)
class Flag:
    """One run flag: its spellings, the configuration field it sets (its ``dest``), its group."""

    spellings: tuple[str, ...]
    field: str
    group: str
    kind: Any = str  # a type, or "switch" for a store_true flag
    default: Any = None
    help: str | None = None
    #: False: not a RunConfig field (how to run, not what: --resume, --recipe, ...)
    config: bool = True

    @property
    def name(self) -> str:
        return self.spellings[0]


def _f(
    spelling: str,
    group: str,
    kind: Any = str,
    default: Any = None,
    help: str | None = None,
    field: str | None = None,
    aliases: tuple[str, ...] = (),
    config: bool = True,
) -> Flag:
    return Flag((f"--{spelling}", *(f"--{a}" for a in aliases)), field or spelling, group, kind, default, help, config)


#: Every run flag but the variants' own (those come from their declarations).
FLAGS: tuple[Flag, ...] = (
    _f(
        "dataset",
        "data",
        default="digits",
        help="digits, cifar10, cifar100, tinyimagenet (in memory), imagefolder "
        "(class folders under --data_dir) or hf:OWNER/NAME (a Hugging Face Hub dataset, streamed)",
    ),
    _f(
        "data_dir",
        "data",
        help="where cifar10/cifar100/tinyimagenet files are (or go); for imagefolder the folder "
        "holding train/<class>/ and val/<class>/",
    ),
    _f("train_subset", "data", int, help="train on a fixed subset of this many images"),
    _f("label_noise", "data", float, 0.0, "fraction of training labels replaced at random"),
    _f("val_fraction", "data", float, 0.0, "hold out this fraction of the training set (stratified) for validation"),
    _f("split_seed", "data", int, 0, "seed of the validation split (the same for every run seed)"),
    _f("val_fold", "data", int, 0, "hold out the validation split's Nth block (k-fold: --val_fraction 1/k, N < k)"),
    _f("cutout", "data", "switch", help="cutout augmentation (in-memory datasets)"),
    _f("no_augment", "data", "switch", help="no crop, flip or cutout: train on the images as they are (in-memory datasets)"),
    _f("test_flips", "data", "switch", help="evaluate on the mean logits of each image and its mirror image (test-time flips)"),
    _f(
        "image_size",
        "data",
        int,
        help="imagefolder and hf: datasets: side of the training crop and the evaluation view (default 224)",
    ),
    _f(
        "workers",
        "data",
        int,
        help="imagefolder and hf: datasets: decoding workers per process (0: in the training "
        "process; default: the free cores, at most 8)",
    ),
    _f("image_column", "data", help="hf: datasets: the image column (default: detected)"),
    _f("label_column", "data", help="hf: datasets: the label column (default: detected)"),
    _f(
        "arch_type",
        "model",
        default="smallcnn",
        field="arch",
        aliases=("arch",),
        help="the model: {architectures}, or timm:NAME (a timm model)",
    ),
    _f("channels_last", "model", "switch", help="channels-last memory format for the model and its input batches"),
    _f("compile", "model", "switch", help="torch.compile the model (one graph serves every pass of every variant)"),
    _f("compile_backend", "model", default="inductor", help="torch.compile backend used with --compile"),
    _f(
        "sync_bn",
        "model",
        "switch",
        help="BatchNorm statistics over all processes (with --ascent_sync global: equals one process on the whole batch)",
    ),
    _f("optimizer", "optimizer", default="sgd", field="base_optimizer", help="base optimizer: sgd, adamw or adam"),
    _f(
        "sam_type",
        "optimizer",
        field="optimizer",
        help="the SAM variant, case-insensitive: {variants} (`launch.py "
        "variants` describes them); omit it for the plain base optimizer",
    ),
    _f("lr", "optimizer", float, 0.1),
    _f("momentum", "optimizer", float, 0.9),
    _f("weight_decay", "optimizer", float, 5e-4),
    _f("nesterov", "optimizer", "switch"),
    _f("epochs", "training", int, 10),
    _f("batch_size", "training", int, 128, "the whole batch, over every process and micro-batch"),
    _f(
        "schedule",
        "training",
        default="cosine",
        help="cosine, step (x0.2 at 30/60/80%%), constant or linear (down to 0 after the warm-up)",
    ),
    _f("warmup_epochs", "training", float, 0.0),
    _f("label_smoothing", "training", float, 0.0),
    _f(
        "max_grad_norm",
        "training",
        float,
        help="clip the descent gradient to this global norm before each update, as clip_grad_norm_ in a plain loop "
        "(the ascent direction is not clipped)",
    ),
    _f("seed", "training", int, 0),
    _f("max_steps", "training", int, help="stop after this many optimizer steps"),
    _f("grad_accum_steps", "training", int, 1, "micro-batches per pass (batch_size is the whole batch)"),
    _f("max_consecutive_skips", "training", int, 20, "stop after this many non-finite steps in a row"),
    _f(
        "test_every_epochs",
        "training",
        int,
        1,
        "evaluate the test set every N epochs and after the last; 0: never (a tuning's trials) (the validation split: every epoch)",
    ),
    _f(
        "resume",
        "checkpoints",
        help="'auto' (this config's run directory, if it has a checkpoint) or a run directory",
        config=False,
    ),
    _f("save_every_steps", "checkpoints", int, 0, "checkpoint every N steps (0: off)"),
    _f("save_every_epochs", "checkpoints", int, 1, "checkpoint every N epochs (0: off); always at the end"),
    _f("keep_checkpoints", "checkpoints", int, 2),
    _f("recipe", "checkpoints", help="a recipe name or .toml path (see bench/recipes/); change it with --set", config=False),
    Flag(("--set",), "sets", "checkpoints", "append", None, "override a recipe field (FIELD=VALUE)", config=False),
    _f("suite", "checkpoints", help="run a recipe's whole grid (like `sweep NAME`)", config=False),
    _f("mixed_precision", "processes", default="no", help="no, bf16 or fp16"),
    _f(
        "ascent_sync",
        "processes",
        default="local",
        aliases=("sam_sync",),
        help="local (per-replica perturbation) or global (all-reduced ascent gradient)",
    ),
    _f("cpu", "processes", "switch", help="train on the CPU even when a GPU is present"),
    _f("threads", "processes", int, help="torch threads per process (default: the cores divided among the processes)"),
    _f("output_dir", "output", default="runs"),
    _f("run_name", "output", help="the run folder's name under --output_dir (default: the run id)"),
    _f("log_with", "output", help="an Accelerate tracker: tensorboard, wandb, mlflow, ..."),
    _f("sharpness", "output", "switch", help="measure the final model's sharpness (sharpness.json)"),
)

#: configuration field -> its flag
BY_FIELD = {f.field: f for f in FLAGS}

#: The fields a run of a recipe may set by flag (how to run it, not what it is).
RECIPE_FLAGS = {
    "recipe",
    "sets",
    "output_dir",
    "data_dir",
    "resume",
    "cpu",
    "save_every_steps",
    "save_every_epochs",
    "keep_checkpoints",
    "log_with",
    "threads",
    "workers",
    "compile",
    "compile_backend",
    "channels_last",
    "test_every_epochs",
}

SUBCOMMANDS = (
    ("(none)", "the default suite: `sweep digits` (the embedded dataset, a few minutes on 2 cores)"),
    ("[run flags]", "one run (the seed project's flags work verbatim; the groups below)"),
    ("sweep RECIPE", "every run of a recipe (resumable), then its tables and plots"),
    ("tune RECIPE", "tune every optimizer on a validation split (equal budget), then run the choices"),
    ("table [RUNS]", "aggregate finished runs into a results table"),
    ("claims NAME=RUNS ...", "published claims (SAM beats SGD, ...) tested against finished runs"),
    ("reproduction", "reported against measured, for every recipe"),
    ("sharpness RUNS", "measure the sharpness of finished runs"),
    ("perf", "time one training step of every optimizer"),
    ("variants", "every optimizer, its settings and their flags"),
)


def _description() -> str:
    width = max(len(c) for c, _ in SUBCOMMANDS)
    lines = [f"  launch.py {command.ljust(width)}  {text}" for command, text in SUBCOMMANDS]
    return "Train and compare SGD/AdamW and SAM variants.\n\ncommands (`launch.py COMMAND --help` for each):\n" + "\n".join(lines)


def _variant_group_text(table: dict[str, Any]) -> str:
    lines = [f"  {name}: {' '.join('--' + f for f in flags)}" for name, flags in table["variants"].items()]
    return "unset: the variant's declared default (`launch.py variants` lists them); by variant:\n" + "\n".join(lines)


def run_parser() -> argparse.ArgumentParser:
    """The run command's parser: each flag's ``dest`` is the configuration field it sets."""
    p = Parser(
        prog="launch.py",
        usage="launch.py [COMMAND ...] | launch.py [run flags]",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    table = declarations.load()
    choices = {"architectures": ", ".join(table["architectures"]), "variants": ", ".join(table["variants"])}
    for flag in FLAGS:
        group = groups[flag.group]
        flag = dataclasses.replace(flag, help=flag.help.format(**choices)) if flag.help and "{" in flag.help else flag
        if flag.kind == "switch":
            group.add_argument(*flag.spellings, dest=flag.field, action="store_true", help=flag.help)
        elif flag.kind == "append":
            group.add_argument(
                *flag.spellings, dest=flag.field, action="append", default=[], metavar="FIELD=VALUE", help=flag.help
            )
        else:
            group.add_argument(
                *flag.spellings,
                dest=flag.field,
                type=flag.kind,
                default=flag.default,
                help=flag.help,
                metavar=flag.name[2:].upper(),
            )
    variants = p.add_argument_group("variant settings", _variant_group_text(table))
    for name, spec in table["flags"].items():
        kind = spec["kind"]
        kwargs = (
            {"action": argparse.BooleanOptionalAction, "default": None}
            if kind == "bool"
            else {"type": int if kind == "int" else float}
        )
        variants.add_argument(f"--{name}", help=spec["help"].replace("%", "%%"), **kwargs)
    return p


def given_flags(argv: list[str]) -> dict[str, str]:
    """field -> the spelling the user typed, for the flags actually written on the command line."""
    parser = run_parser()
    spelled: dict[str, str] = {}
    for action in parser._actions:
        for spelling in action.option_strings:
            spelled[spelling] = action.dest
    given = {}
    for word in argv:
        spelling = word.split("=", 1)[0]
        if spelling in spelled:
            given.setdefault(spelled[spelling], spelling)
        elif spelling.startswith("--") and len(spelling) > 2:  # an unambiguous prefix, as argparse takes it
            matches = {spelled[s] for s in spelled if s.startswith(spelling)}
            if len(matches) == 1:
                given.setdefault(matches.pop(), spelling)
    return given
