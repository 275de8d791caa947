"""Tracker against a real sqlite tracking store and against a server that is not there."""

from __future__ import annotations

import time

from imgcls_core.config import TrackingConfig
from imgcls_core.tracking import RUN_KEY_TAG, Tracker


def sqlite_cfg(tmp_path) -> TrackingConfig:
    return TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="unit")


def test_run_key_continues_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    first = Tracker(sqlite_cfg(tmp_path), log=lambda m: None).start(run_key="results/a")
    first.log_params({"optim.lr": 0.1, "optim.milestones": [0.5, 0.75]})
    first.log_metrics({"val/acc1": 0.5}, step=1)
    first.close(status="KILLED")
    again = Tracker(sqlite_cfg(tmp_path), log=lambda m: None).start(run_key="results/a")
    again.log_metrics({"val/acc1": 0.75}, step=2)
    assert again.close() == []
    other = Tracker(sqlite_cfg(tmp_path), log=lambda m: None).start(run_key="results/b")
    assert other.run_id != first.run_id == again.run_id

    client = MlflowClient(sqlite_cfg(tmp_path).tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_KEY_TAG] == "results/a"
    assert run.data.params["optim.milestones"] == "[0.5, 0.75]"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "val/acc1")] == [(1, 0.5), (2, 0.75)]


def test_unreachable_server_disables_tracking_and_says_what_was_lost(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    lines: list[str] = []
    cfg = TrackingConfig(enabled=True, tracking_uri="http://127.0.0.1:9", experiment="unit")  # discard port
    tracker = Tracker(cfg, log=lines.append).start(run_key="x")
    assert not tracker.active
    tracker.log_metrics({"loss": 1.0}, step=1)  # a no-op, never an exception
    lost = tracker.close()
    assert len(lost) == 1 and "unreachable" in lost[0] and "127.0.0.1:9" in lost[0]
    assert any(line.startswith("MLflow: NOT logged") for line in lines)


def test_metrics_that_fail_are_retried_then_reported_lost(tmp_path):
    lines: list[str] = []
    tracker = Tracker(sqlite_cfg(tmp_path), log=lines.append).start(run_key="r")
    real = tracker.client
    calls = []

    class Down:  # the store goes away for a while (a fake above the real client)
        def log_batch(self, *args, **kwargs):
            calls.append(kwargs)
            raise ConnectionError("server down")

        def __getattr__(self, name):
            return getattr(real, name)

    tracker.client = Down()
    measured = time.time() * 1000
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_metrics({"loss": 1.5}, step=1)  # buffered: no second try within retry_after_s
    assert len(calls) == 1
    time.sleep(0.05)
    tracker.client = real
    tracker.retry_after_s, tracker._retry_at = 0.0, 0.0  # the server is back and the wait is over
    tracker.log_metrics({"loss": 1.0}, step=2)  # delivers step 1 too
    history = real.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (1, 2.0), (2, 1.0)]
    assert min(m.timestamp for m in history) - measured < 40  # stamped when measured, not when delivered
    assert any("delivered 3 buffered metric batches late (steps 1..2)" in line for line in lines), lines
    tracker.client = Down()
    tracker.log_metrics({"loss": 0.5}, step=3)
    lost = tracker.close()
    assert "metrics of steps [3]" in lost


def test_training_outputs_register_the_model_once_asked(tmp_path):
    from mlflow.tracking import MlflowClient

    from imgcls_core.config import load_config
    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model
    from imgcls_core.registry import Registry
    from imgcls_core.tracking import log_training_outputs

    cfg = load_config(None, ["model.name=cnn3", "model.width=0.25"])
    pre = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(10)])
    model = save_inference_model(tmp_path / "model.pt", build_model(cfg.model, 10, 32).state_dict(),
                                 cfg.to_dict()["model"], pre)
    lines: list[str] = []
    tracker = Tracker(sqlite_cfg(tmp_path), log=lines.append).start(run_key="r")
    info = log_training_outputs(tracker, metrics={"test/acc1": 0.5}, step=1, files={"model": model},
                                register_as="digits")
    tracker.close()
    assert str(info.registered_model_version) == "1" and "MLflow: registered the model as 'digits' v1" in lines
    uri = sqlite_cfg(tmp_path).tracking_uri
    version = MlflowClient(uri).get_model_version("digits", "1")
    assert version.run_id == tracker.run_id  # jobs.promote finds it by its run
    assert Registry(uri, "digits").version_for_run(tracker.run_id).version == version.version


def test_a_continued_run_keeps_its_params_and_names_those_the_new_config_changes(tmp_path):
    from mlflow.tracking import MlflowClient

    first = Tracker(sqlite_cfg(tmp_path), log=lambda m: None).start(run_key="results/a")
    first.log_params({"optim.lr": 0.1, "tune.metric": "val/acc1"})
    first.close(status="KILLED")
    lines: list[str] = []
    again = Tracker(sqlite_cfg(tmp_path), log=lines.append).start(run_key="results/a")
    again.log_params({"optim.lr": 0.1, "tune.metric": "val_ema/acc1", "train.ema": 0.98})
    assert again.close() == []  # nothing lost: a changed param is not a tracking failure
    said = "\n".join(lines)
    assert "tune.metric ('val/acc1', now 'val_ema/acc1')" in said and "optim.lr" not in said.split("other values")[1]
    params = MlflowClient(sqlite_cfg(tmp_path).tracking_uri).get_run(first.run_id).data.params
    assert params == {"optim.lr": "0.1", "tune.metric": "val/acc1", "train.ema": "0.98"}
