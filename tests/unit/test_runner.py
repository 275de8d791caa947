"""The local runner end to end on real digits: accuracy, exact resume, artifacts, prediction parity."""

import csv
import json
from pathlib import Path

import pytest
import torch

from imgcls_core.config import load_config
from imgcls_core.engine import load_checkpoint
from imgcls_core.engine.checkpoint import CheckpointDir
from imgcls_core.predict import Predictor
from imgcls_core.runner import SUMMARY_FILE, train_and_evaluate

# Everything that draws random numbers during training is on: shuffling, augmentation,
# MixUp/CutMix, dropout, and the EMA that follows the weights.
RANDOM_EVERYWHERE = [
    "augment.strength=0.5",
    "augment.mixup_alpha=0.2",
    "augment.cutmix_alpha=0.2",
    "model.dropout=0.2",
    "train.ema_decay=0.9",
    "optim.warmup_epochs=1",
    "train.epochs=4",
    "train.deterministic=true",
]


def _final_state(output_dir):
    return load_checkpoint(CheckpointDir(output_dir / "checkpoints").latest())


def test_resume_is_exact_four_epochs_equal_two_plus_two(tiny_config, tmp_path):
    straight = tiny_config(*RANDOM_EVERYWHERE, f"train.output_dir={tmp_path / 'straight'}")
    train_and_evaluate(straight, log=lambda _: None)

    split = tiny_config(*RANDOM_EVERYWHERE, f"train.output_dir={tmp_path / 'split'}")
    first = train_and_evaluate(split, log=lambda _: None, stop_after=2)
    assert [int(m["epoch"]) for m in first.history] == [1, 2]
    assert first.summary == {} and not (tmp_path / "split" / SUMMARY_FILE).exists()  # not finished yet
    lines = []
    second = train_and_evaluate(split, log=lines.append)
    assert second.resumed_from == 2
    assert any("resuming from epoch 2" in line for line in lines)
    assert [int(m["epoch"]) for m in second.history] == [3, 4]
    summary = json.loads((tmp_path / "split" / SUMMARY_FILE).read_text())
    assert summary["epochs"] == 4 and summary["resumed_from"] == 2 and summary["mlflow_run_id"] is None
    assert summary["model_file"] == str(tmp_path / "split" / "model.pt")

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


@pytest.mark.parametrize("log_every, crash_at", [(7, "epoch 2, step 14"), (19, "epoch 1, step 19")],
                         ids=["inside the epoch", "at its last step"])
def test_a_mid_epoch_resume_continues_exactly_as_the_run_that_wrote_the_checkpoint(tiny_config, tmp_path, log_every,
                                                                                      crash_at):
    """Every random draw on, a checkpoint every log_every steps (19 steps an epoch): a run killed right after a
    mid-epoch checkpoint and resumed ends with the same weights, EMA and epoch metrics as the run that was not
    killed, also from a checkpoint at an epoch's last step (whose resume skips the whole pass)."""
    settings = [*RANDOM_EVERYWHERE, "train.epochs=2", "train.checkpoint_every_minutes=0.000001",
                f"train.log_every={log_every}"]

    class Crash(Exception):
        pass

    def crash(line: str) -> None:
        if line.startswith(f"mid-epoch checkpoint: {crash_at}"):
            raise Crash(line)

    straight = train_and_evaluate(tiny_config(*settings, f"train.output_dir={tmp_path / 'straight'}"),
                                  log=lambda _: None)
    killed = tiny_config(*settings, f"train.output_dir={tmp_path / 'killed'}")
    with pytest.raises(Crash):
        train_and_evaluate(killed, log=crash)
    lines: list[str] = []
    resumed = train_and_evaluate(killed, log=lines.append)
    assert any(line.startswith("resuming from epoch") for line in lines), lines
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after a mid-epoch resume"
    for metric in ("train/loss", "train/acc1", "val/acc1"):
        assert resumed.history[-1][metric] == straight.history[-1][metric], metric


def test_a_data_loader_with_worker_processes_resumes_exactly_too(tiny_config, tmp_path):
    """Augmentation in DataLoader workers: the workers start anew every epoch, seeded after the epoch's
    reseed, so an epoch-boundary resume replays their draws (persistent workers seeded once did not)."""
    settings = [*RANDOM_EVERYWHERE, "train.epochs=2", "data.num_workers=1"]
    train_and_evaluate(tiny_config(*settings, f"train.output_dir={tmp_path / 'straight'}"), log=lambda _: None)
    split = tiny_config(*settings, f"train.output_dir={tmp_path / 'split'}")
    train_and_evaluate(split, log=lambda _: None, stop_after=1)
    train_and_evaluate(split, log=lambda _: None)
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert all(torch.equal(tensor, b["model"][name]) for name, tensor in a["model"].items())


