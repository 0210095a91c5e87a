"""Typed run configuration, validated at the boundary: one line per bad value."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from architectures.registry import resolve as resolve_architecture
from optimizers import available_optimizers, create_optimizer, optimizer_class
from optimizers.base import BASE_OPTIMIZERS
from optimizers.registry import canonical_name
from optimizers.settings import Setting

from .data import DataError, available_datasets
from .data import canonical_name as dataset_name
from .streaming import DEFAULT_IMAGE_SIZE, is_loader_dataset, loader_dataset_name

SCHEDULES = ("cosine", "step", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
SAM_SYNC = ("local", "global")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
#: numpy's seed range (the data pipeline and accelerate's set_seed seed numpy)
SEED_RANGE = "[0, 4294967295]"

#: Settings that do not change a run's result (left out of its id).
OPERATIONAL = (
    "output_dir", "run_name", "data_dir", "save_every_steps", "save_every_epochs", "keep_checkpoints", "cpu", "sharpness",
    "sharpness_samples", "sharpness_iterations", "sharpness_probes", "log_with", "threads", "workers", "compile",
    "compile_backend", "channels_last", "test_every_epochs",
)

#: Settings of the datasets read through loader workers, left out of a run's identity while unset
#: (None), so that the ids of runs on the in-memory datasets, which never set them, stay as they are.
UNSET_NOT_IDENTITY = ("image_size", "image_column", "label_column")

#: Keys of a run's config.json that describe the run, not its settings.
RUN_METADATA = ("run_id", "world_size", "device", "versions", "environment", "resolved_hyperparameters")

#: Range and type of every numeric or boolean field (the same checks as a variant's settings).
FIELD_CHECKS = {
    s.name: s
    for s in (
        Setting("epochs", 10, int, "[1, inf)"),
        Setting("batch_size", 128, int, "[1, inf)"),
        Setting("lr", 0.1, float, "(0, inf)"),
        Setting("momentum", 0.9, float, "[0, 1)"),
        Setting("weight_decay", 5e-4, float, "[0, inf)"),
        Setting("nesterov", False, bool),
        Setting("warmup_epochs", 0.0, float, "[0, inf)"),
        Setting("step_factor", 0.2, float, "(0, 1]"),
        Setting("label_smoothing", 0.0, float, "[0, 1)"),
        Setting("cutout", False, bool),
        Setting("train_subset", None, int, "[1, inf)", optional=True),
        Setting("label_noise", 0.0, float, "[0, 1)"),
        Setting("val_fraction", 0.0, float, "[0, 1)"),
        Setting("split_seed", 0, int, SEED_RANGE),
        Setting("sharpness", False, bool),
        Setting("sharpness_samples", 1024, int, "[1, inf)"),
        Setting("sharpness_iterations", 20, int, "[0, inf)"),
        Setting("sharpness_probes", 10, int, "[0, inf)"),
        Setting("test_every_epochs", 1, int, "[1, inf)"),
        Setting("seed", 0, int, SEED_RANGE),
        Setting("sync_bn", False, bool),
        Setting("cpu", False, bool),
        Setting("grad_accum_steps", 1, int, "[1, inf)"),
        Setting("max_steps", None, int, "[1, inf)", optional=True),
        Setting("max_consecutive_skips", 20, int, "[1, inf)"),
        Setting("save_every_steps", 0, int, "[0, inf)"),
        Setting("save_every_epochs", 1, int, "[0, inf)"),
        Setting("keep_checkpoints", 2, int, "[1, inf)"),
        Setting("threads", None, int, "[1, inf)", optional=True),
        Setting("compile", False, bool),
        Setting("channels_last", False, bool),
        Setting("image_size", None, int, "[8, inf)", optional=True),
        Setting("workers", None, int, "[0, inf)", optional=True),
    )
}


def _writable(path: str) -> bool:
    """Whether ``path`` is a writable directory or could be created as one (tried, not guessed:
    permission bits say little to root or on read-only mounts)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return False
    try:
        with tempfile.TemporaryFile(dir=p):
            return True
    except OSError:
        return False


class ConfigError(ValueError):
    """A bad value from the user: one line naming it and the valid choices."""


