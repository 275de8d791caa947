"""jobs.tune and jobs.promote on a real local Ray instance, a real MLflow sqlite store and real digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls_core.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def sweep_args(tmp_path, mlflow_uri, digits_root, *extra: str) -> list[str]:
    return [
        "data.format=imagefolder", f"data.root={digits_root}", "data.batch_size=32",
        "model.name=cnn3", "model.width=0.5", "augment.strength=0", "optim.lr=0.05",
        "train.epochs=2", "train.log_every=50",
        f"train.output_dir={tmp_path / 'out'}", f"ray.storage_path={tmp_path / 'results'}",
        "ray.name=digits", "ray.num_workers=1", "ray.ingest=dataloader",
        "tracking.enabled=true", f"tracking.tracking_uri={mlflow_uri}", "tracking.experiment=tune-tests",
        "tune.space=lr_schedules", *extra,
    ]


def sweep_config(tmp_path, mlflow_uri, digits_root, *extra: str):
    return load_config(None, sweep_args(tmp_path, mlflow_uri, digits_root, *extra))


def test_asha_sweep_then_promotion_gate(ray_session, digits_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from imgcls_core.registry import CHALLENGER, CHAMPION, Registry
    from jobs.promote import promote
    from jobs.train import run_training
    from jobs.tune import run_sweep

    cfg = sweep_config(tmp_path, mlflow_uri, digits_root, "tune.num_samples=4", "tune.scheduler=asha",
                       "tune.grace_period=1")
    summary = run_sweep(cfg)

    assert summary["trials"] == 4 and summary["errors"] == 0, summary
    assert summary["best_metric"] >= 0.85, summary  # 2 epochs of a tiny CNN; the worst LR draws stay lower
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("tune-tests")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("imgcls.job") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert len(parents) == 1 and len(children) == 4
    # trials ASHA stopped ended their runs too (Tune kills a stopped trial's process before it can)
    finished = summary["epochs_run"] == 4 * 2
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}, [c.info.status for c in children]
    assert finished or any(c.info.status == "KILLED" for c in children)
    assert parents[0].data.params["sweep.scheduler"] == "asha"
    assert parents[0].data.params["space.optim.lr"].startswith("loguniform")
    artifacts = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"sweep_results.csv", "best_config.yaml", "sweep_curves.png", "space"} <= artifacts
    for child in children:  # per-epoch metrics in every trial's run
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val/acc1")][0] == 1
    # The best trial's config is a jobs.train config, unchanged, holding the best trial's values.
    best = load_config(summary["best_config"])
    assert best.optim.lr == pytest.approx(summary["best_sample"]["optim.lr"])
    assert best.optim.schedule == summary["best_sample"]["optim.schedule"]

    # Promotion 1: the sweep's best trial becomes version 1 and champion (there was none).
    first = promote(cfg, model_name="digits-tune")
    assert (first.version, first.promoted, first.new_version) == ("1", True, True)
    registry = Registry(mlflow_uri, "digits-tune")
    assert str(registry.alias(CHAMPION).version) == "1"
    tags = registry.client.get_model_version("digits-tune", "1").tags
    assert float(tags["test/acc1"]) == pytest.approx(first.challenger_acc1)
    assert tags["imgcls.sweep"] == summary["sweep"] and len(tags["imgcls.test_data_sha256"]) == 64

    # Promotion 2: a worse model (1 epoch at a tiny LR) is registered as challenger; champion stays.
    weak_cfg = load_config(None, sweep_args(tmp_path / "weak", mlflow_uri, digits_root, "train.epochs=1",
                                            "optim.lr=0.0005", "ray.name=weak"))
    weak = run_training(weak_cfg)
    second = promote(cfg, model_name="digits-tune", run_id=weak["mlflow_run_id"])
    assert second.version == "2" and not second.promoted
    assert second.challenger_acc1 < second.champion_acc1
    assert str(registry.alias(CHAMPION).version) == "1" and str(registry.alias(CHALLENGER).version) == "2"

    # Re-running the first promotion creates no new version.
    again = promote(cfg, model_name="digits-tune")
    assert again.version == "1" and not again.new_version and "champion already" in again.reason
    assert len(registry.client.search_model_versions("name = 'digits-tune'")) == 2

    # --force --reason moves champion and records why.
    forced = promote(cfg, model_name="digits-tune", run_id=weak["mlflow_run_id"], force_reason="rollback drill")
    assert forced.promoted and str(registry.alias(CHAMPION).version) == "2"
    tags = registry.client.get_model_version("digits-tune", "2").tags
    assert tags["imgcls.promotion_reason"] == "forced: rollback drill"


def test_pbt_exploits_a_stronger_trial(ray_session, digits_root, tmp_path, mlflow_uri):
    from jobs.tune import run_sweep

    space = tmp_path / "pbt_space.yaml"
    # Two very different LRs: after epoch 1 the weak trial copies the strong one's checkpoint
    # (synchronous PBT: both trials report epoch 1 before it decides).
    space.write_text("optim.lr: {grid: [0.0005, 0.1]}\naugment.strength: {uniform: [0.0, 0.5]}\n")
    cfg = sweep_config(tmp_path, mlflow_uri, digits_root, f"tune.space={space}", "tune.scheduler=pbt",
                       "tune.num_samples=1", "tune.perturbation_interval=1", "tune.quantile_fraction=0.5",
                       "tune.pbt_synch=true", "train.epochs=2", "optim.schedule=constant",
                       "tune.max_concurrent_trials=2")
    summary = run_sweep(cfg)

    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    assert summary["pbt_exploits"] >= 1, summary
    import pandas as pd

    table = pd.read_csv(summary["results"])
    assert (table["epoch"] == 2).all()
    histories = [pd.read_csv(path) for path in (tmp_path / "results").glob(f"{summary['sweep']}/*/progress.csv")]
    exploited = [h for h in histories if h["pbt/exploited"].max() == 1]
    assert exploited, "no trial reports an exploit"
    history = exploited[0]
    row = history.index[history["pbt/exploited"] == 1][0]
    # After the exploit the trial trains with the stronger trial's strength, perturbed ...
    assert history["pbt/augment.strength"][row] != pytest.approx(history["pbt/augment.strength"][0])
    assert 0.0 <= history["pbt/augment.strength"][row] <= 0.5
    # ... starting from its weights: its accuracy jumps above what its own LR reached.
    assert history["val/acc1"][row] > history["val/acc1"][0]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, ray_dashboard_url, digits_root,
                                                                     tmp_path, mlflow_uri):
    """The sweep's driver is killed (SIGKILL) after its first trial finished; the same command resumes."""
    from jobs.tune import run_sweep

    space = tmp_path / "two_lrs.yaml"
    space.write_text("optim.lr: {grid: [0.03, 0.1]}\n")
    extra = [f"tune.space={space}", "tune.num_samples=1", "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
             "train.epochs=1", "tune.name=resume-me"]
    args = sweep_args(tmp_path, mlflow_uri, digits_root, *extra)
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "jobs.tune", "--address", address, *[a for kv in args for a in ("--set", kv)]]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1",
                                   "RAY_API_SERVER_ADDRESS": ray_dashboard_url})
    trials = tmp_path / "out" / "trials"
    deadline = time.monotonic() + 300
    while not list(trials.glob("*/train_summary.json")):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial did not finish in time"
        time.sleep(1)
    time.sleep(5)  # Tune records the finished trial in its experiment state
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    finished = next(trials.glob("*/train_summary.json")).parent
    packaged = (finished / "train_summary.json").stat().st_mtime_ns
    time.sleep(2)  # let Ray notice the driver is gone and release its trials' resources

    cfg = load_config(None, args)
    summary = run_sweep(cfg)
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    # The finished trial was not run again. A re-run would resume from the trial's last checkpoint
    # with nothing left to train (no second "epoch 1/1" line), so look for what any start leaves:
    # each start of its workers logs the model line, a resumed one "resuming from epoch", and a
    # run that reaches the end packages the model again (train_summary.json).
    log_text = (finished / "train.log").read_text()
    assert log_text.count("epoch 1/1 ") == 1, log_text
    assert log_text.count(" model=") == 1 and "resuming from epoch" not in log_text, log_text
    assert len((finished / "history.jsonl").read_text().splitlines()) == 1
    assert (finished / "train_summary.json").stat().st_mtime_ns == packaged, "the finished trial was packaged again"
    summaries = [json.loads(p.read_text()) for p in trials.glob("*/train_summary.json")]
    assert len(summaries) == 2


