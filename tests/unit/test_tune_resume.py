"""Which stored sweeps jobs.tune resumes into the configured MLflow store (the parent run is a
stand-in: these functions read only its run_id, active and continued)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from imgcls_core.config import ConfigError, load_config
from jobs.tune import SWEEP_RUN_FILE, _check_same_sweep, _record_parent_run, _tracked_elsewhere, sweep_definition
from tune_spaces import load_space

DEFINITION = {"tune.num_samples": 4, "train.epochs": 3, "space.optim.lr": "loguniform[0.01, 0.5]"}


def parent(run_id: str | None, continued: bool = True) -> SimpleNamespace:
    return SimpleNamespace(run_id=run_id, active=run_id is not None, continued=continued)


def test_the_sweep_that_recorded_this_parent_run_is_resumed(tmp_path):
    _record_parent_run(str(tmp_path), parent("abc"), DEFINITION)
    assert json.loads((tmp_path / SWEEP_RUN_FILE).read_text()) == {"parent_run_id": "abc", "definition": DEFINITION}
    assert not _tracked_elsewhere(str(tmp_path), parent("abc"))
    assert not _tracked_elsewhere(f"file://{tmp_path}", parent("abc"))


@pytest.mark.parametrize("record", [None, '{"parent_run_id": "other"}', "not json", "[1]"])
def test_a_sweep_recorded_for_another_run_or_without_a_record_is_set_aside(tmp_path, record):
    if record is not None:
        (tmp_path / SWEEP_RUN_FILE).write_text(record)
    assert _tracked_elsewhere(str(tmp_path), parent("abc"))


def test_a_store_that_had_to_create_the_parent_run_never_held_the_sweep(tmp_path):
    _record_parent_run(str(tmp_path), parent("abc"), DEFINITION)
    assert _tracked_elsewhere(str(tmp_path), parent("abc", continued=False))


def test_without_tracking_or_on_remote_storage_the_sweep_resumes_as_before(tmp_path):
    assert not _tracked_elsewhere(str(tmp_path), parent(None, continued=False))
    _record_parent_run(str(tmp_path), parent(None), DEFINITION)
    assert not _tracked_elsewhere(str(tmp_path), parent(None, continued=False))


def test_a_run_without_tracking_keeps_the_parent_run_recorded_before(tmp_path):
    """Run 1 tracked, run 2 with MLflow down, run 3 tracked again: run 3 resumes into run 1's parent."""
    _record_parent_run(str(tmp_path), parent("abc"), DEFINITION)
    _record_parent_run(str(tmp_path), parent(None), DEFINITION)
    assert json.loads((tmp_path / SWEEP_RUN_FILE).read_text())["parent_run_id"] == "abc"
    assert not _tracked_elsewhere(str(tmp_path), parent("abc"))
    assert not _tracked_elsewhere("s3://bucket/results/sweep", parent("abc"))


def test_a_sweep_re_run_with_other_settings_is_refused_naming_them(tmp_path):
    """Tuner.restore keeps the stored space, sample count and scheduler while the trials would get the
    new config: a re-run that changes what the sweep is must be refused, before its MLflow run is touched."""
    cfg = load_config(None, ["tune.num_samples=4", "train.epochs=3"])
    space = load_space("lr_schedules", cfg)
    _record_parent_run(str(tmp_path), parent("abc"), sweep_definition(cfg, space))
    same = load_config(None, ["tune.num_samples=4", "train.epochs=3", "ray.num_workers=3", "tracking.run_name=x",
                              "tune.max_concurrent_trials=1", "tune.name=s"])  # where and how fast it runs may change
    _check_same_sweep(str(tmp_path), "s", sweep_definition(same, space))
    record = json.loads((tmp_path / SWEEP_RUN_FILE).read_text())  # a setting an older imgcls did not have
    record["definition"].pop("train.epochs")
    (tmp_path / SWEEP_RUN_FILE).write_text(json.dumps(record))
    _check_same_sweep(str(tmp_path), "s", sweep_definition(same, space))
    _record_parent_run(str(tmp_path), parent("abc"), sweep_definition(cfg, space))
    changed = load_config(None, ["tune.num_samples=2", "train.epochs=5"])
    with pytest.raises(ValueError, match=r"sweep s in .* was started with other settings \(train\.epochs 3 -> 5; "
                                         r"tune\.num_samples 4 -> 2\).*Set tune\.name"):
        _check_same_sweep(str(tmp_path), "s", sweep_definition(changed, space))
    other_space = load_space("augmentation", cfg)
    with pytest.raises(ValueError, match=r"searched keys \[.*'optim.lr'.*\] -> \[.*'augment.strength'"):
        _check_same_sweep(str(tmp_path), "s", sweep_definition(cfg, other_space))
    (tmp_path / SWEEP_RUN_FILE).write_text('{"parent_run_id": "abc"}')  # recorded before definitions were
    _check_same_sweep(str(tmp_path), "s", sweep_definition(changed, space))


