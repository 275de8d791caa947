"""model.pretrained from the config to a run: a missing file is refused before anything runs, an imgcls
model.pt gives its own normalization, and a run that resumes from its checkpoints no longer needs the file
(local runner, the Ray job's driver and a Ray Train worker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

MEAN, STD = [0.25, 0.3, 0.35], [0.2, 0.21, 0.22]  # not the digits' statistics, not ImageNet's


@pytest.fixture
def base_model(tmp_path, digits_root):
    """An imgcls model.pt (cnn3 at width 0.5 for the 10 digits) that records MEAN/STD as its normalization."""
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.checkpoint import save_inference_model
    from imgcls_core.models import create_model

    torch.manual_seed(0)
    classes = sorted(p.name for p in (Path(digits_root) / "train").iterdir())
    return save_inference_model(tmp_path / "base" / "model.pt", create_model("cnn3", 10, width=0.5).state_dict(),
                                {"name": "cnn3", "width": 0.5}, Preprocessing(32, MEAN, STD, 1.0, classes))


def test_a_missing_pretrained_file_is_refused_before_the_data_is_loaded(tiny_config, tmp_path):
    from imgcls_core.runner import train_and_evaluate

    lines: list[str] = []
    missing = tmp_path / "nonexistent.pt"
    with pytest.raises(FileNotFoundError, match=f"model.pretrained {missing} does not exist"):
        train_and_evaluate(tiny_config(f"model.pretrained={missing}"), log=lines.append)
    assert lines == []  # not even the data summary


def test_fine_tuning_from_an_imgcls_model_keeps_its_normalization_and_resumes_without_the_file(
        tiny_config, base_model):
    from imgcls_core.engine.checkpoint import load_checkpoint
    from imgcls_core.runner import train_and_evaluate

    cfg = tiny_config(f"model.pretrained={base_model}")
    lines: list[str] = []
    first = train_and_evaluate(cfg, log=lines.append, stop_after=1)
    assert f"pretrained weights: loaded 20 tensors from {base_model}; head fc loaded too (the file's has this " \
           f"run's number of classes)" in lines
    checkpoint = load_checkpoint(first.output_dir / "checkpoints" / "epoch_0001")
    assert checkpoint["preprocessing"]["mean"] == MEAN and checkpoint["preprocessing"]["std"] == STD

    base_model.unlink()  # the checkpoint holds every weight
    lines.clear()
    second = train_and_evaluate(cfg, log=lines.append)
    assert second.resumed_from == 1 and not any(line.startswith("pretrained weights") for line in lines)
    final = load_checkpoint(second.files["model"])
    assert final["preprocessing"]["mean"] == MEAN and final["preprocessing"]["std"] == STD  # as it trained


def test_the_ray_driver_refuses_a_missing_file_unless_the_run_resumes_and_keeps_its_normalization(
        tiny_config, base_model, tmp_path):
    from imgcls_core.data import load_dataset
    from imgcls_core.data.preprocessing import Preprocessing, build_preprocessing
    from imgcls_core.engine.checkpoint import save_checkpoint
    from jobs.common import resolve_config_paths
    from jobs.train import _resumed_preprocessing, check_data

    cfg = resolve_config_paths(tiny_config(f"model.pretrained={base_model}", f"ray.storage_path={tmp_path / 'ray'}"))
    check_data(cfg, "dataloader")
    assert build_preprocessing(cfg, load_dataset(cfg.data)).mean == MEAN  # the file's, not ImageNet's
    assert _resumed_preprocessing(cfg, print) is None  # the file is there: the config decides

    base_model.unlink()
    with pytest.raises(FileNotFoundError, match=f"model.pretrained {base_model} does not exist on the driver's"):
        check_data(cfg, "dataloader")
    # the run's own checkpoint, where Ray Train keeps it: <ray.storage_path>/<ray.name (output_dir's name)>
    pre = Preprocessing(32, MEAN, STD, 1.0, [str(i) for i in range(10)])
    save_checkpoint(tmp_path / "ray" / "run" / "checkpoint_2024-01-01_00-00-00.000000", {"epoch": 1},
                    cfg.to_dict(), pre)
    check_data(cfg, "dataloader")
    assert _resumed_preprocessing(cfg, print).mean == MEAN


def test_a_ray_train_worker_restoring_a_checkpoint_does_not_load_the_pretrained_file(
        tiny_config, base_model, tmp_path, monkeypatch):
    """train_loop_per_worker as one rank, with Ray Train's session calls answered here."""
    import ray.train
    import ray.train.torch

    from imgcls_core.data import load_dataset
    from imgcls_core.data.preprocessing import build_preprocessing
    from jobs.train_worker import train_loop_per_worker

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    reported, kept = [], tmp_path / "reported"

    def report(metrics, checkpoint=None):  # Ray would copy the folder into the run's storage
        reported.append(metrics)
        if checkpoint is not None:
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(checkpoint.path, kept)

    restart = {"checkpoint": None}
    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: restart["checkpoint"])
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))

    cfg = tiny_config(f"model.pretrained={base_model}", "ray.num_workers=1")
    pre = build_preprocessing(cfg, load_dataset(cfg.data))
    loop_config = {"config": cfg.to_dict(), "preprocessing": pre.to_dict(), "ingest": "dataloader",
                   "num_train": 0, "mlflow_run_id": None, "run_key": "test", "stop_after": 1, "register_as": None,
                   "job": "train"}
    train_loop_per_worker(loop_config)
    log = (Path(cfg.train.output_dir) / "train.log").read_text()
    assert f"pretrained weights: loaded 20 tensors from {base_model}" in log
    assert [int(m["epoch"]) for m in reported if "val/acc1" in m] == [1]

    base_model.unlink()
    restart["checkpoint"] = ray.train.Checkpoint.from_directory(str(kept))  # Ray restarts the worker group
    train_loop_per_worker({**loop_config, "stop_after": None})
    assert [int(m["epoch"]) for m in reported if "val/acc1" in m] == [1, 2]
