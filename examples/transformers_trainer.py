"""A sharpness-aware optimizer in a Transformers ``Trainer``: ``training_step`` runs the variant's passes
(``perturb()`` between them; Lookbehind-SAM's inner steps on the batch) and the Trainer's ``optimizer.step()``
takes the descent, clipped to the Trainer's ``max_grad_norm`` by the optimizer."""

import argparse
import copy
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from optimizers import SharpnessAwareOptimizer, create_optimizer, optimizer_class, steps_with_sgd


class SharpnessAwareTrainer(Trainer):
    def __init__(self, *args, optimizer_name: str = "sam", **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps > 1:  # each micro-batch would perturb again
            raise ValueError("SharpnessAwareTrainer needs gradient_accumulation_steps=1")
        self.optimizer_name, self.variant_class = optimizer_name, optimizer_class(optimizer_name)
        self.descent_max_grad_norm = None
        if getattr(self.variant_class, "clips_descent", False) and self.args.max_grad_norm:
            # The Trainer clips the gradient it finds after training_step, the second pass's at w + e; the variant
            # forms its descent gradient in step() (GSAM, SAGM, WSAM from both passes) and clips that one instead.
            self.descent_max_grad_norm = self.args.max_grad_norm
            self.args = copy.copy(self.args)  # the caller's arguments stay as they were
            self.args.max_grad_norm = 0.0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            settings = {"lr": self.args.learning_rate}
            if steps_with_sgd(self.optimizer_name):  # not AdamW's, nor a variant's own update rule
                settings["momentum"] = 0.9
            if self.descent_max_grad_norm is not None:
                settings["max_grad_norm"] = self.descent_max_grad_norm
            self.variant = create_optimizer(self.optimizer_name, self.model, **settings)
            self.optimizer = self.variant
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not isinstance(self.variant, SharpnessAwareOptimizer):  # a baseline: the Trainer's own step
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        loss = self.passes(model, inputs)
        while self.variant.descents_left > 1:  # Lookbehind-SAM: its k inner steps, all on this batch
            self.variant.descend()
            self.passes(model, inputs)
        return loss  # the Trainer's optimizer.step() then takes the (last) descent

    def passes(self, model, inputs):
        """One pass at w, then one after each perturbation (to w + e; GAM's three); the first pass's loss."""
        loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss)
        if self.variant.perturbs_this_step:
            for _ in range(self.variant.perturbations):
                self.variant.perturb()
                self.accelerator.backward(self.compute_loss(model, inputs))
        return loss.detach()


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def train(optimizer_name: str = "sam", epochs: int = 3) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    labels = (x @ torch.randn(20, 4)).argmax(1)  # a learnable toy task
    data = [{"x": x[i], "labels": labels[i]} for i in range(len(x))]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, num_train_epochs=epochs, per_device_train_batch_size=64, learning_rate=0.1, max_grad_norm=1.0,
            lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=8, use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        trainer = SharpnessAwareTrainer(model=Classifier(), args=args, train_dataset=data, optimizer_name=optimizer_name)
        result = trainer.train()
    return result.training_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sam")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    train(args.optimizer, args.epochs)
