"""Every registered model gets shape, backward and width tests from the registry itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgcls_core.config import ModelConfig
from imgcls_core.models import build_model, create_model, list_models, model_options, register_model
from imgcls_core.models.catalog import _MODELS

NUM_CLASSES = 7


def _small(name: str) -> dict:
    return {"small_input": True} if "small_input" in model_options(name) else {}


def _forward_backward(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    model.train()
    logits = model(torch.randn(2, 3, 32, 32))
    logits.square().mean().backward()  # touches every logit, so every parameter gets a gradient
    return logits


def test_registry_holds_the_documented_models_sorted():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "cnn3"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_model_maps_a_small_batch_to_logits_and_trains_every_parameter(name):
    model = create_model(name, NUM_CLASSES, **_small(name))
    logits = _forward_backward(model)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {param_name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name}: {param_name} got an all-zero gradient"


@pytest.mark.parametrize("name", list_models())
def test_quarter_width_model_is_smaller_and_still_trains(name):
    full = sum(p.numel() for p in create_model(name, NUM_CLASSES).parameters())
    model = create_model(name, NUM_CLASSES, width=0.25, **_small(name))
    assert sum(p.numel() for p in model.parameters()) < full / 4
    assert _forward_backward(model).shape == (2, NUM_CLASSES)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_model_has_a_head_and_stages_for_transfer(name):
    model = create_model(name, NUM_CLASSES, width=0.25)
    head = getattr(model, model.head_name)
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES
    for stage in model.stage_names:
        for module_name in stage:
            assert isinstance(model.get_submodule(module_name), nn.Module)


def test_unknown_model_name_is_named_with_the_registered_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet18"):
        create_model("resnet9", NUM_CLASSES)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="'depth'.*accepts: width, dropout"):
        create_model("cnn3", NUM_CLASSES, depth=4)


def test_registering_a_name_twice_fails():
    def cnn3(num_classes):  # same name as the real one
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'cnn3' is already registered"):
        register_model(cnn3)


def test_register_model_adds_a_factory_under_the_function_name():
    @register_model
    def tiny_linear_for_test(num_classes, *, width=1.0):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))

    try:
        assert "tiny_linear_for_test" in list_models()
        assert create_model("tiny_linear_for_test", 3)(torch.zeros(1, 3, 4, 4)).shape == (1, 3)
    finally:
        del _MODELS["tiny_linear_for_test"]


@pytest.mark.parametrize(("image_size", "kernel"), [(32, 3), (64, 3), (96, 7)])
def test_build_model_picks_the_stem_from_the_image_size(image_size, kernel):
    model = build_model(ModelConfig(name="resnet18", width=0.25), 10, image_size)
    assert model.conv1.kernel_size == (kernel, kernel)


def test_build_model_explicit_small_input_wins_over_the_image_size():
    model = build_model(ModelConfig(name="resnet18", width=0.25, small_input=False), 10, 32)
    assert model.conv1.kernel_size == (7, 7)


def test_build_model_applies_width_dropout_and_zero_init():
    cfg = ModelConfig(name="resnet18", width=0.5, dropout=0.3, zero_init_residual=True)
    model = build_model(cfg, 10, 32)
    assert model.fc.in_features == 256
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.3
    assert model.layer1[0].bn2.weight.abs().sum() == 0


def test_build_model_skips_small_input_for_models_without_a_stem_choice():
    model = build_model(ModelConfig(name="cnn3", width=0.25, dropout=0.1), 4, 32)
    assert model.fc.out_features == 4 and model.dropout.p == 0.1


def test_build_model_refuses_an_option_the_model_cannot_honour():
    with pytest.raises(ValueError, match="'cnn3' does not support model.zero_init_residual=True"):
        build_model(ModelConfig(name="cnn3", zero_init_residual=True), 4, 32)


# --------------------------------------------------------------------------- checked before anything runs

RESNET50_TV = "torchvision:ResNet50_Weights.IMAGENET1K_V2"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=cnn3", "model.zero_init_residual=true"],
         r"model 'cnn3' does not support model.zero_init_residual=True; it accepts: dropout, width"),
        (["model.name=cnn3", "model.freeze_stages=4"],
         r"model.freeze_stages=4 is out of range for CNN3: it has 3 stages \(block1, block2, block3\), so use 0..3"),
        ([f"model.pretrained={RESNET50_TV}", "model.small_input=false"],
         r"model.pretrained: torchvision:ResNet50_Weights.IMAGENET1K_V2 are weights of torchvision's resnet50 "
         r"architecture, not of model.name=resnet18; set model.name=resnet50"),
        (["model.pretrained=torchvision:ViT_B_16_Weights.IMAGENET1K_V1"],
         r"torchvision's vit_b_16 architecture, not of model.name=resnet18; imgcls has no vit_b_16 model"),
        (["model.name=cnn3", "model.pretrained=torchvision:ResNet18_Weights.IMAGENET1K_V1"],
         r"torchvision's resnet18 architecture, not of model.name=cnn3; set model.name=resnet18"),
        (["model.name=resnet50", f"model.pretrained={RESNET50_TV}", "model.small_input=false", "model.width=0.5"],
         r"model.width: torchvision weights \(.*\) are shaped for width 1.0, not 0.5"),
        (["model.name=resnet50", f"model.pretrained={RESNET50_TV}"],  # 32 px: small_input unset picks 3x3
         r"model.small_input: torchvision weights \(.*\) have the 7x7 stem, .*\(unset, it picks the 3x3 stem for "
         r"data.image_size=32 <= 64\); set model.small_input=false"),
        (["model.name=resnet50", f"model.pretrained={RESNET50_TV}", "model.small_input=true",
          "data.image_size=224"], r"model.small_input: torchvision weights .* 7x7 stem.*set model.small_input=false"),
    ],
)
def test_model_mistakes_are_config_errors_before_anything_runs(overrides, message):
    """What build_model or load_pretrained would refuse only after the data loaded (or in every Ray worker)."""
    from imgcls_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_models_that_fit_their_weights_and_stages_pass_validation():
    from imgcls_core.config import load_config

    load_config(None, ["model.name=cnn3", "model.freeze_stages=3", "model.width=0.5"])
    load_config(None, ["model.name=resnet50", "model.freeze_stages=5"])
    cfg = load_config(None, ["model.name=resnet50", f"model.pretrained={RESNET50_TV}", "data.image_size=224"])
    assert cfg.model.small_input is None  # 224 px: the 7x7 stem, the weights' own
    load_config(None, ["model.name=resnet50", f"model.pretrained={RESNET50_TV}", "model.small_input=false"])


def test_a_model_without_stages_cannot_be_frozen():
    from imgcls_core.models import check_model_config

    @register_model
    def stageless_for_test(num_classes):
        return nn.Linear(4, num_classes)

    try:
        check_model_config(ModelConfig(name="stageless_for_test"), 32)
        with pytest.raises(ValueError, match="model.freeze_stages=1: Linear defines no stage_names"):
            check_model_config(ModelConfig(name="stageless_for_test", freeze_stages=1), 32)
    finally:
        del _MODELS["stageless_for_test"]
