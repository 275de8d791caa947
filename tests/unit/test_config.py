import pytest

from dataclasses import dataclass, field

from imgcls_core.config import Config, ConfigError, apply_override, load_config, set_dotted


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


def test_an_unquoted_off_is_the_choice_off_and_other_yaml_booleans_are_explained(tmp_path):
    """YAML 1.1 reads ``amp: off`` as False: it means the choice "off"; ``yes`` (True) is named as a boolean."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    with pytest.raises(ConfigError, match=r"train\.amp: True is not allowed \(YAML reads unquoted yes/no"):
        load_config(None, ["train.amp=yes"])


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
        ("optim.betas=[2, 3]", r"optim\.betas: \[2\.0, 3\.0\] must be two numbers in \[0, 1\)"),
        ("data.test_split=val", "the three splits must be different folders"),
        ("data.val_split=./train/", "the three splits must be different folders"),
        ("tracking.experiment=' '", "tracking.experiment: an MLflow experiment needs a name"),
        ("tracking.register_as=team/digits", r"tracking\.register_as: 'team/digits': .* cannot contain '/' or ':'"),
        ("serve.model_name=''", "serve.model_name: a registered model needs a name"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_each_reduced_precision_goes_with_the_backend_that_serves_it():
    with pytest.raises(ConfigError, match="bf16 is served by serve.backend=torch"):
        load_config(None, ["serve.backend=onnx", "serve.precision=bf16"])
    with pytest.raises(ConfigError, match="int8 is served by serve.backend=onnx"):
        load_config(None, ["serve.precision=int8"])
    assert load_config(None, ["serve.precision=bf16"]).serve.backend == "auto"  # auto serves bf16 with torch


def test_optional_fields_accept_null_and_values():
    assert load_config(None, ["model.small_input="]).model.small_input is None
    assert load_config(None, ["model.small_input=true"]).model.small_input is True
    assert load_config(None, ["model.pretrained=/w.pt"]).model.pretrained == "/w.pt"
    assert load_config(None, ["serve.version=3"]).serve.version == "3"  # a number given for a text field
    with pytest.raises(ConfigError, match=r"serve.version: '\[3\]' is not a registered model version"):
        load_config(None, ["serve.version=[3]"])
    with pytest.raises(ConfigError, match="serve.version: expected a string"):
        Config.from_dict({"serve": {"version": [3]}})


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("tracking.run_name=12:30", "tracking.run_name", "12:30"),  # YAML 1.1: sexagesimal 750
        ("tracking.run_name=2024_01_15", "tracking.run_name", "2024_01_15"),  # YAML 1.1: 20240115
        ("tracking.run_name=0755", "tracking.run_name", "0755"),  # YAML 1.1: octal 493
        ("tracking.run_name=2024-01-15", "tracking.run_name", "2024-01-15"),  # YAML: a date
        ("tracking.run_name=my run #2", "tracking.run_name", "my run #2"),  # YAML: a comment from #
        ("tracking.run_name=true", "tracking.run_name", "true"),
        ("tracking.run_name=1.5", "tracking.run_name", "1.5"),
        ("tracking.run_name=[wip] baseline", "tracking.run_name", "[wip] baseline"),
        ("tracking.run_name= padded ", "tracking.run_name", "padded"),
        ("tracking.run_name='my run'", "tracking.run_name", "my run"),  # quotes still quote
        ('tracking.run_name="a\\tb"', "tracking.run_name", "a\tb"),
        ("tracking.run_name='a' #x'", "tracking.run_name", "'a' #x'"),  # not one quoted value: as written
        ("tracking.run_name=", "tracking.run_name", None),
        ("tracking.run_name=null", "tracking.run_name", None),
        ("tracking.run_name=~", "tracking.run_name", None),
        ("tracking.experiment=0x1F", "tracking.experiment", "0x1F"),  # YAML 1.1: hex 31
        ("tracking.experiment=null", "tracking.experiment", "null"),  # required text: a name like any
        ("serve.version=010", "serve.version", None),  # YAML 1.1: octal 8, another model version
        ("data.root=~/data", "data.root", "~/data"),  # expanded where the paths are resolved
        ("data.root=~", "data.root", "~"),
        ("model.pretrained=~/w.pt", "model.pretrained", "~/w.pt"),
        ("model.pretrained=~", "model.pretrained", None),
        ("train.output_dir=runs/2024-01-15", "train.output_dir", "runs/2024-01-15"),
    ],
)
def test_text_settings_on_the_command_line_keep_the_text_as_written(override, key, expected):
    """YAML would read these as numbers, dates or comments; a text setting takes the text itself."""
    if key == "serve.version":
        with pytest.raises(ConfigError, match=r"serve.version: '010' is not a registered model version"):
            load_config(None, [override])
        return
    assert load_config(None, [override]).flat()[key] == expected


def test_text_settings_that_are_choices_or_need_a_value_behave_as_before():
    assert load_config(None, ["optim.name='adamw'"]).optim.name == "adamw"  # a Literal: parsed as YAML
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="tracking.experiment: expected a string, got None"):
        load_config(None, ["tracking.experiment="])
    with pytest.raises(ConfigError, match=r"unknown config key 'tracking.run_nam' \(did you mean 'run_name'\?\)"):
        load_config(None, ["tracking.run_nam=12:30"])


def test_a_date_in_a_yaml_file_for_a_text_setting_asks_for_quotes(tmp_path):
    path = _write(tmp_path, b"tracking:\n  run_name: 2024-01-15\n")
    with pytest.raises(ConfigError, match=r"tracking.run_name: YAML reads the unquoted 2024-01-15 as a date; "
                                          r"quote it to keep it as text \(run_name: \"2024-01-15\"\)"):
        load_config(path)
    stamp = _write(tmp_path, b"tracking:\n  run_name: 2024-01-15 10:30:00\n")
    with pytest.raises(ConfigError, match=r"tracking.run_name: YAML reads the unquoted 2024-01-15T10:30:00 as a date"):
        load_config(stamp)
    quoted = _write(tmp_path, b"tracking:\n  run_name: '2024-01-15'\nserve:\n  version: 3\n")
    cfg = load_config(quoted)
    assert cfg.tracking.run_name == "2024-01-15" and cfg.serve.version == "3"  # a plain integer still works


def test_a_section_left_empty_in_a_yaml_file_means_its_defaults(tmp_path):
    path = _write(tmp_path, b"tracking:\n  # enabled: true\n  # experiment: x\noptim:\n  lr: 0.2\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert cfg.tracking == Config().tracking and cfg.optim.lr == 0.2
    assert Config.from_dict({"train": None}).train == Config().train
    with pytest.raises(ConfigError, match="tracking: expected a mapping, got 3"):
        Config.from_dict({"tracking": 3})


def test_data_seed_must_be_a_seed_numpy_and_scikit_learn_take():
    with pytest.raises(ConfigError, match=r"data.seed: -1 is out of range; expected 0 <= value <= 4294967295"):
        load_config(None, ["data.seed=-1"])
    with pytest.raises(ConfigError, match="data.seed: 4294967296 is out of range"):
        load_config(None, [f"data.seed={2**32}"])
    assert load_config(None, [f"data.seed={2**32 - 1}"]).data.seed == 2**32 - 1


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def _unreadable(tmp_path, monkeypatch):
    """A file the process may not read (as root, chmod 000 does not stop a read: it is simulated)."""
    import os
    from pathlib import Path

    path = tmp_path / "secret.yaml"
    path.write_text("optim:\n  lr: 0.2\n")
    path.chmod(0)
    if os.geteuid() == 0:
        real = Path.read_bytes

        def read_bytes(self):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return path


# name -> (what to put there, the message expected)
UNUSABLE_FILES = {
    "missing": (None, "does not exist"),
    "directory": ("dir", "is a directory, not a file"),
    "no-permission": ("unreadable", "cannot be read: Permission denied"),
    "bad-yaml": (b"optim:\n  lr: [0.1\ntrain: {epochs: 3\n", r"not valid YAML: expected ',' or ']', but got ':' \(line 3, column 6\)"),
    "tab": (b"optim:\n\tlr: 0.1\n", r"is not valid YAML: found character '\\t' .*\(line 2, column 1\)"),
    "python-tag": (b"!!python/object/apply:os.system [echo hi]\n", "is not valid YAML: could not determine"),
    "control-char": (b"optim:\n  lr: \x00\n", r"is not valid YAML: .*\(character 13\)"),
    "list": (b"- optim\n- train\n", "must hold a mapping of sections, got list"),
    "scalar": (b"just text\n", "must hold a mapping of sections, got str"),
    "latin1": (b"optim:\n  name: \xe9t\xe9\n", r"is not UTF-8 text \(byte 0xe9 at offset 15\)"),
}


@pytest.mark.parametrize("case", list(UNUSABLE_FILES))
def test_an_unusable_config_file_is_one_config_error_line_naming_it(tmp_path, monkeypatch, case):
    content, message = UNUSABLE_FILES[case]
    if content is None:
        path = tmp_path / "missing.yaml"
    elif content == "dir":
        path = tmp_path
    elif content == "unreadable":
        path = _unreadable(tmp_path, monkeypatch)
    else:
        path = _write(tmp_path, content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(f"config file {path} ") and "\n" not in text, text
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), "a chained traceback"


def test_a_job_reports_an_unusable_config_file_in_one_line(tmp_path, capsys):
    import argparse

    from jobs.common import config_from_args

    assert config_from_args(argparse.Namespace(config=str(tmp_path), overrides=[])) is None
    assert capsys.readouterr().err == f"error: bad config: config file {tmp_path} is a directory, not a file\n"


def test_an_empty_file_means_the_defaults_and_numeric_keys_are_named(tmp_path):
    assert load_config(_write(tmp_path, b"# nothing set\n")) == Config()
    with pytest.raises(ConfigError, match=r"unknown config key '1'.*allowed keys: data, augment"):
        load_config(_write(tmp_path, b"1: x\noptim: {}\n"))


def _write(tmp_path, data: bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- dotted keys


def test_set_dotted_sets_checks_and_creates_sections():
    data = {"optim": {"lr": 0.1}, "train": None}  # a section left empty in a YAML file is None
    set_dotted(data, "optim.name", "adamw")
    set_dotted(data, "train.epochs", 3)
    set_dotted(data, "serve.top_k", 2)
    assert data == {"optim": {"lr": 0.1, "name": "adamw"}, "train": {"epochs": 3}, "serve": {"top_k": 2}}
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer' \(did you mean 'optim'\?\); "
                                          r"allowed keys: data, augment, model, optim"):
        set_dotted(data, "optimizer.lr", 0.1)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'lr'\?\); "
                                          r"allowed keys in optim: name, lr,"):
        set_dotted(data, "optim.lrr", 0.1)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.xyz'; allowed keys in optim"):
        set_dotted(data, "optim.xyz", 0.1)  # no close match: no suggestion
    with pytest.raises(ConfigError, match=r"config key 'optim.lr.max': 'optim.lr' is a value, not a section"):
        set_dotted(data, "optim.lr.max", 0.1)
    with pytest.raises(ConfigError, match=r"config key 'optim..lr' must look like section.key"):
        set_dotted(data, "optim..lr", 0.1)
    with pytest.raises(ConfigError, match=r"optim: expected a mapping, got 3"):
        set_dotted({"optim": 3}, "optim.lr", 0.1)
    assert data["optim"] == {"lr": 0.1, "name": "adamw"}  # failed calls change nothing


@dataclass
class _Leaf:
    size: int = 1


@dataclass
class _Branch:
    leaf: _Leaf = field(default_factory=_Leaf)
    name: str = "b"


@dataclass
class _Root:
    branch: _Branch = field(default_factory=_Branch)


def test_set_dotted_walks_sections_of_any_depth():
    data: dict = {}
    set_dotted(data, "branch.leaf.size", 4, schema=_Root)
    set_dotted(data, "branch.name", "x", schema=_Root)
    assert data == {"branch": {"leaf": {"size": 4}, "name": "x"}}
    with pytest.raises(ConfigError, match=r"unknown config key 'branch.leaf.sise' \(did you mean 'size'\?\); "
                                          r"allowed keys in branch.leaf: size"):
        set_dotted(data, "branch.leaf.sise", 4, schema=_Root)
    with pytest.raises(ConfigError, match=r"'branch.name' is a value, not a section"):
        set_dotted(data, "branch.name.first", "x", schema=_Root)


def test_overrides_and_tune_samples_share_the_dotted_key_errors():
    from tune_spaces import apply_sample

    with pytest.raises(ConfigError) as override:
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError) as sample:
        apply_sample(Config(), {"optim.lrr": 0.1})
    assert str(override.value) == str(sample.value)
    assert "unknown config key 'optim.lrr' (did you mean 'lr'?)" in str(sample.value)


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


def test_ranking_a_sweep_on_ema_weights_needs_an_ema():
    with pytest.raises(ConfigError, match=r"tune.metric: val_ema/acc1 .*train.ema_decay.*val/acc1"):
        load_config(None, ["tune.metric=val_ema/acc1"])
    assert load_config(None, ["tune.metric=val_ema/acc1", "train.ema_decay=0.98"]).tune.metric == "val_ema/acc1"