def test_a_sweep_tracked_in_another_store_starts_over_and_its_best_trial_can_be_promoted(ray_session, digits_root,
                                                                                          tmp_path, mlflow_uri):
    """The same sweep again with a new MLflow store (as `make demo` with a new state folder): the
    finished trials' runs are not in that store, so resuming would leave nothing to promote. The
    old sweep is renamed aside, kept, and a new one runs with its runs in the new store."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from jobs.promote import candidate_run
    from jobs.tune import run_sweep

    space = tmp_path / "one_lr.yaml"
    space.write_text("optim.lr: {grid: [0.05]}\n")
    extra = (f"tune.space={space}", "tune.num_samples=1", "tune.scheduler=fifo", "train.epochs=1",
             "tune.name=moved")
    first = run_sweep(sweep_config(tmp_path, mlflow_uri, digits_root, *extra))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    lines: list[str] = []
    cfg = sweep_config(tmp_path, other, digits_root, *extra)
    second = run_sweep(cfg, log=lines.append)

    assert any("tracked in another MLflow store" in line for line in lines), lines
    assert not any(line.startswith("resuming sweep") for line in lines), lines
    kept = list((tmp_path / "results").glob("moved.other-store-*"))
    assert len(kept) == 1 and tune.Tuner.can_restore(str(kept[0])), kept  # the old sweep, whole
    assert second["trials"] == 1 and second["errors"] == 0 and second["best_trial"] != first["best_trial"], second
    run_id, tags = candidate_run(cfg, None)
    run = MlflowClient(other).get_run(run_id)  # the run promote registers is in the store configured now
    assert run.data.tags["mlflow.parentRunId"] == second["parent_run_id"] == tags["imgcls.sweep_run_id"]

    lines.clear()  # once more with the same store: resumed, nothing set aside or run again
    third = run_sweep(cfg, log=lines.append)
    assert any(line.startswith("resuming sweep moved") for line in lines), lines
    assert len(list((tmp_path / "results").glob("moved.other-store-*"))) == 1
    assert third["best_trial"] == second["best_trial"] and third["parent_run_id"] == second["parent_run_id"]
    assert third["epochs_run"] == second["epochs_run"] == 1, third

    # Once more with other settings: refused, before the sweep's run is touched (it stays FINISHED).
    with pytest.raises(ValueError, match=r"sweep moved in .* was started with other settings \(train\.epochs 1 -> 2\)"):
        run_sweep(sweep_config(tmp_path, other, digits_root, *extra, "train.epochs=2"))
    assert MlflowClient(other).get_run(second["parent_run_id"]).info.status == "FINISHED"


def test_bad_search_space_fails_before_any_trial(tmp_path, capsys):
    from jobs.tune import main

    space = tmp_path / "bad.yaml"
    space.write_text("optim.lr: {loguniform: [0.5, 0.01]}\n")
    assert main(["--set", f"tune.space={space}", "--set", f"train.output_dir={tmp_path / 'o'}"]) == 2
    assert "low (0.5) must be less than high (0.01)" in capsys.readouterr().err
    space.write_text("optim.lrr: {loguniform: [0.01, 0.5]}\n")
    assert main(["--set", f"tune.space={space}"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
