"""A sharpness-aware optimizer in an Accelerate loop: prepared with the model and the data, one closure per
step whose backward is ``accelerator.backward``; under fp16 the accelerator's scaler drives the step through
``ScaledStep``. Runs as it is on one process or many (``accelerate launch examples/accelerate_loop.py``).

Several CPU processes (gloo) can abort at interpreter exit, after the training is done and printed: a gloo
worker thread still freeing a finished collective's tensors needs the interpreter's lock during its teardown
("terminate called without an active exception"). The harness's ``launch.py`` leaves such a process with
``os._exit`` once every result is written (``bench.cli.main.exit_with``); this loop's test does the same."""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimizers import create_optimizer, steps_with_sgd
from optimizers.amp import ScaledStep


def train(optimizer_name: str = "sam", epochs: int = 3, mixed_precision: str = "no") -> float:
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    data = TensorDataset(x, (x @ torch.randn(20, 4)).argmax(1))  # a learnable toy task
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    sgd = {"momentum": 0.9} if steps_with_sgd(optimizer_name) else {}  # not AdamW's or bSAM's own update rule
    opt = create_optimizer(optimizer_name, model, lr=0.1, **sgd)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(data, batch_size=64, shuffle=True))
    amp = ScaledStep(opt, accelerator.scaler, model) if accelerator.scaler is not None else None
    for epoch in range(epochs):
        for x, y in loader:

            def loss_fn():  # forward only
                with accelerator.autocast():
                    return F.cross_entropy(model(x), y)

            def closure():  # forward and backward: the optimizer calls it once per pass
                loss = loss_fn()
                accelerator.backward(loss)
                return loss

            if amp is None:
                opt.step(closure)
            else:
                amp.step(loss_fn)  # every pass scaled and unscaled; an overflowing step is skipped
        with torch.no_grad():
            loss = accelerator.gather(F.cross_entropy(model(x), y)).mean().item()
        accelerator.print(f"epoch {epoch}: training loss {loss:.4f}")
    accelerator.wait_for_everyone()  # every process leaves together
    accelerator.end_training()
    return loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sam")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args()
    train(args.optimizer, args.epochs, args.mixed_precision)
