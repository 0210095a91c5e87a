"""Typed run configuration, validated at the boundary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("cosine", "step", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
SAM_SYNC = ("local", "global")


#: Settings that do not change a run's result (left out of its id).
OPERATIONAL = (
    "output_dir", "run_name", "data_dir", "save_every_steps", "save_every_epochs", "keep_checkpoints", "cpu", "sharpness",
    "sharpness_samples", "log_with",
)
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


def _writable(path: str) -> bool:
    """Whether ``path`` is a writable directory or could be created as one (tried, not guessed:
    permission bits say little to root or on read-only mounts)."""
    import tempfile
    from pathlib import Path

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


@dataclass
class RunConfig:
    """Everything a training run depends on. ``hyperparameters`` are the variant's own
    (rho, eta, beta, ...); anything not given takes the variant's paper default."""

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
    sharpness: bool = False
    sharpness_samples: int = 1024
    seed: int = 0
    mixed_precision: str = "no"
    sam_sync: str = "local"
    cpu: bool = False
    grad_accum_steps: int = 1
    max_steps: int | None = None
    max_consecutive_skips: int = 20
    save_every_steps: int = 0
    save_every_epochs: int = 1
    keep_checkpoints: int = 2
    log_with: str | None = None
    output_dir: str = "runs"
    run_name: str | None = None

    def validate(self) -> RunConfig:
        from architectures.registry import resolve as resolve_architecture
        from optimizers import available_optimizers
        from optimizers.registry import canonical_name

        from .data import DataError, available_datasets
        from .data import canonical_name as dataset_name

        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        try:
            self.optimizer = canonical_name(self.optimizer)
        except ValueError:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(available_optimizers())}"
            ) from None
        need(
            self.base_optimizer.lower() in ("sgd", "adamw", "adam"),
            f"unknown base optimizer {self.base_optimizer!r}; choose one of: sgd, adamw, adam",
        )
        self.base_optimizer = self.base_optimizer.lower()
        try:
            self.dataset = dataset_name(self.dataset)
        except DataError:
            raise ConfigError(
                f"unknown dataset {self.dataset!r}; choose one of: {', '.join(available_datasets())}"
            ) from None
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        need(0 <= self.warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        need(all(0 < m < 1 for m in self.step_milestones), f"step_milestones must be fractions in (0, 1), got {self.step_milestones}")
        need(0 < self.step_factor <= 1, f"step_factor must be in (0, 1], got {self.step_factor}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(
            self.mixed_precision in MIXED_PRECISION,
            f"unknown mixed_precision {self.mixed_precision!r}; choose one of: {', '.join(MIXED_PRECISION)}",
        )
        need(self.sam_sync in SAM_SYNC, f"unknown sam_sync {self.sam_sync!r}; choose one of: {', '.join(SAM_SYNC)}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(0 <= self.label_noise < 1, f"label_noise must be in [0, 1), got {self.label_noise}")
        need(self.train_subset is None or self.train_subset >= 1, f"train_subset must be >= 1, got {self.train_subset}")
        need(self.log_with is None or self.log_with in TRACKERS,
             f"unknown log_with {self.log_with!r}; choose one of: {', '.join(TRACKERS)}")
        if self.log_with:
            import importlib.util

            need(importlib.util.find_spec(self.log_with) is not None,
                 f"log_with {self.log_with} needs the {self.log_with} package: pip install {self.log_with}")
        need(self.sharpness_samples >= 1, f"sharpness_samples must be >= 1, got {self.sharpness_samples}")
        need(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        need(self.max_consecutive_skips >= 1, f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        need(self.save_every_steps >= 0, f"save_every_steps must be >= 0 (0: off), got {self.save_every_steps}")
        need(self.save_every_epochs >= 0, f"save_every_epochs must be >= 0 (0: off), got {self.save_every_epochs}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(_writable(self.output_dir), f"output_dir {self.output_dir!r} is not writable")
        try:
            resolve_architecture(self.arch)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.step_milestones = tuple(self.step_milestones)
        self._check_optimizer_settings()
        return self

    def optimizer_settings(self, num_data: int) -> dict[str, Any]:
        """Keyword arguments for ``create_optimizer``: the base optimizer's, then the variant's."""
        from optimizers.bsam import BayesianSAM
        from optimizers.registry import optimizer_class

        if issubclass(optimizer_class(self.optimizer), BayesianSAM):
            return {"lr": self.lr, "num_data": num_data, **self.hyperparameters}
        base = self.optimizer if self.optimizer in ("sgd", "adam", "adamw") else self.base_optimizer
        if base == "sgd":
            settings = dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)
        else:
            settings = dict(lr=self.lr, weight_decay=self.weight_decay)
        return {**settings, **self.hyperparameters}

    def _check_optimizer_settings(self) -> None:
        """Build the optimizer on a stand-in parameter, so a bad hyperparameter fails before any work."""
        import torch

        from optimizers import create_optimizer

        try:
            create_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], base=self.base_optimizer,
                             **self.optimizer_settings(num_data=1))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.optimizer}: {err}") from None

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

    def run_id(self) -> str:
        """Deterministic name from the settings that change the result."""
        identity = {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.dataset}_{self.arch}_{self.optimizer}_s{self.seed}_{digest}"
