"""model.pretrained: torchvision:<WeightsEnum>.<NAME>, through torchvision's registry and torch's cache.

No network here: the cache ($TORCH_HOME/hub/checkpoints) is a temporary folder holding a locally
generated state_dict under the file name torchvision's weights URL gives it."""

from __future__ import annotations

import pytest
import torch

SPEC = "torchvision:ResNet18_Weights.IMAGENET1K_V1"


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """A TORCH_HOME whose hub cache holds 'resnet18-f37072fd.pth': a seeded torchvision resnet18."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(7)
    state = resnet18(num_classes=1000).state_dict()
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    return state


def test_a_weights_name_loads_the_cached_file_with_a_fresh_head(torch_cache):
    from imgcls_core.config import ModelConfig
    from imgcls_core.models import build_model

    model = build_model(ModelConfig(name="resnet18", pretrained=SPEC, small_input=False), 10, 64)
    own = model.state_dict()
    backbone = [k for k in torch_cache if not k.startswith("fc.")]
    assert all(torch.equal(own[k], torch_cache[k]) for k in backbone)
    assert own["fc.weight"].shape == (10, 512)  # ImageNet's 1000-class head dropped for the data's 10


def test_a_run_fine_tunes_from_it_with_the_weights_own_normalization(torch_cache, tiny_config):
    from torchvision.models import ResNet18_Weights

    from imgcls_core.engine.checkpoint import load_checkpoint
    from imgcls_core.runner import train_and_evaluate

    cfg = tiny_config("model.name=resnet18", "model.width=1.0", "model.small_input=false", f"model.pretrained={SPEC}",
                      "data.image_size=32", "train.epochs=1", "optim.lr=0.01")
    result = train_and_evaluate(cfg, log=lambda _m: None)
    saved = load_checkpoint(result.files["model"])
    transform = ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert saved["preprocessing"]["mean"] == pytest.approx(list(transform.mean))
    assert saved["preprocessing"]["std"] == pytest.approx(list(transform.std))
    moved = saved["model"]["layer4.1.conv2.weight"]
    assert moved.shape == torch_cache["layer4.1.conv2.weight"].shape
    assert not torch.equal(moved, torch_cache["layer4.1.conv2.weight"])  # fine-tuned, not just copied
    assert (moved - torch_cache["layer4.1.conv2.weight"]).abs().max() < 0.1  # ... starting from the file
    assert result.val.acc1 > 0.2  # 10 classes: above chance after one epoch


def test_offline_without_the_file_the_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    from imgcls_core.models import resolve_pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):  # what torch.hub raises with no network
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as caught:
        resolve_pretrained(SPEC)
    message = str(caught.value)
    assert f"put resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) " \
           f"at {expected}" in message
    assert "Temporary failure in name resolution" in message and not expected.exists()


def test_an_unknown_weights_name_is_a_config_error():
    from imgcls_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="names no torchvision weights .*e.g. torchvision:ResNet50_Weights"):
        load_config(None, ["model.pretrained=torchvision:ResNet18_Weights.NOPE"])
    with pytest.raises(ConfigError, match="names no torchvision weights"):
        load_config(None, ["model.pretrained=torchvision:resnet18"])


def test_a_relative_pretrained_path_resolves_like_data_root_in_a_submitted_job(monkeypatch, tmp_path):
    from imgcls_core.config import load_config
    from jobs.common import BASE_DIR_ENV, resolve_config_paths

    monkeypatch.setenv(BASE_DIR_ENV, str(tmp_path))
    cfg = resolve_config_paths(load_config(None, ["model.pretrained=weights/r18.pth", "data.root=data/x"]))
    assert cfg.model.pretrained == str(tmp_path / "weights" / "r18.pth")
    assert cfg.data.root == str(tmp_path / "data" / "x")
    named = resolve_config_paths(load_config(None, [f"model.pretrained={SPEC}", "model.small_input=false"]))
    assert named.model.pretrained == SPEC