def test_a_torn_history_line_or_an_epoch_without_checkpoint_is_trained_again_and_listed_once(tiny_config):
    """history.jsonl after a crash: a last line cut short (a kill or a full disk mid-append) and the lines of
    epochs that no checkpoint covers are dropped when the run resumes, so every epoch is listed once."""
    from imgcls_core.engine.session import HISTORY_FILE

    cfg = tiny_config("train.epochs=3", "train.checkpoint_every_epochs=3")
    out = Path(cfg.train.output_dir)

    class Crash(Exception):
        pass

    def crash(line: str) -> None:
        if line.startswith("epoch 2/3"):  # epochs 1 and 2 listed, no checkpoint yet (every 3 epochs)
            raise Crash(line)

    with pytest.raises(Crash):
        train_and_evaluate(cfg, log=crash)
    with (out / HISTORY_FILE).open("a") as fh:
        fh.write('{"epoch": 3, "train/lo')  # torn
    train_and_evaluate(cfg, log=lambda _: None)
    assert [json.loads(line)["epoch"] for line in (out / HISTORY_FILE).read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_changed_training_settings_and_keeps_the_runs_config(tiny_config):
    """A resumed run keeps its checkpoint's optimizer, LR schedule and EMA: other settings for them are
    refused (they would not apply), as is train.resume=false over a run's checkpoints; the refused
    attempt leaves the run's config.yaml as the run trained with."""
    first = tiny_config("train.epochs=2")
    train_and_evaluate(first, log=lambda _: None, stop_after=1)
    written = (Path(first.train.output_dir) / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"other training settings \(optim.lr 0.1 -> 0.01; train.epochs 2 -> 4\)"):
        train_and_evaluate(tiny_config("train.epochs=4", "optim.lr=0.01"), log=lambda _: None)
    with pytest.raises(ValueError, match="different model config"):
        train_and_evaluate(tiny_config("model.width=1.0"), log=lambda _: None)
    with pytest.raises(ValueError, match="train.resume is false, but .* holds a run's checkpoints"):
        train_and_evaluate(tiny_config("train.resume=false"), log=lambda _: None)
    assert (Path(first.train.output_dir) / "config.yaml").read_text() == written
    assert train_and_evaluate(first, log=lambda _: None).resumed_from == 1


def test_a_checkpoint_without_loss_scaling_resumes_under_fp16():
    """GradScaler keeps no state without fp16 (bf16, fp32): such a checkpoint resumes where amp picks fp16
    (amp auto on another GPU kind), with a fresh scaler, instead of failing on the empty state."""
    from imgcls_core.engine import Engine
    from imgcls_core.engine.runtime import Runtime
    from imgcls_core.models import create_model

    cfg = load_config(None, ["model.name=cnn3", "model.width=0.25"])
    model = create_model("cnn3", 10, width=0.25)
    plain = Engine(cfg, model, Runtime(torch.device("cpu"), None, False, False), steps_per_epoch=4)
    scaled = Engine(cfg, create_model("cnn3", 10, width=0.25), Runtime(torch.device("cpu"), None, True, False),
                    steps_per_epoch=4)
    state = plain.state_dict()
    assert state["scaler"] == {}
    scaled.load_state_dict(state)
    assert scaled.scaler.is_enabled() and scaled.scaler.get_scale() == 65536.0


def test_finished_run_is_not_retrained(tiny_config):
    cfg = tiny_config("train.epochs=1")
    train_and_evaluate(cfg, log=lambda _: None)
    again = train_and_evaluate(cfg, log=lambda _: None)
    assert again.history == [] and again.resumed_from == 1
    assert again.test is not None


def test_mid_epoch_checkpoint_resumes_inside_the_epoch(tiny_config):
    # batch 64 over 1,259 images: 19 steps an epoch; a checkpoint every 5 steps (any minutes > 0).
    cfg = tiny_config("train.checkpoint_every_minutes=0.000001")

    class Crash(Exception):
        pass

    def crash_in_epoch_two(line: str) -> None:
        if line.startswith("mid-epoch checkpoint: epoch 2, step 10"):
            raise Crash(line)

    with pytest.raises(Crash):
        train_and_evaluate(cfg, log=crash_in_epoch_two)
    lines: list[str] = []
    resumed = train_and_evaluate(cfg, log=lines.append)
    assert any(line.startswith("resuming from epoch 1, step 10 of epoch 2") for line in lines), lines
    assert [int(m["epoch"]) for m in resumed.history] == [2]
    # Only the epoch's remaining 9 steps ran: no step of epoch 2 was trained twice.
    assert resumed.history[-1]["step"] == 2 * 19
    assert load_checkpoint(CheckpointDir(cfg.train.output_dir + "/checkpoints").latest())["epoch_step"] == 0


def test_resume_with_a_different_model_is_refused(tiny_config):
    train_and_evaluate(tiny_config("train.epochs=1"), log=lambda _: None)
    with pytest.raises(ValueError, match="different model config"):
        train_and_evaluate(tiny_config("train.epochs=2", "model.width=1.0"), log=lambda _: None)


def test_artifacts_and_offline_predictions_agree(tiny_config, digits_root):
    result = train_and_evaluate(tiny_config("train.epochs=3"), log=lambda _: None)
    out = result.output_dir
    for name in ("model.pt", "test_metrics.json", "test_report.txt", "confusion_matrix.png",
                 "predictions.csv", "history.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.test.acc1 > 0.8  # 3 epochs of a tiny CNN; chance is 0.1

    rows = list(csv.DictReader((out / "predictions.csv").open()))[:32]
    predictor = Predictor.from_file(out / "model.pt")
    answers = predictor.classify([r["path"] for r in rows], top_k=3)
    assert [a[0]["index"] for a in answers] == [int(r["pred"]) for r in rows]
    assert all(len(a) == 3 and a[0]["probability"] >= a[1]["probability"] for a in answers)


def test_tracked_local_run_is_an_mlflow_run_like_a_ray_jobs(tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from imgcls_core.data import load_dataset

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config("tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=local")
    result = train_and_evaluate(cfg, log=lambda _: None)
    summary = json.loads((result.output_dir / SUMMARY_FILE).read_text())
    run_id = result.mlflow_run_id
    assert run_id and summary["mlflow_run_id"] == run_id and summary["model_uri"] and summary["epochs"] == 2
    assert summary["test_acc1"] == pytest.approx(result.test.acc1)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["imgcls.job"] == "train_local"
    params = run.data.params
    assert params["model.name"] == "cnn3" and params["train.epochs"] == "2"
    assert params["derived.num_train_images"] == str(len(load_dataset(cfg.data).train))
    assert not any(key.startswith(("serve.", "distill.")) for key in params)
    assert [m.step for m in client.get_metric_history(run_id, "val/acc1")] == [1, 2]
    assert run.data.metrics["test/acc1"] == pytest.approx(result.test.acc1)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "class_index.json", "test_metrics.json", "confusion_matrix.png", "predictions.csv",
            "learning_curves.png"} <= artifacts, artifacts

    def logged_models() -> int:
        found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run_id}'")
        return len(found)

    assert logged_models() == 1
    again = train_and_evaluate(cfg, log=lambda _: None)  # finished: only re-evaluated
    assert again.history == [] and again.mlflow_run_id == run_id
    assert logged_models() == 1 and client.get_run(run_id).info.status == "FINISHED"

    # Evaluated again shipping other weights: model.pt changes, so MLflow gets that model too
    other = "last" if summary["final_weights"]["chosen"] != "last" else "best"
    train_and_evaluate(tiny_config("tracking.enabled=true", f"tracking.tracking_uri={uri}", "tracking.experiment=local",
                                   f"train.final_weights={other}"), log=lambda _: None)
    resummed = json.loads((result.output_dir / SUMMARY_FILE).read_text())
    assert resummed["final_weights"]["chosen"] == other and resummed["model_uri"] != summary["model_uri"]
    assert logged_models() == 2


@pytest.mark.slow
def test_default_digits_config_reaches_98_5_percent(digits_root, tmp_path):
    cfg = load_config("configs/digits.yaml", [f"data.root={digits_root}", f"train.output_dir={tmp_path}"])
    result = train_and_evaluate(cfg, log=print)
    print(f"default digits config: test top-1 {result.test.acc1:.4f} in {result.seconds:.1f}s")
    assert result.test.acc1 >= 0.985