@pytest.mark.parametrize(("metric", "mode"), [("val/acc1", "max"), ("val/loss", "min"), ("val/ece", "min"),
                                              ("val_ema/macro_f1", "max")])
def test_the_sweep_metric_is_one_every_epoch_reports_with_its_direction(metric, mode):
    from imgcls_core.config import check_tune_metric

    assert check_tune_metric(load_config(None, [f"tune.metric={metric}", "train.ema_decay=0.9"])) == mode


@pytest.mark.parametrize("metric", ["val/acc", "train/loss", "foo", "val/threshold"])
def test_a_sweep_metric_no_epoch_reports_is_refused(metric):
    from imgcls_core.config import check_tune_metric

    with pytest.raises(ConfigError, match=r"is not reported by runs each epoch; choose val/<name>"):
        check_tune_metric(load_config(None, [f"tune.metric={metric}"]))


def test_trial_runs_left_running_end_killed_or_failed_and_finished_ones_are_kept(tmp_path):
    """A trial ASHA stopped, or one that died, never ended its MLflow run: the sweep ends it (real sqlite store)."""
    from mlflow.tracking import MlflowClient

    from imgcls_core.config import TrackingConfig
    from imgcls_core.tracking import Tracker
    from jobs.tune import _end_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    top = Tracker(TrackingConfig(enabled=True, tracking_uri=uri, experiment="sweeps"), log=lambda m: None).start(run_name="sweep")
    children = {}
    for name in ("run_trial_a_00000", "run_trial_a_00001", "run_trial_a_00002"):
        child = Tracker(TrackingConfig(enabled=True, tracking_uri=uri, experiment="sweeps"), log=lambda m: None)
        children[name] = child.start(run_name=name, parent_run_id=top.run_id).run_id
    MlflowClient(uri).set_terminated(children["run_trial_a_00000"], status="FINISHED")
    results = [SimpleNamespace(path=f"/r/run_trial_a_0000{k}_0_lr=0.1", error=RuntimeError() if k == 2 else None)
               for k in range(3)]
    _end_trial_runs(top, results)
    status = {name: MlflowClient(uri).get_run(run_id).info.status for name, run_id in children.items()}
    assert status == {"run_trial_a_00000": "FINISHED", "run_trial_a_00001": "KILLED", "run_trial_a_00002": "FAILED"}
    assert MlflowClient(uri).get_run(top.run_id).info.status == "RUNNING"  # the sweep's own run: its job


def test_a_sweep_definition_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """A submitted job runs in a copy of the working dir: a weights name is no path to resolve there."""
    args = ["model.name=resnet18", "model.pretrained=torchvision:ResNet18_Weights.IMAGENET1K_V1",
            "model.small_input=false", f"data.root={tmp_path}", f"train.output_dir={tmp_path / 'out'}"]
    space = load_space("lr_schedules")
    monkeypatch.chdir(tmp_path)
    here = sweep_definition(load_config(None, args), space)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert sweep_definition(load_config(None, args), space) == here
    assert here["model.pretrained"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
