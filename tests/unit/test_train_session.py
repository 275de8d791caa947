"""The run lifecycle (imgcls_core.engine.session) on real digits: one owner, any host."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from imgcls_core.engine.session import HISTORY_FILE, read_history
from imgcls_core.runner import SUMMARY_FILE, train_and_evaluate


class RecordingHost:
    """A host that keeps what the session hands it (as a Ray worker would pass it on)."""

    def __init__(self, rank: int = 0):
        self.rank, self.lines, self.reports = rank, [], []

    def save(self, metrics, write):
        self.reports.append((dict(metrics), write is not None))

    def log(self, message):
        self.lines.append(message)


def _session(cfg, host):
    from imgcls_core.data import load_dataset
    from imgcls_core.data.loaders import build_loaders
    from imgcls_core.data.preprocessing import build_preprocessing
    from imgcls_core.engine import Engine, setup_runtime
    from imgcls_core.engine.session import RunData, TrainingSession
    from imgcls_core.models import build_model

    splits = load_dataset(cfg.data)
    pre = build_preprocessing(cfg, splits)
    loaders = build_loaders(cfg, splits, pre, which=("train", "val"))  # no test split asked for: none built
    assert set(loaders) == {"train", "val"}
    engine = Engine(cfg, build_model(cfg.model, len(pre.classes), cfg.data.image_size), setup_runtime(cfg.train),
                    len(loaders["train"]), rank=host.rank)  # world_size 1: nothing to all-reduce
    data = RunData(train=loaders["train"], val=loaders["val"])
    return TrainingSession(cfg, pre, engine, data, host, job="test")


def test_a_non_writing_rank_trains_and_reports_but_writes_nothing(tiny_config, tmp_path):
    from imgcls_core.tracking import Tracker

    cfg = tiny_config("train.epochs=2", f"train.output_dir={tmp_path / 'rank1'}")
    host = RecordingHost(rank=1)
    result = _session(cfg, host).run(Tracker(cfg.tracking))
    assert [int(m["epoch"]) for m, _ in host.reports] == [1, 2]
    assert not any(has_checkpoint for _, has_checkpoint in host.reports)  # rank 0 alone writes checkpoints
    assert result.val is not None and result.summary == {} and result.files == {}
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").iterdir())


def test_rank_zero_writes_the_same_files_as_the_local_runner(tiny_config, tmp_path):
    from imgcls_core.tracking import Tracker

    cfg = tiny_config("train.epochs=2", "train.ema_decay=0.9", f"train.output_dir={tmp_path / 'rank0'}")
    host = RecordingHost(rank=0)
    (tmp_path / "rank0").mkdir()
    result = _session(cfg, host).run(Tracker(cfg.tracking))
    assert [has_checkpoint for _, has_checkpoint in host.reports] == [True, True]
    assert [int(row["epoch"]) for row in read_history(tmp_path / "rank0")] == [1, 2]
    summary = json.loads((tmp_path / "rank0" / SUMMARY_FILE).read_text())
    assert summary["job"] == "test" and summary["epochs"] == 2 and summary["skipped_images"] == 0
    assert summary["used_ema"] == result.used_ema and summary["test_acc1"] is None  # no test split asked for
    # The epoch line is one definition: the EMA's figure is in it wherever the run is hosted.
    assert sum("val_ema/acc1" in line for line in host.lines) == 2


def test_resume_drops_history_lines_of_epochs_that_were_not_checkpointed(tiny_config):
    cfg = tiny_config("train.epochs=2")
    train_and_evaluate(cfg, log=lambda _: None, stop_after=1)
    out = tiny_config().train.output_dir
    history = f"{out}/{HISTORY_FILE}"
    rows = read_history(out)
    # A crash after epoch 2's line was written but before its checkpoint was committed:
    with open(history, "a") as fh:
        fh.write(json.dumps({**rows[0], "epoch": 2}) + "\n")
    result = train_and_evaluate(cfg, log=lambda _: None)
    assert result.resumed_from == 1
    assert [int(row["epoch"]) for row in read_history(out)] == [1, 2]


def test_a_second_run_on_the_same_output_dir_is_refused_at_once(tiny_config):
    from imgcls_core.engine.rundir import OutputDirInUse

    out = tiny_config().train.output_dir
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from imgcls_core.engine.rundir import lock_output_dir\n"
         f"lock = lock_output_dir({out!r}).__enter__(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(OutputDirInUse, match=f"{out} is in use by another run .*pid {holder.pid}"):
            train_and_evaluate(tiny_config("train.epochs=1"), log=lambda _: None)
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    result = train_and_evaluate(tiny_config("train.epochs=1"), log=lambda _: None)  # the OS freed the lock
    assert result.summary["epochs"] == 1


def test_weighted_sampler_is_refused_under_ray_train_with_the_alternative(tmp_path):
    from imgcls_core.config import load_config
    from jobs.train import plan_training

    cfg = load_config(None, [f"data.root={tmp_path}", "data.balance=weighted_sampler"])
    with pytest.raises(ValueError, match="weighted_sampler is not available under Ray Train.*weighted_loss"):
        plan_training(cfg, log=lambda _: None)


@pytest.mark.parametrize("requested", ["best", "last", "ema", "auto"])
def test_final_weights_ships_what_was_asked_and_records_it(tiny_config, tmp_path, requested):
    """train.final_weights: model.pt holds exactly the chosen weights (the best epoch's copy, the
    last epoch's raw ones, or their EMA), and model.pt, the summary and the log say which."""
    import torch

    from imgcls_core.tracking import Tracker

    out = tmp_path / requested
    out.mkdir()
    cfg = tiny_config("train.epochs=3", "train.ema_decay=0.9", f"train.final_weights={requested}",
                      f"train.output_dir={out}")
    host = RecordingHost(rank=0)
    session = _session(cfg, host)
    result = session.run(Tracker(cfg.tracking))
    engine = session.engine
    saved = torch.load(out / "model.pt", weights_only=True)
    weights = saved["weights"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["final_weights"] == weights == result.final_weights.to_dict()
    assert weights["requested"] == requested
    candidates = weights["val_score"]
    assert set(candidates) == {"last", "ema", "best"} if requested in ("best", "auto") else {"last", "ema"}
    if requested == "auto":
        top = max(candidates.values())
        assert candidates[weights["chosen"]] == top
        assert weights["chosen"] == next(w for w in ("ema", "last", "best") if candidates[w] == top)
    else:
        assert weights["chosen"] == requested
    expected = {"best": lambda: engine.best["model"], "last": engine.model.state_dict,
                "ema": engine.ema.module.state_dict}[weights["chosen"]]()
    assert all(torch.equal(saved["model"][k], expected[k].cpu()) for k in expected)
    if weights["chosen"] == "best":
        history = read_history(out)
        best_row = history[weights["epoch"] - 1]
        key = "val/acc1" if weights["source"] == "last" else "val_ema/acc1"
        assert best_row[key] == pytest.approx(candidates["best"]) == pytest.approx(max(
            max(r["val/acc1"], r["val_ema/acc1"]) for r in history))
    assert summary["used_ema"] == (weights["source"] == "ema")
    assert saved["metrics"]["val/acc1"] == pytest.approx(result.val.acc1)
    assert any(line.startswith(f"final weights: {weights['chosen']} ") for line in host.lines)


def test_bad_final_weights_and_schedule_settings_are_config_errors():
    from imgcls_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.final_weights: ema needs an EMA"):
        load_config(None, ["train.final_weights=ema"])
    with pytest.raises(ConfigError, match="optim.cosine_epochs: 0.0 must be > 0"):
        load_config(None, ["optim.schedule=cosine_plateau"])
    with pytest.raises(ConfigError, match="optim.cosine_epochs: 12.0 must be > 0 and at most"):
        load_config(None, ["optim.schedule=cosine_plateau", "optim.cosine_epochs=12", "train.epochs=10"])
    with pytest.raises(ConfigError, match="optim.plateau_metric"):
        load_config(None, ["optim.plateau_metric=f1"])
    assert load_config(None, ["optim.schedule=cosine_plateau", "optim.cosine_epochs=6",
                              "optim.min_lr_ratio=0.1"]).optim.cosine_epochs == 6


def test_a_run_writes_tensorboard_event_files_and_logs_them_to_mlflow(tiny_config, tmp_path):
    """Scalars per epoch (metrics and LR), the first augmented batch as images and the test
    confusion matrix, read back with TensorBoard's own reader; the folder is an MLflow artifact."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config("train.epochs=2", f"train.output_dir={tmp_path / 'tb'}", "tracking.enabled=true",
                      f"tracking.tracking_uri={uri}", "tracking.experiment=tb")
    result = train_and_evaluate(cfg, log=lambda _m: None)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/acc1", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/acc1")] == [1, 2]
    assert [e.value for e in events.Scalars("val/acc1")] == pytest.approx([r["val/acc1"] for r in read_history(
        tmp_path / "tb")])
    assert {"train/augmented_samples", "test/confusion_matrix"} <= {t.split("/image/")[0] for t in tags["images"]}
    artifacts = MlflowClient(uri).list_artifacts(result.mlflow_run_id, "tensorboard")
    assert any(a.path.startswith("tensorboard/events.out.tfevents") for a in artifacts), artifacts


def test_tensorboard_can_be_turned_off(tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=1", f"train.output_dir={tmp_path / 'off'}", "tracking.tensorboard=false")
    train_and_evaluate(cfg, log=lambda _m: None)
    assert (tmp_path / "off" / "model.pt").is_file() and not (tmp_path / "off" / "tensorboard").exists()


def test_a_resumed_session_hides_the_tensorboard_points_an_earlier_attempt_logged_past_its_start(tmp_path):
    """Epochs 1-3 logged, then a resume from the epoch-1 checkpoint logs 2-3 again: TensorBoard
    shows each step once, with the new attempt's values (purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from imgcls_core.tensorboard_log import TensorBoardLog

    first = TensorBoardLog(tmp_path, enabled=True)
    first.purge_step = 1
    for epoch in (1, 2, 3):
        first.scalars({"val/acc1": epoch / 10}, step=epoch)
    first.close()
    # TensorBoard reads a folder's event files in name order: <seconds>.<host>.<pid>.<a counter of
    # this process>; a new process (a resumed job) gets a later second, not a larger counter
    time.sleep(1.1)
    again = TensorBoardLog(tmp_path, enabled=True)
    again.purge_step = 2
    for epoch in (2, 3):
        again.scalars({"val/acc1": 0.5 + epoch / 10}, step=epoch)
    again.close()
    events = EventAccumulator(str(first.dir))
    events.Reload()
    seen = [(e.step, round(e.value, 3)) for e in events.Scalars("val/acc1")]
    assert seen == [(1, 0.1), (2, 0.7), (3, 0.8)]
