"""Our ResNet against torchvision's (same state_dict, same outputs), and its extra options."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from imgcls_core.models import create_model
from imgcls_core.models.resnet import scale_channels


def _torchvision_with_perturbed_bn(name: str, seed: int = 0) -> nn.Module:
    """A seeded torchvision ResNet whose BN running stats and affine params are not the identity."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_state_dict_keys_and_shapes_equal_torchvision(name):
    ours = create_model(name, 1000).state_dict()
    theirs = getattr(torchvision.models, name)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_load_strictly_and_give_the_same_outputs(name):
    reference = _torchvision_with_perturbed_bn(name)
    ours = create_model(name, 1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(x), ours(x)
    assert expected.abs().max() > 1e-3  # the comparison means something
    assert (actual - expected).abs().max().item() < 1e-5


def _stage_sizes(model: nn.Module, size: int) -> list[int]:
    sizes = []
    hooks = [
        getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for i in range(1, 5)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return sizes


def test_small_input_stem_keeps_32px_images_large_enough_for_four_stages():
    model = create_model("resnet18", 10, small_input=True, width=0.25)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert _stage_sizes(model, 32) == [32, 16, 8, 4]
    standard = create_model("resnet18", 10, width=0.25)
    assert _stage_sizes(standard, 32) == [8, 4, 2, 1]


def test_small_input_changes_only_the_stem_kernel_shape():
    small = create_model("resnet50", 10, small_input=True).state_dict()
    standard = create_model("resnet50", 10).state_dict()
    assert list(small) == list(standard)
    changed = [k for k in small if small[k].shape != standard[k].shape]
    assert changed == ["conv1.weight"]


@pytest.mark.parametrize(("name", "last_bn"), [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_bn_of_every_block(name, last_bn):
    model = create_model(name, 10, width=0.25, zero_init_residual=True)
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    assert all(getattr(b, last_bn).weight.abs().sum() == 0 for b in blocks)
    assert model.bn1.weight.min() == 1  # only the residual branches
    default = create_model(name, 10, width=0.25)
    default_blocks = [b for i in range(1, 5) for b in getattr(default, f"layer{i}")]
    assert all(getattr(b, last_bn).weight.min() == 1 for b in default_blocks)


@pytest.mark.parametrize(
    ("name", "width", "stem", "features"),
    [
        ("resnet18", 0.5, 32, 256),
        ("resnet18", 2.0, 128, 1024),
        ("resnet50", 0.25, 16, 512),
        ("resnet50", 0.1, 8, 192),  # 512 * 0.1 = 51.2 -> 48, times Bottleneck's expansion of 4
    ],
)
def test_width_scales_every_stage(name, width, stem, features):
    model = create_model(name, 10, width=width)
    assert model.conv1.out_channels == stem
    assert model.fc.in_features == features
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_scale_channels_rounds_to_multiples_of_8_and_never_below_8():
    assert [scale_channels(64, w) for w in (1.0, 0.5, 0.3, 0.05)] == [64, 32, 16, 8]
    assert scale_channels(512, 0.75) == 384


def test_dropout_sits_before_the_classifier_and_only_acts_in_training():
    model = create_model("resnet18", 10, small_input=True, width=0.25, dropout=0.5)
    x = torch.randn(4, 3, 16, 16)
    seen = []
    model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        features = model.forward_features(x)  # train-mode BN: batch statistics, deterministic
        model(x)
    fc_input = seen[-1]
    dropped = fc_input == 0
    assert dropped[features != 0].float().mean().item() == pytest.approx(0.5, abs=0.15)
    # Survivors are scaled by 1 / (1 - p).
    assert torch.allclose(fc_input[~dropped], 2 * features[~dropped])


def test_convs_use_torchvision_init():
    model = create_model("resnet18", 10)
    # kaiming_normal fan_out, relu gain: std = sqrt(2 / (out_channels * k * k))
    std = model.layer3[0].conv1.weight.std().item()
    assert std == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.1)
    assert model.layer3[0].bn1.weight.min() == 1 and model.layer3[0].bn1.bias.abs().max() == 0
