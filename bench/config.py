"""Typed run configuration, validated at the boundary: one line per bad value.

A leaf: :meth:`RunConfig.validate` checks values (types, ranges, choices, relations between
fields) and reads no registry. Resolving a configuration against the registries (the
variant and its settings, the model, the dataset) is :func:`bench.resolve.resolve`'s job,
done once before a run starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import UserError
from optimizers.settings import Setting

SCHEDULES = ("cosine", "step", "constant", "linear")
MIXED_PRECISION = ("no", "bf16", "fp16")
#: how the ascent pass's gradient is treated across processes (a variant that declares one keeps its own)
ASCENT_SYNC = ("local", "global")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
#: numpy's seed range (the data pipeline and accelerate's set_seed seed numpy)
SEED_RANGE = "[0, 4294967295]"

#: Settings that do not change a run's result (left out of its id).
OPERATIONAL = (
    "output_dir",
    "run_name",
    "data_dir",
    "save_every_steps",
    "save_every_epochs",
    "keep_checkpoints",
    "cpu",
    "sharpness",
    "sharpness_samples",
    "sharpness_iterations",
    "sharpness_probes",
    "log_with",
    "threads",
    "workers",
    "compile",
    "compile_backend",
    "channels_last",
    "test_every_epochs",
)

#: Settings added after runs were recorded (the datasets read through loader workers, the data's fingerprint,
#: clipping, the validation fold), left out of a run's identity while at this value, so that the ids of runs
#: that never set them stay as they are.
LATER_SETTINGS = {
    "image_size": None,
    "image_column": None,
    "label_column": None,
    "data_id": None,
    "max_grad_norm": None,
    "val_fold": 0,
    "no_augment": False,
    "test_flips": False,
}


def added_later_and_unset(key: str, value: Any) -> bool:
    """A setting added after runs were recorded, at the value that leaves it out of a run's id: a run (or a
    record) that has it at that value and one that lacks it are the same setting."""
    return key in LATER_SETTINGS and value == LATER_SETTINGS[key]


#: Keys of a run's config.json that describe the run, not its settings.
RUN_METADATA = (
    "run_id",
    "world_size",
    "device",
    "versions",
    "environment",
    "code",
    "code_resumed",
    "resolved_hyperparameters",
)

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
        Setting("max_grad_norm", None, float, "(0, inf)", optional=True),
        Setting("cutout", False, bool),
        Setting("no_augment", False, bool),
        Setting("test_flips", False, bool),
        Setting("train_subset", None, int, "[1, inf)", optional=True),
        Setting("label_noise", 0.0, float, "[0, 1)"),
        Setting("val_fraction", 0.0, float, "[0, 1)"),
        Setting("split_seed", 0, int, SEED_RANGE),
        Setting("val_fold", 0, int, "[0, inf)"),
        Setting("sharpness", False, bool),
        Setting("sharpness_samples", 1024, int, "[1, inf)"),
        Setting("sharpness_iterations", 20, int, "[0, inf)"),
        Setting("sharpness_probes", 10, int, "[0, inf)"),
        Setting("test_every_epochs", 1, int, "[0, inf)"),
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


class ConfigError(UserError, ValueError):
    """A bad value from the user: one line naming it and the valid choices."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(value: str, choices, what: str) -> str:
    _need(value in choices, f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


def check_name(name: Any, what: str) -> str:
    """``name`` if it names one folder (no path separator, not "." or ".."); else one ConfigError line."""
    _need(
        isinstance(name, str) and name.strip() == name and name not in ("", ".", "..") and not set("/\\") & set(name),
        f"{what} must be a folder name, not a path (no / or \\, not . or ..), got {name!r}",
    )
    return name


@dataclass
class RunConfig:
    """Everything a training run depends on. ``hyperparameters`` are the variant's own
    (rho, eta, beta, ...); anything not given takes the variant's declared default."""

    dataset: str = "digits"
    data_dir: str | None = None
    #: the fingerprint of the files under data_dir (bench.data.fingerprint), filled in by resolve: part of
    #: the run's identity, so runs on different data never share an id; a recorded one must match the data
    data_id: str | None = None
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
    #: the global norm the descent gradient is clipped to before each update (None: no clipping)
    max_grad_norm: float | None = None
    cutout: bool = False
    #: in-memory datasets: train on the images as they are (no crop, flip or cutout)
    no_augment: bool = False
    #: evaluation (validation and test) on the mean logits of each image and its mirror image
    test_flips: bool = False
    train_subset: int | None = None
    label_noise: float = 0.0
    val_fraction: float = 0.0
    split_seed: int = 0
    #: which block of the split's order is held out (k-fold validation: val_fraction 1/k, folds 0 .. k-1)
    val_fold: int = 0
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
    ascent_sync: str = "local"
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
        """Check every value (in place; ints widened where a float is expected); ConfigError, one line, for the first bad one."""
        for name, check in FIELD_CHECKS.items():
            try:
                setattr(self, name, check.check(getattr(self, name)))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        _choice(self.schedule, SCHEDULES, "schedule")
        _choice(self.mixed_precision, MIXED_PRECISION, "mixed_precision")
        _choice(self.ascent_sync, ASCENT_SYNC, "ascent_sync")
        if self.log_with is not None:
            _choice(self.log_with, TRACKERS, "log_with")
        _need(_writable(self.output_dir), f"output_dir {self.output_dir!r} is not writable")
        if self.run_name is not None:
            check_name(self.run_name, "run_name")
        self._check_relations()
        return self

    def _check_relations(self) -> None:
        _need(self.warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        milestones = tuple(self.step_milestones)
        _need(
            all(isinstance(m, (int, float)) and 0 < m < 1 for m in milestones),
            f"step_milestones must be fractions in (0, 1), got {self.step_milestones}",
        )
        self.step_milestones = milestones
        _need(not (self.no_augment and self.cutout), "no_augment and cutout: cutout is an augmentation; choose one")
        _need(
            self.val_fold == 0 or 0 < self.val_fraction and self.val_fold * self.val_fraction < 1 - 1e-9,
            f"val_fold {self.val_fold} needs val_fraction > 0 and val_fold < 1 / val_fraction "
            f"(k-fold: val_fraction 1/k, folds 0 .. k-1), got val_fraction {self.val_fraction}",
        )

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

    @classmethod
    def read(cls, run_dir: str | Path) -> RunConfig:
        """The configuration recorded in a run folder's config.json; one ConfigError line when it is
        missing, unreadable, not JSON, or holds what no configuration holds."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.json there)")
        try:
            values = json.loads(path.read_bytes())
        except OSError as err:
            raise ConfigError(f"{path} cannot be read ({err.strerror or err})") from None
        except ValueError as err:  # JSON and UTF-8 errors
            raise ConfigError(f"{path} is not valid JSON ({err}); the run's files are damaged") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} holds {type(values).__name__}, not a run's settings; the run's files are damaged")
        try:
            return cls.from_dict(values, ignore=RUN_METADATA)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{path}: {err}") from None

    def identity(self) -> dict[str, Any]:
        """The settings that change the result."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL and not added_later_and_unset(k, v)}

    def run_id(self) -> str:
        """Deterministic name from the settings that change the result."""
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        # timm:NAME, hf:OWNER/NAME: no colon or slash in a folder name
        arch, dataset = (re.sub(r"[^A-Za-z0-9_.-]", "-", name) for name in (self.arch, self.dataset))
        return f"{dataset}_{arch}_{self.optimizer}_s{self.seed}_{digest}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or self.run_id())