def own_rule_settings(config: RunConfig) -> dict[str, Any]:
    """The run settings a variant with its own update rule may take, if it declares them."""
    return {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value: str, choices, what: str) -> str:
    _need(value in choices, f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


@dataclass
class RunConfig:
    """Everything a training run depends on. ``hyperparameters`` are the variant's own
    (rho, eta, beta, ...); anything not given takes the variant's declared default."""

    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "smallcnn"
    optimizer: str = "sgd"
    base_optimizer: str = "sgd"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    step_factor: float = 0.2
    label_smoothing: float = 0.0
    cutout: bool = False
    train_subset: int | None = None
    label_noise: float = 0.0
    val_fraction: float = 0.0
    split_seed: int = 0
    #: imagefolder and hf: datasets only: the side of the training crop and the evaluation view
    #: (None: 224), and for hf: datasets the image and label columns (None: detected)
    image_size: int | None = None
    image_column: str | None = None
    label_column: str | None = None
    sharpness: bool = False
    sharpness_samples: int = 1024
    #: power-iteration steps for the top Hessian eigenvalue, Rademacher probes for its trace
    sharpness_iterations: int = 20
    sharpness_probes: int = 10
    #: evaluate the test set every N epochs and always after the last (validation: every epoch);
    #: with a small training set the test set costs more than the training
    test_every_epochs: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    sam_sync: str = "local"
    sync_bn: bool = False
    cpu: bool = False
    grad_accum_steps: int = 1
    max_steps: int | None = None
    max_consecutive_skips: int = 20
    save_every_steps: int = 0
    save_every_epochs: int = 1
    keep_checkpoints: int = 2
    threads: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    channels_last: bool = False
    #: imagefolder and hf: datasets only: decoding workers per process (None: the free cores, at most 8)
    workers: int | None = None
    log_with: str | None = None
    output_dir: str = "runs"
    run_name: str | None = None

    def validate(self) -> RunConfig:
        self._check_names()
        for name, check in FIELD_CHECKS.items():
            try:
                setattr(self, name, check.check(getattr(self, name)))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        self._check_relations()
        self._check_data()
        self._check_optimizer_settings()
        return self

    def _check_names(self) -> None:
        try:
            self.optimizer = canonical_name(self.optimizer)
        except ValueError:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(available_optimizers())}") from None
        self.base_optimizer = _choice(str(self.base_optimizer).lower(), tuple(BASE_OPTIMIZERS), "base optimizer")
        try:
            loader_dataset = loader_dataset_name(self.dataset)
            self.dataset = loader_dataset or dataset_name(self.dataset)
        except DataError as err:
            if str(self.dataset).strip().lower().startswith("hf:"):
                raise ConfigError(str(err)) from None
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(available_datasets())}, "
                              "imagefolder, hf:OWNER/NAME") from None
        try:
            resolve_architecture(self.arch)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _choice(self.schedule, SCHEDULES, "schedule")
        _choice(self.mixed_precision, MIXED_PRECISION, "mixed_precision")
        _choice(self.sam_sync, SAM_SYNC, "sam_sync")
        if self.compile:
            import torch._dynamo

            _choice(self.compile_backend, torch._dynamo.list_backends(exclude_tags=()), "compile_backend")
        if self.log_with is not None:
            _choice(self.log_with, TRACKERS, "log_with")
            _need(importlib.util.find_spec(self.log_with) is not None,
                  f"log_with {self.log_with} needs the {self.log_with} package: pip install {self.log_with}")
        _need(_writable(self.output_dir), f"output_dir {self.output_dir!r} is not writable")

    def _check_relations(self) -> None:
        _need(self.warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        milestones = tuple(self.step_milestones)
        _need(all(isinstance(m, (int, float)) and 0 < m < 1 for m in milestones),
              f"step_milestones must be fractions in (0, 1), got {self.step_milestones}")
        self.step_milestones = milestones

    def _check_data(self) -> None:
        """The settings of the datasets read through loader workers: only for them, and what each allows."""
        if not is_loader_dataset(self.dataset):
            given = [f for f in ("image_size", "workers", "image_column", "label_column") if getattr(self, f) is not None]
            _need(not given, f"{', '.join(given)}: only for the imagefolder and hf: datasets, not {self.dataset}")
            return
        if self.image_size is None:
            self.image_size = DEFAULT_IMAGE_SIZE
        _need(not self.cutout, f"cutout is for the in-memory datasets; {self.dataset} has its own augmentation")
        if self.dataset == "imagefolder":
            _need(bool(self.data_dir), "imagefolder needs --data_dir DIR holding train/<class>/ and val/<class>/ image folders")
            columns = [f for f in ("image_column", "label_column") if getattr(self, f) is not None]
            _need(not columns, f"{', '.join(columns)}: only for hf: datasets, not imagefolder")
            return
        random_access = [f"{f} {getattr(self, f)}" for f in ("train_subset", "val_fraction", "label_noise") if getattr(self, f)]
        _need(not random_access, f"{', '.join(random_access)}: needs random access to the training set, which the "
                                 f"streamed {self.dataset} does not give")
        regularizer = getattr(optimizer_class(self.optimizer), "loss_regularizer", None)
        _need(not getattr(regularizer, "needs_sample_ids", False),
              f"{self.optimizer} keeps a value per training sample, which needs sample ids the streamed {self.dataset} "
              "does not give")

    def optimizer_settings(self, num_train: int) -> dict[str, Any]:
        """Keyword arguments for ``create_optimizer``: the base optimizer's (or, for a variant with
        its own update rule, the lr and the momentum and weight decay it declares), the quantities
        the harness fills in (``Setting.filled_by``: the training-set size, the total step count),
        then the variant's own."""
        cls = optimizer_class(self.optimizer)
        declared = {s.name: s for s in getattr(cls, "settings", ())}
        fills = {"num_train": num_train, "total_steps": max(1, self.epochs * (num_train // self.batch_size))}
        filled = {name: fills[s.filled_by] for name, s in declared.items() if s.filled_by in fills}
        if not getattr(cls, "uses_base_optimizer", True):
            # an update rule of its own takes the run's lr, and its momentum and weight decay if it has them
            own = {k: v for k, v in own_rule_settings(self).items() if k in declared or k == "lr"}
            return {**own, **filled, **self.hyperparameters}
        base = self.optimizer if self.optimizer in BASE_OPTIMIZERS else self.base_optimizer
        if base == "sgd":
            settings = dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)
        else:
            settings = dict(lr=self.lr, weight_decay=self.weight_decay)
        return {**settings, **filled, **self.hyperparameters}

    def _check_optimizer_settings(self) -> None:
        """Build the optimizer on a stand-in parameter, so a bad hyperparameter fails before any work."""
        try:
            create_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], base=self.base_optimizer,
                             **self.optimizer_settings(num_train=1))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.optimizer}: {err}") from None
        obstacle = getattr(optimizer_class(self.optimizer), "compile_obstacle", None)
        reason = obstacle(self.hyperparameters) if self.compile and obstacle is not None else None
        _need(reason is None, f"--compile: {reason}")

    def resolved_hyperparameters(self) -> dict[str, Any]:
        """The variant's own settings as it will use them, recorded in config.json: its declared defaults
        (not those the harness fills in) overlaid with the given ones, as JSON values."""
        declared = getattr(optimizer_class(self.optimizer), "settings", ())
        defaults = {s.name: s.default for s in declared if s.filled_by is None}
        return json.loads(json.dumps({**defaults, **self.hyperparameters}, default=str))

    def check_recorded(self) -> None:
        """Refuse to continue or reuse a run made with variant settings this version resolves otherwise.

        A run's id holds only the settings it was given, so after a default changes, an old run has
        the id of a new one; counting it as one would report the old setting as the new."""
        path = self.run_dir() / "config.json"
        try:
            recorded = json.loads(path.read_text()).get("resolved_hyperparameters") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            return  # an unreadable config.json is the resume's or the table's to report
        if not isinstance(recorded, dict):
            return  # written before the settings were recorded
        now = self.resolved_hyperparameters()
        changed = sorted(k for k in {*recorded, *now} if recorded.get(k, "unset") != now.get(k, "unset"))
        then_values = ", ".join(f"{k}={recorded.get(k, 'unset')}" for k in changed)
        now_values = ", ".join(f"{k}={now.get(k, 'unset')}" for k in changed)
        _need(not changed, f"{self.run_dir()} was run with {then_values}, which this version resolves to {now_values} "
                           "(a changed default): move that run aside, or set those values to continue it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], ignore: tuple[str, ...] = ()) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in ignore}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if "step_milestones" in values:
            values["step_milestones"] = tuple(values["step_milestones"])
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The settings that change the result."""
        return {k: v for k, v in self.to_dict().items()
                if k not in OPERATIONAL and not (k in UNSET_NOT_IDENTITY and v is None)}

    def run_id(self) -> str:
        """Deterministic name from the settings that change the result."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        # timm:NAME, hf:OWNER/NAME: no colon or slash in a folder name
        arch, dataset = (re.sub(r"[^A-Za-z0-9_.-]", "-", name) for name in (self.arch, self.dataset))
        return f"{dataset}_{arch}_{self.optimizer}_s{self.seed}_{digest}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or self.run_id())
