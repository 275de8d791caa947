"""Path resolution and the submit wrapper's runtime_env (no Ray needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imgcls_core.config import load_config
from jobs.common import BASE_DIR_ENV, resolve_config_paths, resolve_path
from jobs.submit import REPO, main, runtime_env


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


def test_a_home_relative_path_is_expanded_not_joined_to_the_base(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(BASE_DIR_ENV, str(tmp_path / "base"))
    assert resolve_path("~/data/x") == str(tmp_path / "home" / "data" / "x")
    assert resolve_path("file://~/x") == "file://~/x"  # URIs untouched


def test_runtime_env_uploads_code_only_and_points_at_this_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = runtime_env(tmp_path)
    assert env["working_dir"] == str(REPO)
    assert {"/.git", "/.venv", "/venv", "/data", "/results", "/mlruns"} <= set(env["excludes"])
    assert env["env_vars"] == {BASE_DIR_ENV: str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
                               "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
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


SOURCE_FOLDERS = ("imgcls_core", "jobs", "serve", "tune_spaces", "configs")
LEFT_OUT = ("data", ".venv", "runs", "results", ".git", "mlruns", ".imgcls")


def test_the_job_upload_holds_all_source_and_no_data(tmp_path):
    """The working_dir zip that `ray job submit` uploads, built by Ray's own packaging code from a
    copy of this checkout with run outputs planted where users have them."""
    import shutil
    import subprocess
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "repo"
    for rel in tracked:
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tree / rel)
    for folder in LEFT_OUT:
        (tree / folder / "sub").mkdir(parents=True, exist_ok=True)
        (tree / folder / "sub" / "file.bin").write_bytes(b"x")
    package = tmp_path / "upload.zip"
    create_package(str(tree), package, include_gitignore=True, excludes=runtime_env(tmp_path)["excludes"])
    uploaded = set(zipfile.ZipFile(package).namelist())

    source = {rel for rel in tracked if rel.split("/")[0] in SOURCE_FOLDERS}
    assert any(rel.startswith("imgcls_core/data/") for rel in source)  # the folder a bare `data` dropped
    assert source - uploaded == set()
    for folder in LEFT_OUT:
        assert not [name for name in uploaded if name.startswith(f"{folder}/")], folder


def test_an_http_ray_address_means_the_cluster_on_this_machine(monkeypatch):
    from jobs.common import ray_init_address

    lines = []
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert ray_init_address(None, lines.append) == "auto"
    assert "dashboard address" in lines[0] and "auto" in lines[0]
    assert ray_init_address("127.0.0.1:6380", lines.append) == "127.0.0.1:6380"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_init_address(None) is None  # a new local instance


def test_a_remote_dashboard_address_is_refused_with_what_to_set(monkeypatch):
    import pytest

    from jobs.common import ray_init_address

    with pytest.raises(ValueError, match="RAY_ADDRESS to the head's cluster address .*10.0.0.5:6379"):
        ray_init_address("http://10.0.0.5:8265")


def test_submit_goes_to_the_api_server_address_before_a_cluster_address(monkeypatch):
    from jobs.common import dashboard_address

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9999")
    assert dashboard_address() == "http://127.0.0.1:9999"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert dashboard_address() == "http://127.0.0.1:8265"  # a GCS address is not for job submission
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert dashboard_address() == "http://10.0.0.5:8265"


def _ray_cfg(*overrides: str):
    return load_config(None, ["data.format=parquet", *overrides])


def test_ray_data_ingest_that_would_starve_falls_back_to_a_dataloader_when_auto():
    from jobs.common import fit_to_cluster

    lines = []
    cfg = _ray_cfg("ray.num_workers=2")
    assert fit_to_cluster(cfg, "ray_data", {"CPU": 2.0}, log=lines.append) == "dataloader"
    assert "reserve 2 of the cluster's 2 CPU, leaving 0" in lines[0] and "DataLoader" in lines[0]
    assert fit_to_cluster(cfg, "ray_data", {"CPU": 3.0}, log=lines.append) == "ray_data"


def test_explicit_ray_data_ingest_that_cannot_run_stops_with_the_numbers():
    import pytest

    from jobs.common import ResourceError, fit_to_cluster

    cfg = _ray_cfg("ray.num_workers=2", "ray.ingest=ray_data")
    with pytest.raises(ResourceError, match=r"leaving 0 .*need 1.*set ray.ingest=dataloader"):
        fit_to_cluster(cfg, "ray_data", {"CPU": 2.0})
    with pytest.raises(ResourceError, match=r"3 trials x .*lower tune.max_concurrent_trials"):
        fit_to_cluster(cfg, "ray_data", {"CPU": 7.0}, trials=3)


def test_workers_that_do_not_fit_are_refused_unless_the_cluster_autoscales():
    import pytest

    from jobs.common import ResourceError, fit_to_cluster

    cfg = _ray_cfg("ray.num_workers=4", "ray.use_gpu=true")
    with pytest.raises(ResourceError, match="need 4 CPU .* cluster has 2: lower ray.num_workers"):
        fit_to_cluster(cfg, "dataloader", {"CPU": 2.0})
    with pytest.raises(ResourceError, match="need 4 GPU .* cluster has 1"):
        fit_to_cluster(cfg, "dataloader", {"CPU": 8.0, "GPU": 1.0})
    cfg.ray.autoscaling = True
    assert fit_to_cluster(cfg, "ray_data", {"CPU": 2.0}) == "ray_data"


def test_sweep_concurrency_leaves_a_cpu_per_trial_for_ray_data():
    from jobs.tune import concurrent_trials

    cfg = _ray_cfg("ray.num_workers=1", "tune.in_trial=false")  # each trial drives a TorchTrainer
    assert concurrent_trials(cfg, {"CPU": 4.0}, "dataloader") == 3  # 1.1 CPU a trial
    assert concurrent_trials(cfg, {"CPU": 4.0}, "ray_data") == 1  # 2.1 CPU a trial


def test_one_worker_trials_train_in_the_trial_and_reserve_the_workers_resources():
    from jobs.tune import concurrent_trials, trains_in_trial, trial_resources

    cfg = _ray_cfg("ray.num_workers=1", "ray.cpus_per_worker=2")
    assert trains_in_trial(cfg) and trial_resources(cfg) == {"CPU": 2.0}
    assert concurrent_trials(cfg, {"CPU": 4.0}, "dataloader") == 2  # no driver sliver on top
    for other in ("ray.num_workers=2", "tune.scheduler=pbt", "tune.in_trial=false"):
        assert not trains_in_trial(_ray_cfg("ray.num_workers=1", other)), other
        assert trial_resources(_ray_cfg("ray.num_workers=1", other)) == {"CPU": 0.1}


def test_init_ray_starts_local_instances_with_workers_at_niceness_zero(monkeypatch):
    import ray

    from jobs.common import WORKER_NICENESS_ENV, init_ray

    seen = {}
    monkeypatch.delenv(WORKER_NICENESS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("env", os.environ.get(WORKER_NICENESS_ENV)))
    init_ray()
    assert seen["env"] == "0"
    monkeypatch.setenv(WORKER_NICENESS_ENV, "5")  # a user's own choice stays
    seen.clear()
    init_ray()
    assert seen["env"] == "5"


def test_only_an_instance_of_this_process_drains_stopping_replicas_briefly(monkeypatch):
    """A one-node instance started by ray.init holds stopping replicas open 2 s (serve.delete and
    serve.shutdown wait that long), a cluster keeps Serve's 30 s for its load balancers, and a
    user's own value stays."""
    import ray

    from jobs.common import SERVE_DRAIN_ENV, init_ray

    key, short = SERVE_DRAIN_ENV
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get(key)))
    for address, expected in (("127.0.0.1:6379", None), (None, short)):
        monkeypatch.delenv(key, raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        init_ray(address, log=lambda _line: None)
        assert seen.pop() == expected, address
    monkeypatch.setenv(key, "7")
    init_ray(None, log=lambda _line: None)
    assert seen.pop() == "7"


def test_local_cluster_env_sets_worker_niceness():
    env = (REPO / "cluster" / "local" / "env.sh").read_text()
    assert 'export RAY_worker_niceness="${RAY_worker_niceness:-0}"' in env


def test_following_a_job_ends_when_ray_marks_it_finished_and_prints_every_line_once():
    """jobs.submit.follow against a stand-in for Ray's JobSubmissionClient (the real one is driven in
    tests/integration/test_job_submit.py): the log stream delivers part of the log and then hangs, as
    Ray's does for seconds after a job ends; follow returns once the status is final, printing the
    undelivered rest from the whole log, with no line twice."""
    import asyncio
    import io

    from ray.job_submission import JobStatus

    from jobs.submit import follow

    log = "Running entrypoint\nepoch 1/2\nepoch 2/2\ndone\n"

    class Client:
        polls = 0

        async def tail_job_logs(self, job_id):
            yield log[:30]
            await asyncio.sleep(3600)  # Ray's stream lags the job's end

        def get_job_status(self, job_id):
            self.polls += 1
            return JobStatus.RUNNING if self.polls < 3 else JobStatus.SUCCEEDED

        def get_job_logs(self, job_id):
            return log

    out = io.StringIO()
    status = asyncio.run(asyncio.wait_for(follow(Client(), "raysubmit_x", out=out), timeout=30))
    assert status == JobStatus.SUCCEEDED
    assert out.getvalue() == log


def test_a_ray_run_folder_of_another_output_dir_is_refused(tmp_path):
    """runs/a/exp and runs/b/exp share the default ray.name: the second would resume the first's
    checkpoints and continue its MLflow run."""
    from types import SimpleNamespace

    from jobs.train import OWNER_FILE, claim_run_folder

    def plan(out: str, storage=tmp_path / "results"):
        cfg = load_config(None, [f"train.output_dir={tmp_path / out}", f"ray.storage_path={storage}"])
        return SimpleNamespace(cfg=cfg, name="exp")

    claim_run_folder(plan("a/exp"))
    assert json.loads((tmp_path / "results" / "exp" / OWNER_FILE).read_text()) == {"output_dir": str(tmp_path / "a/exp")}
    claim_run_folder(plan("a/exp"))  # the same run again (a resume)
    with pytest.raises(ValueError, match=r"the Ray run exp in .* belongs to train.output_dir .*/a/exp, not .*/b/exp.*"
                                         r"Set ray.name"):
        claim_run_folder(plan("b/exp"))
    claim_run_folder(plan("b/exp", storage="s3://bucket/results"))  # remote storage: not checked
