import pytest

from imgcls_core.config import Config, ConfigError, apply_override, load_config


def test_defaults_build_and_round_trip_through_a_dict():
    cfg = Config.from_dict({})
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["optim.lr"] == cfg.optim.lr


def test_yaml_file_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=0.2", "augment.strength=0.7", "optim.milestones=[0.3, 0.6]"])
    assert cfg.optim.lr == 0.2
    assert cfg.train.epochs == 3
    assert cfg.augment.strength == 0.7
    assert cfg.optim.milestones == [0.3, 0.6]


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*allowed keys.*\blr\b"):
        Config.from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        Config.from_dict({"optimizer": {}})


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not allowed.*'sgd', 'adamw'"):
        Config.from_dict({"optim": {"name": "adam"}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.deterministic=1", "train.deterministic: expected true or false"),
        ("augment.strength=1.5", r"augment\.strength: 1\.5 is out of range"),
        ("model.name=resnet9000", r"model\.name: 'resnet9000' is not registered"),
        ("optim.warmup_epochs=20", "optim.warmup_epochs"),
        ("optim.milestones=[0.8, 0.2]", "optim.milestones"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_optional_fields_accept_null_and_values():
    assert load_config(None, ["model.small_input="]).model.small_input is None
    assert load_config(None, ["model.small_input=true"]).model.small_input is True
    assert load_config(None, ["model.pretrained=/w.pt"]).model.pretrained == "/w.pt"
    assert load_config(None, ["serve.version=3"]).serve.version == "3"  # a number given for a text field
    with pytest.raises(ConfigError, match="serve.version: expected a string"):
        load_config(None, ["serve.version=[3]"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)


def test_sync_batchnorm_needs_gpus():
    with pytest.raises(ConfigError, match="ray.sync_batchnorm: SyncBatchNorm runs on GPUs only"):
        load_config(None, ["ray.sync_batchnorm=true"])
    assert load_config(None, ["ray.sync_batchnorm=true", "ray.use_gpu=true"]).ray.sync_batchnorm


def test_exponent_notation_without_a_dot_is_a_number():
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; numbers in overrides and files must still work."""
    cfg = load_config(None, ["optim.weight_decay=1e-4", "optim.lr=5E-2"])
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 0.05
    assert Config.from_dict({"optim": {"weight_decay": "3e-5"}}).optim.weight_decay == 3e-5
