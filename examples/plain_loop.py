"""A sharpness-aware optimizer in a plain PyTorch loop, with mixed precision (``torch.amp.GradScaler`` through
``ScaledStep``) and gradient clipping (``max_grad_norm``: the descent gradient, by global norm)."""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimizers import create_optimizer, optimizer_class, steps_with_sgd
from optimizers.amp import ScaledStep


def train(optimizer_name: str = "sam", epochs: int = 3, device: str | None = None) -> float:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    half = torch.float16 if device.type == "cuda" else torch.bfloat16  # fp16 needs the scaler; bf16 does not
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    data = TensorDataset(x, (x @ torch.randn(20, 4)).argmax(1))  # a learnable toy task
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    settings = {"lr": 0.1, **({"momentum": 0.9} if steps_with_sgd(optimizer_name) else {})}  # not AdamW's, bSAM's
    if getattr(optimizer_class(optimizer_name), "clips_descent", False):  # a variant clips its descent gradient
        settings["max_grad_norm"] = 1.0
    opt = create_optimizer(optimizer_name, model, **settings)
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    amp = ScaledStep(opt, scaler, model)
    loss = torch.tensor(float("nan"))  # the last step taken's loss
    for epoch in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            x, y = x.to(device), y.to(device)

            def loss_fn():  # forward only: ScaledStep runs each pass's scaled backward
                with torch.autocast(device.type, dtype=half):
                    return F.cross_entropy(model(x), y)

            taken = amp.step(loss_fn)  # None when a pass overflowed: the step was skipped, the scale backed off
            loss = loss if taken is None else taken
        print(f"epoch {epoch}: training loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sam")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    train(args.optimizer, args.epochs, args.device)
