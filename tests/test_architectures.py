import pytest
import torch
import torch.nn as nn

from architectures import available_architectures, create_model

EXPLICIT_NAMES = [
    "fastnet",
    "mlp",
    "pyramidnet",
    "pyramidnet110_270",
    "pyramidnet272_200",
    "resnet101",
    "resnet110",
    "resnet14",
    "resnet152",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet8",
    "smallcnn",
    "wideresnet28",
    "wideresnet34",
    "wrn16_8",
    "wrn28_10",
    "wrn34_10",
]


def num_params(name, **kwargs):
    with torch.device("meta"):  # no memory, no init cost
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_available_architectures_is_sorted_and_complete():
    names = available_architectures()
    assert names == sorted(names)
    assert names == sorted(EXPLICIT_NAMES)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("resnet50", 23_520_842),
        ("resnet101", 42_512_970),
        ("resnet152", 58_156_618),
        ("wrn28_10", 36_479_194),
        ("wideresnet28", 36_479_194),
    ],
)
def test_exact_parameter_counts(name, expected):
    assert num_params(name) == expected


@pytest.mark.parametrize(
    "name, num_classes, published, rel_tol",
    [
        # He et al. CIFAR ResNets (option-A figures; option B adds 1x1 projections)
        ("resnet20", 10, 0.27e6, 0.03),
        ("resnet32", 10, 0.46e6, 0.03),
        ("resnet56", 10, 0.85e6, 0.03),
        ("resnet110", 10, 1.7e6, 0.03),
        ("wrn16_8", 10, 11.0e6, 0.005),
        ("wrn34_10", 10, 46.2e6, 0.005),
        # the SAM code's WRN-28-10: 36,479,194 less the three 1x1 shortcuts (16x160 + 160x320 + 320x640)
        ("wrn28_10_sam", 10, 36_220_634, 1e-9),
        # davda54/sam's "WideResNet(16, 8)": 3 blocks a stage, the WRN-22-8 layout (its own code gives 17,158,106)
        ("wrn22_8", 10, 17_158_106, 1e-9),
        # The official PyramidNet code gives 28.51M / 26.29M; the paper reports 28.3M / 26.0M.
        ("pyramidnet110_270", 100, 28.3e6, 0.015),
        ("pyramidnet272_200", 100, 26.0e6, 0.015),
    ],
)
def test_parameter_counts_match_published(name, num_classes, published, rel_tol):
    assert num_params(name, num_classes=num_classes) == pytest.approx(published, rel=rel_tol)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pyramidnet110_270", 28_511_307),
        ("pyramidnet272_200", 26_288_692),
        ("resnet20", 272_474),
    ],
)
def test_parameter_count_regressions(name, expected):
    num_classes = 100 if name.startswith("pyramidnet") else 10
    assert num_params(name, num_classes=num_classes) == expected


def test_smallcnn_is_small():
    assert num_params("smallcnn") < 100_000


@pytest.mark.parametrize("name", [n for n in EXPLICIT_NAMES if n != "fastnet"])  # fastnet: 32x32 and up
def test_forward_8x8_every_registered_name(name):
    model = create_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, in_channels",
    [
        ("resnet18", 1),
        ("smallcnn", 3),
        ("resnet20", 3),
        ("wrn16_2", 3),
        ("pyramidnet20_48", 3),
        ("pyramidnet164_12", 1),
    ],
)
@pytest.mark.parametrize("size", [8, 13, 32, 64])
def test_forward_various_sizes(name, in_channels, size):
    model = create_model(name, num_classes=5, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 5)


def test_lookup_is_case_insensitive():
    assert isinstance(create_model("ResNet18"), type(create_model("resnet18")))
    assert num_params("ResNet18") == num_params("resnet18")
    assert num_params("WRN16_2") == num_params("wrn16_2")


