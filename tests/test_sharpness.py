"""Sharpness measures: against a quadratic with a known Hessian, and the harness guarantees
(weights, mode and BatchNorm statistics restored; several batches equal their union)."""

import math

import pytest
import torch
from torch import nn

from bench.loop.sharpness import measure_sharpness

EIGENVALUES = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)


class Quadratic(nn.Module):
    """Its "loss" is 0.5 w^T A w whatever the batch: forward returns it once per sample."""

    def __init__(self, A: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (0.5 * self.w @ self.A @ self.w).expand(len(x))


def quadratic_loss(outputs, targets):
    return outputs.mean()


def rotated_quadratic() -> Quadratic:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    return Quadratic(q @ torch.diag(EIGENVALUES) @ q.T, torch.randn(6, generator=g, dtype=torch.float64))


def hutchinson_std(A: torch.Tensor, samples: int) -> float:
    """Standard deviation of the Rademacher Hutchinson mean: Var(z^T A z) = 2 sum_{i != j} A_ij^2."""
    off_diagonal = A - torch.diag(torch.diag(A))
    return math.sqrt(2 * (off_diagonal**2).sum().item() / samples)


BATCH = [(torch.zeros(4, 1), torch.zeros(4))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add contention (seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quadratic_with_known_hessian():
    model = rotated_quadratic()
    rho, samples = 0.05, 2000
    result = measure_sharpness(model, quadratic_loss, BATCH, rho=rho, power_iterations=200, hutchinson_samples=samples)
    w, A = model.w.detach(), model.A
    g = A @ w
    assert result["loss"] == pytest.approx((0.5 * w @ A @ w).item(), rel=1e-12)
    assert result["hessian_max_eigenvalue"] == pytest.approx(5.0, rel=1e-6)
    # Unbiased: within 5 standard deviations of the exact trace (about 2% here).
    assert abs(result["hessian_trace"] - EIGENVALUES.sum().item()) < 5 * hutchinson_std(A, samples)
    exact = rho * g.norm() + 0.5 * rho**2 * (g @ A @ g) / (g @ g)
    assert result["sam_sharpness"] == pytest.approx(exact.item(), rel=1e-10)


def test_a_dominant_negative_eigenvalue_still_gives_the_largest_one():
    """Near a saddle the eigenvalue largest in magnitude is negative (-8 here): the measure is lambda_max (3)."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2, -2.0, -8.0], dtype=torch.float64)) @ q.T
    model = Quadratic(A, torch.randn(6, generator=g, dtype=torch.float64))
    result = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=200, hutchinson_samples=0)
    assert result["hessian_max_eigenvalue"] == pytest.approx(3.0, rel=1e-6)
    assert result["hessian_eigenvalue_residual"] < 1e-6  # the shifted iteration's vector is an eigenvector of H


def test_the_residual_says_how_far_the_estimate_is_from_converged():
    """||H v - lambda v|| / |lambda| of the last vector: the exact value for a hand-made v, near 0 once converged,
    large after too few iterations where the top two eigenvalues are close; some eigenvalue lies within it."""
    A = torch.diag(torch.tensor([5.0, 4.9, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64))
    model = Quadratic(A, torch.ones(6, dtype=torch.float64))
    few = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=3, hutchinson_samples=0)
    many = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=2000, hutchinson_samples=0)
    assert many["hessian_max_eigenvalue"] == pytest.approx(5.0, rel=1e-9) and many["hessian_eigenvalue_residual"] < 1e-8
    assert few["hessian_eigenvalue_residual"] > 1e-2
    eigenvalue, residual = few["hessian_max_eigenvalue"], few["hessian_eigenvalue_residual"] * abs(few["hessian_max_eigenvalue"])
    assert min(abs(torch.diag(A) - eigenvalue)).item() <= residual + 1e-12
    # one iteration from v0: v = v0/|v0|, lambda = v.Av, residual |Av - lambda v| / |lambda|, by hand
    v0 = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v0 / v0.norm()
    lam = v @ A @ v
    one = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=1, hutchinson_samples=0, seed=0)
    assert one["hessian_max_eigenvalue"] == pytest.approx(lam.item(), rel=1e-12)
    assert one["hessian_eigenvalue_residual"] == pytest.approx(((A @ v - lam * v).norm() / lam.abs()).item(), rel=1e-10)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    model = Quadratic(torch.diag(EIGENVALUES), torch.ones(6, dtype=torch.float64))
    result = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=0, hutchinson_samples=3)
    assert result["hessian_trace"] == pytest.approx(EIGENVALUES.sum().item(), rel=1e-12)
    assert math.isnan(result["hessian_max_eigenvalue"])


def test_no_samples_gives_nan_and_no_grad_context_is_fine():
    model = rotated_quadratic()
    with torch.no_grad():
        result = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=100, hutchinson_samples=0)
    assert math.isnan(result["hessian_trace"])
    assert result["hessian_max_eigenvalue"] == pytest.approx(5.0, rel=1e-6)
    assert result["sam_sharpness"] > 0


def test_zero_gradient_and_zero_hessian_give_zeros():
    model = Quadratic(torch.zeros(6, 6, dtype=torch.float64), torch.ones(6, dtype=torch.float64))
    result = measure_sharpness(model, quadratic_loss, BATCH, power_iterations=3, hutchinson_samples=2)
    residual = result.pop("hessian_eigenvalue_residual")
    assert result == {"hessian_max_eigenvalue": 0.0, "hessian_trace": 0.0, "sam_sharpness": 0.0, "loss": 0.0}
    assert math.isnan(residual)  # no eigenvalue to measure it against


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    model(torch.randn(32, 1, 4, 4))  # some running statistics
    return model


@pytest.mark.parametrize("training", [True, False])
def test_weights_mode_and_batchnorm_are_left_as_they_were(training):
    model = batchnorm_model().train(training)
    model[1].weight.requires_grad_(False)  # frozen parameters are left out of the Hessian
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    rng_state = torch.get_rng_state()
    result = measure_sharpness(model, nn.functional.cross_entropy, batches, power_iterations=5, hutchinson_samples=3)
    assert model.training == training and all(m.training == training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert result["hessian_max_eigenvalue"] > 0 and result["sam_sharpness"] > 0
    assert all(math.isfinite(v) for v in result.values())
    # BatchNorm in eval mode: the loss is that of the model in eval mode.
    with torch.no_grad():
        eval_loss = sum(nn.functional.cross_entropy(model.eval()(x), y) for x, y in batches) / 2
    assert result["loss"] == pytest.approx(eval_loss.item(), rel=1e-6)


def test_several_batches_equal_their_union():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    kwargs = dict(power_iterations=8, hutchinson_samples=4, seed=3)
    split = measure_sharpness(model, nn.functional.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])], **kwargs)
    whole = measure_sharpness(model, nn.functional.cross_entropy, [(x, y)], **kwargs)
    assert (
        split.keys()
        == whole.keys()
        == {
            "hessian_max_eigenvalue",
            "hessian_eigenvalue_residual",
            "hessian_trace",
            "sam_sharpness",
            "loss",
        }
    )
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-9), key
