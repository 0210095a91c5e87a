"""Sharpness measures against a quadratic with a known Hessian."""

import pytest
import torch
from torch import nn

from bench.sharpness import measure_sharpness

EIGENVALUES = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)


class Quadratic(nn.Module):
    """Its loss is 0.5 w^T A w whatever the batch."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(EIGENVALUES) @ q.T)
        self.w = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))

    def forward(self, x):
        return (0.5 * self.w @ self.A @ self.w).expand(len(x))


def quadratic_loss(outputs, targets):
    return outputs.mean()


def test_quadratic_with_known_hessian():
    model = Quadratic()
    batches = [(torch.zeros(4, 1), torch.zeros(4))]
    rho = 0.05
    result = measure_sharpness(model, quadratic_loss, batches, rho=rho, power_iterations=200, hutchinson_samples=2000)
    w, A = model.w.detach(), model.A
    g = A @ w
    assert result["loss"] == pytest.approx((0.5 * w @ A @ w).item(), rel=1e-12)
    assert result["hessian_max_eigenvalue"] == pytest.approx(5.0, rel=1e-6)
    assert result["hessian_trace"] == pytest.approx(EIGENVALUES.sum().item(), rel=0.05)
    exact = rho * g.norm() + 0.5 * rho**2 * (g @ A @ g) / (g @ g)
    assert result["sam_sharpness"] == pytest.approx(exact.item(), rel=1e-10)


def test_weights_mode_and_batchnorm_are_left_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    model(torch.randn(32, 1, 4, 4))  # some running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    result = measure_sharpness(model, nn.functional.cross_entropy, batches, power_iterations=5, hutchinson_samples=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result["hessian_max_eigenvalue"] > 0 and result["sam_sharpness"] > 0


def test_several_batches_equal_their_union():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    split = measure_sharpness(model, nn.functional.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])])
    whole = measure_sharpness(model, nn.functional.cross_entropy, [(x, y)])
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-9), key