def test_unknown_name_error_is_one_line_listing_choices():
    with pytest.raises(ValueError) as info:
        create_model("xyz")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown architecture 'xyz'; choose one of: ")
    assert all(name in message for name in EXPLICIT_NAMES)
    assert "wrn{depth}_{widen_factor}" in message and "pyramidnet{depth}_{alpha}" in message


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("resnet18", {"foo": 1}, "valid keyword arguments: num_classes, in_channels"),
        ("resnet18", {"depth": 34}, "the name fixes depth=18"),
        ("wrn28_10", {"widen_factor": 2}, "valid keyword arguments: dropout"),
        ("resnet20", {"widen_factor": 2}, "valid keyword arguments: width"),
        ("wrn30_10", {}, "6n+4"),
        ("wideresnet28", {"dropout": 1.0}, "dropout must be in [0, 1)"),
        ("resnet20", {"width": 0}, "width must be a positive integer"),
        ("pyramidnet", {"depth": 111}, "6n+2"),
        ("pyramidnet", {"depth": 200, "bottleneck": True, "alpha": -1}, "alpha must be >= 0"),
        ("pyramidnet100_48", {"bottleneck": True}, "9n+2"),
        ("pyramidnet165_48", {}, "9n+2"),
    ],
)
def test_bad_arguments_give_one_line_value_error(name, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        create_model(name, **kwargs)
    assert "\n" not in str(info.value)
    assert fragment in str(info.value)


def test_resnet_family_rejects_unknown_depth():
    from architectures import CifarResNet, ResNet

    with pytest.raises(ValueError, match=r"\[18, 34, 50, 101, 152\]"):
        ResNet(depth=20)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=18)


def test_wideresnet_widen_factor_kwarg_equals_pattern():
    assert num_params("wideresnet28", widen_factor=2) == num_params("wrn28_2")
    assert num_params("wideresnet34") == num_params("wrn34_10")


def test_wideresnet_dropout_kwarg():
    model = create_model("wrn16_2", dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_cifar_resnet_width_multiplier():
    model = create_model("resnet20", width=2)
    assert model.fc.in_features == 128
    assert num_params("resnet20", width=2) > 3.5 * num_params("resnet20")


def test_pyramidnet_defaults_and_block_rule():
    assert num_params("pyramidnet") == num_params("pyramidnet110_270")
    assert create_model("pyramidnet").fc.in_features == 16 + 270
    assert create_model("pyramidnet272_200").fc.in_features == (16 + 200) * 4  # bottleneck
    assert create_model("pyramidnet164_48").fc.in_features == (16 + 48) * 4  # depth >= 164
    assert create_model("pyramidnet164_48", bottleneck=False).fc.in_features == 16 + 48
    assert create_model("pyramidnet110_48", bottleneck=True).fc.in_features == (16 + 48) * 4
    assert num_params("pyramidnet", depth=272, alpha=200) == num_params("pyramidnet272_200")


def test_initialisation():
    torch.manual_seed(0)
    model = create_model("wrn16_8")
    conv = model.layers[-1].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_training_step_backpropagates():
    model = create_model("resnet8")
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fastnet_whitens_the_patches_it_was_set_from():
    """The whitening filters, set from the images, map their 2x2 patches to unit variance along the patch
    covariance's eigenvectors (less the eps): the covariance of the first half of the filters' outputs is
    diag(lambda / (lambda + 5e-4)), the second half their negatives."""
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 0.5, 2.0])[:, None, None]
    model = create_model("fastnet")
    model.init_from_data(images)
    out = nn.functional.conv2d(images.double(), model.whiten.weight.double())
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = half.T @ half / len(half)
    patches = images.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches))
    assert torch.allclose(covariance, torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=1e-6)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    assert model(images[:2]).shape == (2, 10) and num_params("fastnet") == 1_972_792


def test_the_sam_codes_wrn_shortcut_has_no_parameters_and_fastnet_starts_from_identities():
    """wrn*_sam: where the shape changes the shortcut is the input average-pooled by the stride with zero channels
    added (the raw input, but in the network's first block); fastnet's group convolutions all start as the identity
    on their first input channels, and the whitening bias at 0 (airbench94)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model("wrn10_2_sam").eval()
    block = model.layers[1]  # 32 -> 64 channels, stride 2: its shortcut is x pooled and padded
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        branch = block.conv2(block.dropout(F.relu(block.bn2(block.conv1(F.relu(block.bn1(x)))))))
        expected = branch + F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, 32))
        assert torch.allclose(block(x), expected, atol=1e-6)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    fast = create_model("fastnet")
    assert torch.equal(fast.whiten.bias, torch.zeros_like(fast.whiten.bias))
    for conv in (m for m in fast.groups.modules() if isinstance(m, torch.nn.Conv2d)):
        n = min(conv.in_channels, conv.out_channels)
        assert torch.equal(conv.weight[:n, :, 1, 1].diagonal(), torch.ones(n))
