"""The bare PyTorch loops ``perf --harness`` times the harness's step against: SGD, and SAM written out.

A bare loop runs on a copy of the harness run's model (seeded alike) and its batch: ``zero_grad``, forward,
``cross_entropy``, ``backward``, the update, ``scheduler.step``, with nothing else around them.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.config import RunConfig
from bench.studies.contender import Contender


def _bare_loop(arch_config: RunConfig, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """A bare loop's model (a copy of the harness's, seeded alike), its parameters, SGD, a constant schedule,
    and its forward-backward pass on the batch."""
    from architectures import create_model

    torch.manual_seed(arch_config.seed)
    model = create_model(arch_config.arch, num_classes=10, in_channels=3).to(device).train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=arch_config.lr, momentum=arch_config.momentum, weight_decay=arch_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    bf16 = arch_config.mixed_precision == "bf16"

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()

    return params, opt, scheduler, forward_backward


def bare_sgd(arch_config: RunConfig, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Contender:
    _, opt, scheduler, forward_backward = _bare_loop(arch_config, x, y, device)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward()
        opt.step()
        scheduler.step()

    return Contender("bare PyTorch loop (SGD)", step, forward_backward=forward_backward)


def bare_sam(arch_config: RunConfig, x: torch.Tensor, y: torch.Tensor, device: torch.device, rho: float) -> Contender:
    """SAM written out in a bare loop (Foret et al.'s two passes, as the reference code takes them): e = rho g / ||g||,
    the second pass at w + e, w restored by subtracting e, SGD's step: the work a SAM step cannot avoid."""
    params, opt, scheduler, forward_backward = _bare_loop(arch_config, x, y, device)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward()
        with torch.no_grad():
            grads = [p.grad for p in params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            e = torch._foreach_mul(grads, rho / (norm + 1e-12))
            torch._foreach_add_(params, e)
        opt.zero_grad(set_to_none=True)
        forward_backward()
        with torch.no_grad():
            torch._foreach_sub_(params, e)
        opt.step()
        scheduler.step()

    return Contender("bare PyTorch loop (SAM)", step, forward_backward=forward_backward, last_passes=lambda: 2.0)
