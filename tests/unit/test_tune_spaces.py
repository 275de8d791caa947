"""Search spaces as data: shipped files load, bad spaces fail naming the problem."""

from __future__ import annotations

import copy

import pytest

from imgcls_core.config import Config, load_config
from imgcls_core.config import ConfigError
from tune_spaces import SpaceError, apply_sample, apply_sample_dict, load_space


@pytest.mark.parametrize("name", ["lr_schedules", "augmentation", "default"])
def test_shipped_spaces_load_and_validate(name):
    space = load_space(f"{name}.yaml", load_config(None, ["train.epochs=3"]))
    assert space.dists
    assert all("." in key for key in space.dists)


def test_default_includes_both_files():
    keys = set(load_space("default").dists)
    assert {"optim.lr", "optim.schedule", "augment.strength", "augment.mixup_alpha"} <= keys


def test_a_users_space_may_include_a_shipped_one_by_name_and_as_one_string(tmp_path):
    path = write(tmp_path, "include: lr_schedules.yaml\naugment.strength: {uniform: [0.0, 0.5]}\n")
    keys = set(load_space(path).dists)
    assert {"optim.lr", "optim.schedule", "augment.strength"} <= keys


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lrr: {loguniform: [0.01, 0.1]}", "unknown config key 'optim.lrr'.*optim.lr"),
        ("optim.lr: {loguniform: [0.5, 0.1]}", r"low \(0.5\) must be less than high \(0.1\)"),
        ("optim.lr: {loguniform: [0, 0.1]}", "needs low > 0"),
        ("optim.lr: {normal: [0, 1]}", "unknown distribution 'normal'"),
        ("optim.schedule: {choice: [cosine, linear]}", "optim.schedule: value 'linear'"),
        ("augment.strength: {uniform: [0.0, 1.5]}", "augment.strength: value 1.5"),
        ("optim.warmup_epochs: {uniform: [0, 5]}", "optim.warmup_epochs: value 5"),
        ("data.batch_size: {randint: [8.5, 64]}", "must be integers"),
        ("optim.lr: 0.1", "expected one distribution"),
        ("optim.warmup_epochs: {quniform: [0, 1, 0.3]}", r"bounds 0 and 1 must be multiples of q \(0.3\)"),
        ("train.epochs: {choice: [1, 2]}", "train.epochs cannot be searched: the sweep sets it"),
        ("train.output_dir: {choice: [a, b]}", "train.output_dir cannot be searched"),
        ("tune.num_samples: {choice: [1, 2]}", "tune.num_samples cannot be searched"),
        ("optim.lr: {choice: [0.1]}\noptim.lr: {choice: [0.2]}", "key 'optim.lr' is given twice"),
    ],
)
def test_bad_spaces_fail_before_any_trial_naming_the_problem(tmp_path, text, message):
    with pytest.raises(SpaceError, match=message):
        load_space(write(tmp_path, text), load_config(None, ["train.epochs=3"]))


def test_ray_param_space_and_sample_application(tmp_path):
    from ray import tune

    space = load_space(write(tmp_path, "optim.lr: {loguniform: [0.01, 0.1]}\noptim.name: {grid: [sgd, adamw]}"))
    ray_space = space.to_ray()
    assert isinstance(ray_space["optim.lr"], tune.search.sample.Float)
    assert ray_space["optim.name"] == {"grid_search": ["sgd", "adamw"]}
    import numpy as np

    cfg = apply_sample(Config(), {"optim.lr": np.float64(0.05), "optim.name": "adamw"})
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float) and cfg.optim.name == "adamw"


def test_a_sample_applies_to_the_sweeps_config_dict_for_one_parse(monkeypatch):
    """A trial adds its sample and its own keys to the sweep's config dict, then parses it once."""
    import numpy as np

    import imgcls_core.config as config_module

    sweep = load_config(None, ["train.epochs=3"]).to_dict()
    before = copy.deepcopy(sweep)
    data = apply_sample_dict(sweep, {"optim.lr": np.float32(0.25), "augment.strength": np.float64(0.5),
                                     "train.output_dir": "/runs/t0", "tracking.run_name": "t0"})
    assert sweep == before  # the sweep's dict is shared by every trial: it is copied, not changed
    assert type(data["optim"]["lr"]) is float and data["augment"]["strength"] == 0.5
    validations = []
    monkeypatch.setattr(config_module, "validate", lambda cfg: validations.append(cfg))
    cfg = Config.from_dict(data)
    assert len(validations) == 1
    monkeypatch.undo()
    assert (cfg.optim.lr, cfg.train.epochs, cfg.train.output_dir, cfg.tracking.run_name) == (0.25, 3, "/runs/t0", "t0")
    with pytest.raises(ConfigError, match=r"unknown config key 'augment.strenght' \(did you mean 'strength'\?\)"):
        apply_sample_dict(sweep, {"augment.strenght": 0.5})
    with pytest.raises(ConfigError, match=r"unknown config key 'augmentation' \(did you mean 'augment'\?\)"):
        apply_sample(Config(), {"augmentation.strength": 0.5})
    with pytest.raises(ConfigError, match=r"augment.strength: 1.5 is out of range"):
        apply_sample(Config(), {"augment.strength": 1.5})  # the Config form validates


def test_tune_job_refuses_a_bad_space_before_starting_ray(tmp_path, capsys):
    from jobs.tune import main

    space = tmp_path / "bad.yaml"
    space.write_text("optim.lr: {loguniform: [0.5, 0.1]}\n")
    assert main(["--set", f"tune.space={space}"]) == 2
    assert "low (0.5) must be less than high (0.1)" in capsys.readouterr().err


def test_concurrent_trials_from_cluster_resources():
    from jobs.tune import concurrent_trials

    cpu = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=2"])
    assert concurrent_trials(cpu, {"CPU": 16}) == 3  # 16 / (2 x 2 + 0.1 for the trial's driver)
    gpu = load_config(None, ["ray.num_workers=2", "ray.use_gpu=true", "ray.gpus_per_worker=0.5"])
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 4}) == 4  # GPUs bind: 4 / (2 x 0.5)
    fixed = load_config(None, ["tune.max_concurrent_trials=2"])
    assert concurrent_trials(fixed, {"CPU": 64}) == 2


def test_pbt_mutations_must_be_searched_and_perturbed_values_stay_in_bounds():
    from tune_spaces import clip

    space = load_space("default")
    assert set(space.mutations(["optim.lr", "augment.strength"])) == {"optim.lr", "augment.strength"}
    with pytest.raises(SpaceError, match=r"tune.pbt_mutate names \['optim.momentum'\]"):
        space.mutations(["optim.momentum"])
    bounds = space.bounds()
    assert bounds["augment.strength"] == (0.0, 1.0)
    # PBT multiplied strength 0.9 by 1.2 and lr 0.012 by 0.8: both are put back inside the space.
    clipped = clip({"augment.strength": 1.08, "optim.lr": 0.0096, "optim.schedule": "cosine"}, bounds)
    assert clipped == {"augment.strength": 1.0, "optim.lr": 0.01, "optim.schedule": "cosine"}
