"""A sharpness-aware optimizer in Lightning: manual optimisation, one ``training_step`` whose closure runs
forward and ``manual_backward``; the optimizer calls it once per pass (32-bit or bf16-mixed precision)."""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimizers import create_optimizer, steps_with_sgd


class SharpnessAwareModule(L.LightningModule):
    def __init__(self, optimizer_name: str = "sam"):
        super().__init__()
        self.automatic_optimization = False  # the optimizer drives the passes
        self.optimizer_name = optimizer_name
        self.net = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))

    def configure_optimizers(self):
        sgd = {"momentum": 0.9} if steps_with_sgd(self.optimizer_name) else {}  # not AdamW's or bSAM's own rule
        return create_optimizer(self.optimizer_name, self.net, lr=0.1, **sgd)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()

        def closure():
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        loss = opt.step(closure=closure)  # the first pass's loss
        self.log("train_loss", loss, prog_bar=True)
        return loss


def train(optimizer_name: str = "sam", epochs: int = 3) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    data = TensorDataset(x, (x @ torch.randn(20, 4)).argmax(1))  # a learnable toy task
    module = SharpnessAwareModule(optimizer_name)
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    return float(trainer.callback_metrics["train_loss"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sam")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    train(args.optimizer, args.epochs)
