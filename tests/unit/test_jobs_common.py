"""Path resolution and the submit wrapper's runtime_env (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

from imgcls_core.config import load_config
from jobs.common import BASE_DIR_ENV, resolve_config_paths, resolve_path
from jobs.submit import REPO, main, ray_cli, runtime_env


def test_relative_paths_resolve_against_the_base_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(BASE_DIR_ENV, str(tmp_path))
    cfg = resolve_config_paths(load_config(None, ["data.root=data/x", "ray.storage_path=s3://bucket/runs",
                                                 "train.output_dir=/abs/out"]))
    assert cfg.data.root == str(tmp_path / "data" / "x")
    assert cfg.ray.storage_path == "s3://bucket/runs"  # URIs untouched
    assert cfg.train.output_dir == "/abs/out"


def test_without_base_dir_paths_resolve_against_the_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv(BASE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("results") == str(tmp_path / "results")


def test_runtime_env_uploads_code_only_and_points_at_this_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = runtime_env(tmp_path)
    assert env["working_dir"] == str(REPO)
    assert {".git", ".venv", "data", "results", "mlruns"} <= set(env["excludes"])
    assert env["env_vars"] == {BASE_DIR_ENV: str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    assert Path(REPO / "jobs" / "train.py").is_file()


def test_submit_needs_an_entrypoint_after_the_separator(capsys):
    assert main(["--address", "http://127.0.0.1:1"]) == 2
    assert "after --" in capsys.readouterr().err


def test_train_job_refuses_missing_data_and_unwritable_storage(tmp_path):
    import pytest

    from jobs.train import plan_training

    missing = load_config(None, ["data.format=imagefolder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="data.root .*nope does not exist"):
        plan_training(missing, log=lambda m: None)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = load_config(None, [f"ray.storage_path={blocker / 'sub'}", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="ray.storage_path .* is not writable"):
        plan_training(unwritable, log=lambda m: None)


def test_ray_data_ingest_needs_parquet(tmp_path):
    import pytest

    from jobs.train import plan_training

    cfg = load_config(None, ["data.format=imagefolder", f"data.root={tmp_path}", "ray.ingest=ray_data"])
    with pytest.raises(ValueError, match="ray.ingest=ray_data reads Parquet shards.*jobs.prepare"):
        plan_training(cfg, log=lambda m: None)


def test_the_ray_cli_is_the_one_beside_this_python():
    import sys

    assert ray_cli() == str(Path(sys.executable).parent / "ray")  # no activated venv needed
