"""Sharded models: FSDP2 through Accelerate's FSDP plugin.

Under FSDP every process holds a shard of each parameter (a DTensor), of its gradient and of
the optimizer's state kept per parameter. The sharpness-aware optimizers work on them as they
are (``optimizers.base``: norms, inner products and copies reach over every shard); this module
is the harness's side:

- :func:`fsdp_plugin`: whether the launch shards the model, with which settings. On GPUs that
  is Accelerate's own FSDP plugin (``distributed_type: FSDP`` in the launch config). On CPU
  processes Accelerate 1.15 ignores the plugin and runs DDP instead; the harness then builds
  the same plugin from the launch's settings and shards the model itself, with Accelerate's
  own FSDP2 preparation (:func:`shard_model`);
- :func:`check_sharded_run`: the combinations that cannot run sharded, one line each;
- checkpoints and the exported model hold full, unsharded state, gathered tensor by tensor
  and written by process 0 in the files an unsharded run writes (:class:`FullOptimizerState`,
  :func:`register_model_checkpointing`, :func:`full_model_state`), so a checkpoint resumes
  under any sharding and ``model.safetensors`` loads into the plain model.

The model is sharded before the optimizer is built, so the optimizer holds the sharded
parameters (``fully_shard`` replaces every parameter by a DTensor).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, fsdp2_prepare_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.modules.batchnorm import _BatchNorm

from bench.config import ConfigError
from bench.loop.checkpoint import MODEL_FILE
from bench.loop.step import effective_ascent_sync
from optimizers.base import SharpnessAwareOptimizer
from optimizers.tensors import is_sharded, shard_like


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(accelerator, mixed_precision: str = "no") -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings of this launch, or None when it does not shard the model."""
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif fsdp_requested():
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("FSDP needs several processes: launch with --num_processes 2 or more")
        if dist.get_world_size() != accelerator.num_processes:  # every process would think it is process 0
            raise ConfigError(
                f"Accelerate sees {accelerator.num_processes} of the launch's {dist.get_world_size()} "
                "processes: FSDP on CPU processes needs --cpu (or ACCELERATE_USE_CPU=1)"
            )
        # CPU processes: Accelerate left the run as DDP; the same plugin, from the launch's FSDP_* settings
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.fsdp_plugin = plugin  # where Accelerate's FSDP2 preparation reads it
    else:
        return None
    if plugin.fsdp_version != 2:
        raise ConfigError(
            "the harness shards with FSDP2 only (fsdp_version: 2 in the launch config): FSDP1's shards are flat "
            "pieces of tensors, on which per-tensor quantities (norms, filters) cannot be formed"
        )
    return plugin


def shard_model(accelerator, model: nn.Module, plugin: FullyShardedDataParallelPlugin) -> nn.Module:
    """Shard ``model`` in place with Accelerate's FSDP2 preparation and the plugin's wrap policy."""
    # Loading on rank 0 only is for pretrained weights; every process builds this model from the
    # seed, and Accelerate 1.15's rank-0 loading fails on models with buffers (BatchNorm statistics).
    plugin.cpu_ram_efficient_loading = False
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.param_dtype not in (None, torch.float32):
        # BatchNorm in a low-precision policy would meet its float32 running statistics: each
        # BatchNorm layer is a unit of its own that computes in float32 on inputs cast to it
        full = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mp_policy=full, reshard_after_forward=plugin.reshard_after_forward)
    return fsdp2_prepare_model(accelerator, model)


def check_sharded_run(name: str, optimizer, requested: str) -> None:
    """Refuse, in one line, what a sharded model cannot do (called with the optimizer built and the
    run's requested ``ascent_sync``)."""
    reason = getattr(type(optimizer), "sharding_unsupported", "")
    if reason:
        raise ConfigError(f"{name} cannot train a sharded model (FSDP): {reason}")
    if isinstance(optimizer, SharpnessAwareOptimizer) and effective_ascent_sync(optimizer, requested) != "global":
        if getattr(type(optimizer), "ascent_sync", "any") == "local":
            raise ConfigError(
                f"{name} cannot train a sharded model (FSDP): its ascent gradient must stay per process "
                "(ascent_sync 'local'), and FSDP reduce-scatters every gradient"
            )
        raise ConfigError(
            "--ascent_sync local cannot be honoured under FSDP, which reduce-scatters every gradient "
            "(the ascent gradient is the whole batch's): use --ascent_sync global"
        )


# -- full state, gathered and scattered ------------------------------------------------------------


def _gathered(value: Any, keep: bool) -> Any:
    """``value`` with every sharded tensor replaced by the whole tensor on the CPU (``keep``) or by
    None (every process takes part in each gather, one tensor at a time; only the writer keeps it)."""
    if is_sharded(value):
        whole = value.full_tensor()
        return whole.cpu() if keep else None
    if isinstance(value, dict):
        return {k: _gathered(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_gathered(v, keep) for v in value)
    return value


class FullOptimizerState:
    """A sharded optimizer in checkpoints: ``state_dict`` is the state an unsharded run saves
    (gathered; whole on process 0, which writes it), ``load_state_dict`` takes such a state and
    keeps each process's shard of every per-parameter tensor shaped like its parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer, is_writer: bool):
        self.optimizer, self.is_writer = optimizer, is_writer

    def state_dict(self) -> dict[str, Any]:
        return _gathered(self.optimizer.state_dict(), self.is_writer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        for opt in (self.optimizer, getattr(self.optimizer, "base_optimizer", None)):
            if opt is None:
                continue
            for group in opt.param_groups:
                for p in group["params"]:
                    per_param = opt.state.get(p) if is_sharded(p) else None
                    for key, value in (per_param or {}).items():
                        if isinstance(value, Tensor) and not is_sharded(value) and value.shape == p.shape:
                            per_param[key] = shard_like(value, p)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on the CPU of process 0 (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an unsharded state dict (on every process) into the sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def register_model_checkpointing(accelerator, model: nn.Module) -> None:
    """Checkpoints hold the model as an unsharded run's do: ``model.safetensors``, written by process 0."""

    def save(models, weights, output_dir):
        state = full_model_state(model)
        if accelerator.is_main_process:
            save_file(state, str(Path(output_dir) / MODEL_FILE))

    def load(models, input_dir):
        load_full_model_state(model, load_file(str(Path(input_dir) / MODEL_FILE)))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
