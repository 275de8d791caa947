"""Loading local backbone weights, freezing stages and splitting off the head."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from imgcls_core.config import ModelConfig
from imgcls_core.models import (
    build_model,
    create_model,
    freeze_stages,
    keep_frozen_bn_eval,
    load_pretrained,
    split_head_parameters,
    unfreeze_all,
)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A seeded torchvision resnet18 (1000 classes) saved as a raw state_dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_build_model_loads_the_backbone_and_keeps_a_fresh_head(resnet18_file):
    saved = torch.load(resnet18_file, weights_only=True)
    cfg = ModelConfig(name="resnet18", small_input=False, pretrained=str(resnet18_file))
    model = build_model(cfg, num_classes=10, image_size=32)
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert len(backbone) == len(state) - 2
    for key in backbone:
        assert torch.equal(state[key], saved[key]), key
    assert model.fc.out_features == 10 and model.fc.weight.shape == (10, 512)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_load_pretrained_reports_the_dropped_head(resnet18_file):
    report = load_pretrained(create_model("resnet18", 10), resnet18_file)
    assert report.dropped_head == ["fc.weight", "fc.bias"]
    assert "fc.weight" not in report.loaded and "layer4.1.bn2.running_var" in report.loaded


def test_a_head_of_the_same_size_is_loaded_too(resnet18_file):
    model = create_model("resnet18", 1000)
    assert load_pretrained(model, resnet18_file).dropped_head == []
    assert torch.equal(model.fc.weight, torch.load(resnet18_file, weights_only=True)["fc.weight"])


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_checkpoint_dicts_and_ddp_prefixes_are_unwrapped(tmp_path, resnet18_file, wrapper):
    saved = torch.load(resnet18_file, weights_only=True)
    path = tmp_path / "ckpt.pt"
    prefixed = {f"module._orig_mod.{k}": v for k, v in saved.items()}  # DDP around torch.compile
    torch.save({wrapper: prefixed, "epoch": 3, "args": {"lr": 0.1}}, path)
    model = create_model("resnet18", 10)
    load_pretrained(model, path)
    assert torch.equal(model.layer2[0].conv1.weight, saved["layer2.0.conv1.weight"])


def test_a_wrong_backbone_key_fails_naming_the_key_and_the_file(tmp_path, resnet18_file):
    state = torch.load(resnet18_file, weights_only=True)
    state["layer3.0.conv9.weight"] = state.pop("layer3.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    model = create_model("resnet18", 10)
    before = model.layer1[0].conv1.weight.clone()
    with pytest.raises(ValueError, match="renamed.pth") as err:
        load_pretrained(model, path)
    assert "missing from the file: layer3.0.conv1.weight" in str(err.value)
    assert "not in the model: layer3.0.conv9.weight" in str(err.value)
    assert torch.equal(model.layer1[0].conv1.weight, before)  # nothing half-loaded


def test_strict_backbone_off_tolerates_missing_and_extra_keys(tmp_path, resnet18_file):
    state = torch.load(resnet18_file, weights_only=True)
    state["extra.weight"] = state.pop("layer3.0.conv1.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = create_model("resnet18", 10)
    report = load_pretrained(model, path, strict_backbone=False)
    assert sorted(report.ignored) == ["extra.weight", "layer3.0.conv1.weight"]
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_a_backbone_shape_mismatch_fails_with_a_hint_for_the_small_stem(resnet18_file):
    stem = r"conv1.weight \(file \(64, 3, 7, 7\), model \(64, 3, 3, 3\)\)"
    stem += ".*7x7 stem needs model.small_input=false"
    with pytest.raises(ValueError, match=stem):
        load_pretrained(create_model("resnet18", 10, small_input=True), resnet18_file)
    width = r"layer1.0.conv1.weight \(file \(64, 64, 3, 3\).*another model.width"
    with pytest.raises(ValueError, match=width):
        load_pretrained(create_model("resnet18", 10, width=0.5), resnet18_file)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(create_model("cnn3", 10), tmp_path / "nope.pth")


def test_a_file_without_a_state_dict_fails_clearly(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="list.pt hold no state_dict"):
        load_pretrained(create_model("cnn3", 10), path)


def _frozen_prefixes(model: nn.Module) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}


def test_freeze_three_stages_freezes_stem_and_layer1_only():
    model = freeze_stages(create_model("resnet18", 10, width=0.25), 3)
    assert _frozen_prefixes(model) == {"conv1", "bn1", "layer1", "layer2"}
    later = [p for n, p in model.named_parameters() if n.startswith(("layer3", "layer4", "fc"))]
    assert later and all(p.requires_grad for p in later)


@pytest.mark.parametrize(
    ("n", "frozen"), [(0, set()), (1, {"conv1", "bn1"}), (2, {"conv1", "bn1", "layer1"})]
)
def test_freeze_counts_the_stem_as_the_first_stage(n, frozen):
    assert _frozen_prefixes(freeze_stages(create_model("resnet18", 10, width=0.25), n)) == frozen


def test_freeze_five_stages_leaves_only_the_head_trainable():
    model = freeze_stages(create_model("resnet50", 10, width=0.25), 5)
    backbone, head = split_head_parameters(model)
    assert backbone == [] and [n for n, _ in head] == ["fc.weight", "fc.bias"]


def test_frozen_batchnorm_keeps_its_running_stats_in_training():
    model = freeze_stages(create_model("resnet18", 10, small_input=True, width=0.25), 2)
    model.train()
    keep_frozen_bn_eval(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training
    frozen_stats = model.layer1[0].bn1.running_mean.clone()
    trained_stats = model.layer2[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 16, 16) * 3 + 1)
    assert torch.equal(model.layer1[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(model.layer2[0].bn1.running_mean, trained_stats)


def test_unfreeze_all_makes_everything_trainable_again():
    model = unfreeze_all(freeze_stages(create_model("resnet18", 10, width=0.25), 5))
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    keep_frozen_bn_eval(model)
    assert model.bn1.training


def test_build_model_freezes_after_loading(resnet18_file):
    cfg = ModelConfig(
        name="resnet18", small_input=False, pretrained=str(resnet18_file), freeze_stages=3
    )
    model = build_model(cfg, 10, 64)
    assert _frozen_prefixes(model) == {"conv1", "bn1", "layer1", "layer2"}


def test_cnn3_stages_are_its_blocks_and_more_than_three_is_an_error():
    model = freeze_stages(create_model("cnn3", 10, width=0.25), 2)
    assert _frozen_prefixes(model) == {"block1", "block2"}
    expected = "freeze_stages=4 is out of range for CNN3: it has 3 stages.*0..3"
    with pytest.raises(ValueError, match=expected):
        freeze_stages(model, 4)


def test_split_head_parameters_separates_fc_and_skips_frozen_params():
    model = freeze_stages(create_model("resnet18", 10, width=0.25), 1)
    backbone, head = split_head_parameters(model)
    assert [n for n, _ in head] == ["fc.weight", "fc.bias"]
    names = {n for n, _ in backbone}
    assert "layer1.0.conv1.weight" in names
    assert not names & {"conv1.weight", "bn1.weight", "fc.weight"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names | {n for n, _ in head} == trainable


def test_split_head_parameters_sees_through_torch_compile_wrappers():
    model = create_model("cnn3", 10, width=0.25)
    backbone, head = split_head_parameters(torch.compile(model))
    assert [n for n, _ in head] == ["fc.weight", "fc.bias"]
    split = {id(p) for _, p in backbone} | {id(p) for _, p in head}
    assert split == {id(p) for p in model.parameters()}


# --------------------------------------------------------------------------- what a run is told, and normalization


def test_build_model_tells_the_runs_log_what_it_loaded_and_whether_the_head_is_new(tmp_path, resnet18_file):
    lines: list[str] = []
    cfg = ModelConfig(name="resnet18", small_input=False, pretrained=str(resnet18_file))
    build_model(cfg, num_classes=10, image_size=64, log=lines.append)
    assert lines == [f"pretrained weights: loaded 120 tensors from {resnet18_file}; head fc is new (the file's is "
                     f"shaped for another number of classes)"]
    build_model(cfg, num_classes=1000, image_size=64, log=lines.append)  # ImageNet's 1000 classes: kept
    assert lines[-1] == (f"pretrained weights: loaded 122 tensors from {resnet18_file}; head fc loaded too (the "
                         f"file's has this run's number of classes)")
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in torch.load(resnet18_file, weights_only=True).items()
                if not k.startswith("fc.")}, headless)
    build_model(ModelConfig(name="resnet18", small_input=False, pretrained=str(headless)), 10, 64, log=lines.append)
    assert lines[-1].endswith("; head fc is new (the file has none)")


def test_an_imgcls_model_file_gives_its_own_normalization(tmp_path, resnet18_file):
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.checkpoint import save_inference_model
    from imgcls_core.models.transfer import pretrained_normalization

    pre = Preprocessing(32, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], 1.0, ["a", "b"])
    model = save_inference_model(tmp_path / "model.pt", create_model("cnn3", 2, width=0.25).state_dict(),
                                 {"name": "cnn3", "width": 0.25}, pre)
    assert pretrained_normalization(model) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert pretrained_normalization(resnet18_file) is None  # a plain state_dict records none
