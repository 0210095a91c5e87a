"""The native ViT (``vit_tiny_p4`` ...) and the optional timm architectures (``timm:NAME``)."""

import json
import sys

import pytest
import torch
import torch.nn as nn

from architectures import VisionTransformer, create_model
from architectures.registry import resolve
from bench.config import ConfigError, RunConfig
from bench.resolve import resolve as resolve_config
from optimizers import create_optimizer


@pytest.fixture(autouse=True)
def one_thread():
    """Transformers run many small kernels: on a shared CPU, one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_params(name, **kwargs):
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["vit_tiny_p4", "vit_small_p4", "vit_tiny_p2"])
@pytest.mark.parametrize("in_channels, size", [(1, 8), (3, 32), (3, 13), (3, 64)])
def test_forward_shapes(name, in_channels, size):
    model = create_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("vit_tiny_p4", {}, 307_914),
        ("vit_tiny_p4", {"in_channels": 1}, 305_866),
        ("vit_tiny_p4", {"pool": "cls"}, 307_978),
        ("vit_tiny_p4", {"image_size": 8}, 304_074),  # a 2x2 position table instead of 8x8
        ("vit_small_p4", {}, 1_205_642),
    ],
)
def test_parameter_counts(name, kwargs, expected):
    assert num_params(name, **kwargs) == expected


def test_pattern_names_fix_the_size():
    model = create_model("ViT_Tiny_P2")
    assert isinstance(model, VisionTransformer)
    assert model.patch_size == 2 and model.grid == 16 and model.head.in_features == 64
    assert create_model("vit_small_p4").head.in_features == 128
    assert num_params("vit_tiny_p4") < 400_000


def test_position_table_is_resized_to_the_input_grid_and_trained_everywhere():
    model = create_model("vit_tiny_p4", in_channels=1)
    assert model.pos_embed.shape == (1, 64, 8, 8)  # made for 32x32, before any forward
    assert model.position_embedding(8, 8) is model.pos_embed
    assert model.position_embedding(2, 3).shape == (1, 64, 2, 3)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert (model.pos_embed.grad.abs().sum(dim=(0, 1)) > 0).all()  # every cell of the 8x8 table learns from a 2x2 grid


def test_hessian_vector_product_works():
    """The sharpness measures differentiate twice through attention and the resized position table."""
    model = create_model("vit_tiny_p4", in_channels=1)
    params = list(model.parameters())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)
    assert all(torch.isfinite(h).all() for h in hv)
    assert hv[0].abs().sum() > 0  # pos_embed


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("vit_tiny_p4", {"dim": 32}, "the name fixes dim=64, depth=6, heads=4, patch_size=4"),
        ("vit_tiny_p0", {}, "patch_size must be a positive integer"),
        ("vit_tiny_p4", {"pool": "max"}, "pool must be one of gap, cls"),
        ("vit_tiny_p4", {"dropout": 1.0}, "dropout must be in [0, 1)"),
    ],
)
def test_bad_arguments_give_one_line_value_error(name, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        create_model(name, **kwargs)
    assert "\n" not in str(info.value) and fragment in str(info.value)
    with pytest.raises(ValueError, match="dim must be a multiple of heads"):
        VisionTransformer(dim=30, heads=4)


def test_sam_through_the_harness_lowers_the_loss(tmp_path):
    from bench.loop.train import train

    config = RunConfig(
        arch="vit_tiny_p4", optimizer="sam", epochs=2, batch_size=64, cpu=True, threads=1, output_dir=str(tmp_path)
    )
    result = train(config)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train_loss"] for row in rows if row.get("train_loss") is not None]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[1] < losses[0] - 0.02, losses
    assert result.summary["num_params"] == 305_866


# -- timm (optional extra) ------------------------------------------------------------------------


def test_missing_timm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    line = '--arch timm:vit_tiny_patch16_224 needs timm: pip install -e ".[timm]"'
    for call in (lambda: resolve("timm:vit_tiny_patch16_224"), lambda: create_model("timm:vit_tiny_patch16_224")):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == line
    with pytest.raises(ConfigError) as info:
        resolve_config(RunConfig(arch="timm:vit_tiny_patch16_224", cpu=True))
    assert line in str(info.value) and "\n" not in str(info.value)


def test_timm_names_resolve_and_unknown_names_fail_in_one_line():
    pytest.importorskip("timm")
    from architectures import TimmModel

    assert resolve("timm:vit_tiny_patch16_224") == (TimmModel, {"model_name": "vit_tiny_patch16_224"})
    assert resolve_config(RunConfig(arch="timm:resnet10t", cpu=True)).arch == "timm:resnet10t"
    with pytest.raises(ValueError) as info:
        resolve("timm:vit_tiny_patch16")
    message = str(info.value)
    assert "\n" not in message and message.startswith("unknown timm architecture 'vit_tiny_patch16'")
    assert "vit_tiny_patch16_224" in message  # a close match is suggested
    with pytest.raises(ValueError, match="needs a timm model name"):
        resolve("timm:")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        create_model("timm:test_vit", image_size=0)


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        ("vit_tiny_patch16_224", {}, (224, 224)),  # the size from the model's pretrained_cfg
        ("test_vit", {}, (160, 160)),
        ("resnet10t", {"image_size": 64}, (64, 64)),  # an explicit size, cheaper on CPU
    ],
)
def test_timm_model_trains_with_sam_on_small_images(name, kwargs, size):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=10, in_channels=3, **kwargs)
    assert model.image_size == size
    assert model(torch.randn(2, 1 + 2, 8, 8)).shape == (2, 10)  # any input size
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    optimizer = create_optimizer("sam", model, base="adamw", lr=1e-3, rho=0.05)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    losses = [float(optimizer.step(closure).detach()) for _ in range(2)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert losses[1] < losses[0], losses


def test_timm_attention_is_differentiable_twice():
    """--sharpness needs Hessian-vector products; the fused attention kernels have no double backward."""
    pytest.importorskip("timm")
    model = create_model("timm:test_vit", num_classes=10)
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert any(m.fused_attn for m in create_model("timm:test_vit", fused_attention=True).modules() if hasattr(m, "fused_attn"))
    params = list(model.parameters())
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * g).sum() for g in grads), params, allow_unused=True)
    assert all(torch.isfinite(h).all() for h in hv if h is not None)
