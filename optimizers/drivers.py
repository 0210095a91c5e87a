"""What a wrapper that steps the optimizer for its user cannot do with a sharpness-aware step, refused in one
line before the step changes anything (a pre-hook on every variant's ``step``).

- ``torch.amp.GradScaler.step`` (directly, or through Accelerate's prepared optimizer under fp16, or a
  framework's 16-bit plugin) unscales the gradients once and calls ``step`` after the passes; a
  sharpness-aware step reads the gradient of each of its passes, so each must be unscaled on its own:
  :class:`optimizers.amp.ScaledStep` does that with the same scaler.
- Accelerate's gradient accumulation (``Accelerator(gradient_accumulation_steps=N)`` with
  ``accelerator.accumulate``) lets the prepared optimizer step on the last micro-batch alone, so a closure
  step would compute each pass on that micro-batch: :class:`optimizers.BatchClosure` with
  ``accumulation_steps=N`` runs every pass over all N micro-batches instead.
"""

from __future__ import annotations

import sys

SCALER = (
    "a GradScaler cannot step {name}: it unscales the gradients once, and a sharpness-aware step reads every "
    "pass's gradient; drive it with optimizers.amp.ScaledStep(optimizer, scaler, model) (with Accelerate: "
    "ScaledStep(optimizer, accelerator.scaler, model))"
)
ACCUMULATION = (
    "Accelerate's gradient accumulation ({steps} steps) steps {name} on the last micro-batch alone; set "
    "gradient_accumulation_steps=1 and pass the micro-batches to the step with "
    "optimizers.BatchClosure(..., accumulation_steps={steps}), which runs every pass over all of them"
)


def accelerate_accumulation_steps() -> int:
    """The gradient accumulation steps of the Accelerator in this process (1 when none was made)."""
    state = sys.modules.get("accelerate.state")  # never imported here: only a loop that made an Accelerator has one
    if state is None or not state.is_initialized():
        return 1
    return int(state.GradientState().num_steps)


def refuse_unsupported_driver(optimizer, args, kwargs) -> None:
    """``Optimizer.register_step_pre_hook`` hook: raise one line for a driver the step cannot honour."""
    name = type(optimizer).__name__
    if hasattr(optimizer, "found_inf"):  # GradScaler.step sets it on an optimizer that scales its own step
        for attribute in ("found_inf", "grad_scale"):  # as GradScaler.step would after a step
            optimizer.__dict__.pop(attribute, None)
        raise RuntimeError(SCALER.format(name=name))
    steps = accelerate_accumulation_steps()
    if steps > 1:
        raise RuntimeError(ACCUMULATION.format(name=name, steps=steps))
