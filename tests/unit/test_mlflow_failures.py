"""Failures say so: an unreachable tracking server, a registration that fails, a registry that
fails or moves under a promotion, a sweep without its data. Real MLflow (sqlite stores, a real
server), real jobs as subprocesses; fakes only stand in for a registry above the promotion gate
and for Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgcls_core.config import load_config
from tests.mlflow_server import REPO, free_port


def closed_port() -> int:
    return free_port()  # bound, then closed: nothing listens there


def job_env() -> dict[str, str]:
    """The environment of a user who set nothing for MLflow (no retries settings, no server)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def run_job(*argv: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def assert_one_error_line(stderr: str, *parts: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def model_file(path: Path, seed: int) -> Path:
    """A small real imgcls model file for the digits (untrained: the weights differ by seed)."""
    import torch

    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model

    cfg = load_config(None, ["model.name=cnn3", "model.width=0.25"])
    torch.manual_seed(seed)
    model = build_model(cfg.model, 10, 32)
    pre = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(10)])
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_inference_model(path, model.state_dict(), cfg.to_dict()["model"], pre)


# --------------------------------------------------------------------------- an unreachable server


@pytest.mark.parametrize("job", ["promote", "export", "compress", "register"])
def test_a_job_reports_an_unreachable_tracking_server_in_one_line_within_30_s(job, digits_root, tmp_path):
    """Before: each of these waited about 4.5 minutes (MLflow's 7 retries), then printed a
    URL-encoded connection error, or (export, compress) "no version with alias 'champion'"."""
    uri = f"http://127.0.0.1:{closed_port()}"
    where = ["--set", f"tracking.tracking_uri={uri}", "--set", f"data.root={digits_root}",
             "--set", f"train.output_dir={tmp_path / 'out'}"]
    argv = {"promote": ["jobs.promote", "--run-id", "0123abcd", "--model", "m", *where],
            "export": ["jobs.export", "--model", "m", *where],
            "compress": ["jobs.compress", "--model", "m", "--method", "dynamic", *where],
            "register": ["jobs.register", "--model", str(model_file(tmp_path / "run" / "model.pt", 0)),
                         "--name", "m", *where]}[job]
    done, took = run_job(*argv)
    assert done.returncode == 1, done.stderr[-3000:]
    assert_one_error_line(done.stderr, f"failed: MLflow at {uri} is unreachable", "Connection refused")
    assert took < 30, f"{job}: {took:.1f} s to report an unreachable server"


def test_a_missing_alias_is_not_a_failing_registry(tmp_path, digits_root):
    """The registry answers "no such alias": the job says so (and never that MLflow failed)."""
    from imgcls_core.registry import Registry, register_model_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_model_file(uri, "m", model_file(tmp_path / "a" / "model.pt", 0))
    assert Registry(uri, "m").alias("champion") is None  # the model exists, the alias does not
    assert Registry(uri, "nobody").alias("champion") is None  # neither does
    done, _ = run_job("jobs.export", "--model", "m", "--set", f"tracking.tracking_uri={uri}",
                      "--set", f"data.root={digits_root}", "--set", f"train.output_dir={tmp_path / 'out'}")
    assert done.returncode == 1
    assert_one_error_line(done.stderr, "error: export failed: registered model 'm' has no version with alias "
                                       "'champion'; promote one first")


def test_a_failing_registry_raises_instead_of_answering_none(monkeypatch):
    from mlflow.exceptions import MlflowException

    from imgcls_core.registry import Registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    registry = Registry(f"http://127.0.0.1:{closed_port()}", "m")
    with pytest.raises(MlflowException, match="Connection refused"):
        registry.alias("champion")  # was None: "no champion yet", and the promotion moved champion
    with pytest.raises(MlflowException, match="Connection refused"):
        registry.resolve(None, "3")  # was "has no version 3"


# --------------------------------------------------------------------------- the tracker


def test_tracker_swallows_tracking_failures_but_not_bugs(tmp_path):
    from mlflow.exceptions import MlflowException

    from imgcls_core.config import TrackingConfig
    from imgcls_core.tracking import Tracker

    lines: list[str] = []
    cfg = TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="unit")
    tracker = Tracker(cfg, log=lines.append).start(run_key="k")

    def store_down():
        raise MlflowException("SQLAlchemy database error", error_code="TEMPORARILY_UNAVAILABLE")

    assert tracker.call("tags", store_down) is None  # logging never stops training...
    assert tracker.call("upload", lambda: (_ for _ in ()).throw(ConnectionError("reset"))) is None
    assert tracker.lost == ["tags", "upload"]
    with pytest.raises(ZeroDivisionError):  # ... but a bug is not a server outage
        tracker.call("metric", lambda: 1 / 0)
    with pytest.raises(TypeError):
        tracker.call("x", lambda: len(5))
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(tmp_path / "no-such-file.json")
    tracker.close()


# --------------------------------------------------------------------------- registration that fails


def test_a_registration_that_fails_raises_after_logging_everything_else(tmp_path, monkeypatch):
    """The tracking store works, the registry does not (MLFLOW_REGISTRY_URI: a closed port)."""
    from mlflow.tracking import MlflowClient

    from imgcls_core.config import TrackingConfig
    from imgcls_core.tracking import RegistrationError, Tracker, log_training_outputs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    model = model_file(tmp_path / "run" / "model.pt", 0)
    report = tmp_path / "run" / "report.json"
    report.write_text("{}")
    tracker = Tracker(TrackingConfig(enabled=True, tracking_uri=uri, experiment="unit"), log=lambda m: None)
    tracker.start(run_key="r")
    with pytest.raises(RegistrationError) as raised:
        log_training_outputs(tracker, metrics={"test/acc1": 0.5}, step=1, files={"model": model, "report": report},
                             register_as="digits")
    message = str(raised.value)
    assert "registering it as 'digits' failed: MLflow at http://127.0.0.1:" in message and "unreachable" in message
    assert f"the model file {model} is kept" in message and "python -m jobs.register" in message
    assert model.is_file()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"test/acc1": 0.5}
    assert "report.json" in {a.path for a in client.list_artifacts(tracker.run_id)}
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id])  # the model itself is logged
    assert "registering it as 'digits' failed" in run.data.tags["imgcls.registration_error"]
    assert tracker.close() == [] and client.get_run(tracker.run_id).info.status == "FAILED"  # stays FAILED


def test_registration_asked_for_without_a_run_raises():
    from imgcls_core.config import TrackingConfig
    from imgcls_core.tracking import RegistrationError, Tracker

    with pytest.raises(RegistrationError, match="tracking is off"):
        Tracker(TrackingConfig(enabled=False)).log_model("model.pt", register_as="digits")


@pytest.mark.slow
def test_train_local_with_a_failing_registration_exits_1(digits_root, tmp_path, monkeypatch, capsys):
    """Before: registered_version null in train_summary.json, and exit 0."""
    from jobs.train_local import main

    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{closed_port()}")
    out = tmp_path / "run"
    code = main(["--set", "data.format=digits", "--set", f"data.root={digits_root}", "--set", "model.name=cnn3",
                 "--set", "model.width=0.25", "--set", "train.epochs=1", "--set", f"train.output_dir={out}",
                 "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                 "--set", "tracking.register_as=digits"])
    assert code == 1
    line = assert_one_error_line(capsys.readouterr().err, "error: training failed: the model was logged to run",
                                 "registering it as 'digits' failed")
    assert f"the model file {out / 'model.pt'} is kept" in line
    assert (out / "model.pt").is_file()


# --------------------------------------------------------------------------- the promotion gate


class Version:
    def __init__(self, version: str):
        self.version = version


class FakeRegistry:
    """The champion alias of one model, above which gate_champion decides. ``moves``: versions
    other promotions make champion right before each of this promotion's moves."""

    name = "m"

    def __init__(self, champion: str | None = None, moves: tuple[str, ...] = (), failing: Exception | None = None):
        self.champion, self.moves, self.failing, self.set = champion, list(moves), failing, []

    def alias(self, alias: str):
        if self.failing is not None:
            raise self.failing
        return Version(self.champion) if self.champion else None

    def set_alias_if(self, alias: str, version: str, expected: str | None):
        if self.moves:
            self.champion = self.moves.pop(0)
        if self.champion != expected:
            return False, self.alias(alias)
        self.champion = version
        self.set.append(version)
        return True, None


def test_gate_promotes_the_first_champion():
    from imgcls_core.registry import gate_champion

    registry = FakeRegistry()
    assert gate_champion(registry, "1", 0.9, evaluate=lambda v: 0 / 0, margin=0.0)[:2] == (True, "no champion yet")
    assert registry.champion == "1"


def test_gate_leaves_the_champion_alone_when_the_registry_fails():
    from mlflow.exceptions import MlflowException

    from imgcls_core.registry import gate_champion

    registry = FakeRegistry("1", failing=MlflowException("API request to http://127.0.0.1:5000 failed: refused"))
    with pytest.raises(MlflowException):
        gate_champion(registry, "2", 0.99, evaluate=lambda v: 0.5, margin=0.0, force_reason="rollback")
    assert registry.set == []


def test_gate_decides_again_when_the_champion_moved_meanwhile():
    from imgcls_core.registry import gate_champion

    scores = {"1": 0.90, "2": 0.97}
    lines: list[str] = []
    # v3 (0.95) beats v1 (0.90); meanwhile another promotion made v2 (0.97) champion
    registry = FakeRegistry("1", moves=("2",))
    promoted, reason, champion, acc = gate_champion(registry, "3", 0.95, evaluate=lambda v: scores[v.version],
                                                    margin=0.0, log=lines.append)
    assert not promoted and champion.version == "2" and acc == 0.97 and "does not beat" in reason
    assert registry.champion == "2" and registry.set == []  # not overwritten blindly
    assert "champion changed while this promotion decided (it was v1, it is v2)" in lines[0]
    # ... and if v3 also beats the new champion, it moves (against v2, as recorded)
    registry = FakeRegistry("1", moves=("2",))
    promoted, _, champion, _ = gate_champion(registry, "3", 0.99, evaluate=lambda v: scores[v.version], margin=0.0,
                                             log=lines.append)
    assert promoted and champion.version == "2" and registry.champion == "3"


def test_gate_gives_up_on_a_champion_that_keeps_moving():
    from imgcls_core.registry import gate_champion

    registry = FakeRegistry("1", moves=("2", "4", "5"))
    with pytest.raises(RuntimeError, match="changed 3 times while this promotion decided .now v5.; it was left"):
        gate_champion(registry, "3", 0.99, evaluate=lambda v: 0.5, margin=0.0, log=lambda m: None)
    assert registry.champion == "5" and registry.set == []


def test_gate_on_a_real_registry_with_a_concurrent_promotion(tmp_path):
    """sqlite-backed MLflow: the first champion, then a promotion that another one overtakes
    while it evaluates the champion."""
    from imgcls_core.registry import CHAMPION, Registry, gate_champion, register_model_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for seed in (1, 2, 3):
        register_model_file(uri, "m", model_file(tmp_path / str(seed) / "model.pt", seed))
    registry, other = Registry(uri, "m"), Registry(uri, "m")
    assert registry.alias(CHAMPION) is None
    assert gate_champion(registry, "1", 0.90, evaluate=lambda v: 0 / 0, margin=0.0)[:2] == (True, "no champion yet")
    assert str(registry.alias(CHAMPION).version) == "1"

    scores = {"1": 0.90, "2": 0.97}

    def evaluate(version) -> float:  # while v3's promotion tests v1, another one makes v2 champion
        if str(version.version) == "1":
            other.set_alias(CHAMPION, "2")
        return scores[str(version.version)]

    lines: list[str] = []
    promoted, reason, champion, acc = gate_champion(registry, "3", 0.95, evaluate=evaluate, margin=0.0,
                                                    log=lines.append)
    assert not promoted and str(champion.version) == "2" and acc == 0.97, (reason, lines)
    assert str(registry.alias(CHAMPION).version) == "2"  # before: v3 overwrote v2 without being compared with it
    assert "it was v1, it is v2" in lines[0]


@pytest.mark.slow
def test_promotion_with_the_server_down_exits_1_and_leaves_the_champion(digits_root, tmp_path):
    """A real tracking server (cluster/mlflow/server.sh, ~25 s to start here) holding champion v1
    goes down; a forced promotion of v2 (which would move champion) fails with one line and the
    champion in the server's store is still v1."""
    from mlflow.tracking import MlflowClient

    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from tests.mlflow_server import server_env, start_server, stop_server, wait_for_health

    port = free_port()
    env = server_env(tmp_path, MLFLOW_PORT=str(port))
    log = tmp_path / "server.log"
    server = start_server(env, log)
    try:
        wait_for_health(server, port, log, timeout=90)
        uri = f"http://127.0.0.1:{port}"
        register_model_file(uri, "m", model_file(tmp_path / "1" / "model.pt", 1))
        v2 = register_model_file(uri, "m", model_file(tmp_path / "2" / "model.pt", 2))
        Registry(uri, "m").set_alias(CHAMPION, "1")
    finally:
        stop_server(server)
    done, took = run_job("jobs.promote", "--run-id", v2.run_id, "--model", "m", "--force", "--reason", "test",
                         "--set", f"tracking.tracking_uri={uri}", "--set", f"data.root={digits_root}",
                         "--set", f"train.output_dir={tmp_path / 'out'}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert_one_error_line(done.stderr, f"error: promotion failed: MLflow at {uri} is unreachable")
    assert took < 30
    store = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}")  # the server's own store
    assert str(store.get_model_version_by_alias("m", CHAMPION).version) == "1"
    assert not (tmp_path / "out" / "promotion.json").exists()


# --------------------------------------------------------------------------- a sweep


def sweep_args(tmp_path, *overrides: str) -> list[str]:
    return ["--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", f"train.output_dir={tmp_path / 'sweep'}", "--set", f"ray.storage_path={tmp_path / 'ray'}",
            *[item for o in overrides for item in ("--set", o)]]


def runs(tmp_path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_sweep_without_its_data_fails_in_seconds_before_any_trial(tmp_path, capsys, monkeypatch):
    """Before: every trial failed, then a traceback, and the sweep's MLflow run stayed RUNNING."""
    import jobs.tune
    from jobs.tune import main

    connected = []  # (the suite's shared Ray instance may be up already: watch the job's own call)
    monkeypatch.setattr(jobs.tune, "init_ray", lambda *a, **k: connected.append(a))
    started = time.monotonic()
    code = main(sweep_args(tmp_path, "data.format=imagefolder", f"data.root={tmp_path / 'no-data'}"))
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, f"error: sweep failed: data.root {tmp_path / 'no-data'} does "
                                                   "not exist, so every trial would fail")
    assert time.monotonic() - started < 15
    assert connected == []  # not even Ray was connected to
    assert [r.info.status for r in runs(tmp_path)] == []


def test_sweep_that_fails_after_its_run_started_ends_the_run_failed(digits_root, tmp_path, capsys, monkeypatch):
    """A cluster too small for a trial (Ray stood in for: 1 CPU) fails the sweep after its MLflow
    run started: the run ends FAILED, not RUNNING."""
    import ray

    import jobs.tune

    monkeypatch.setattr(jobs.tune, "init_ray", lambda address=None: None)
    monkeypatch.setattr(jobs.tune, "_warn_without_state_api", lambda log: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    code = jobs.tune.main(sweep_args(tmp_path, "data.format=digits", f"data.root={digits_root}",
                                     "ray.num_workers=2"))
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, "error: sweep failed: the Train workers need 2.1 CPU")
    assert [(r.info.run_name, r.info.status) for r in runs(tmp_path)] == [("sweep-sweep", "FAILED")]


@pytest.mark.parametrize("uri, path", [
    ("sqlite:///mlflow.db", "mlflow.db"),
    ("sqlite:////abs/m.db?timeout=5", "/abs/m.db"),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("file:///abs/mlruns", "/abs/mlruns"),
    ("./mlruns", "mlruns"),
    ("http://127.0.0.1:5000", None),
    ("databricks", None),
    ("databricks-uc", None),
])
def test_local_store_path_reads_sqlite_file_and_plain_paths(uri, path):
    from imgcls_core.registry import local_store_path

    assert local_store_path(uri) == (None if path is None else Path(path))


def test_a_typod_store_is_refused_and_not_created(tmp_path, monkeypatch, capsys):
    """A registry reader pointed at a store that is not there says so, instead of MLflow creating an
    empty store that answers "no such model"; promotion refuses before it writes any data."""
    from imgcls_core.registry import MissingStoreError, Registry
    from jobs.promote import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MissingStoreError, match=r"no MLflow store at typo\.db \(relative to the working directory"):
        Registry("sqlite:///typo.db", "m")
    assert main(["--run-id", "abc", "--set", "tracking.tracking_uri=sqlite:///typo.db"]) == 1
    assert "error: promotion failed: there is no MLflow store at typo.db" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no digits data
    Registry("sqlite:///new.db", "m", create=True)  # registering a file may start a store
    assert (tmp_path / "new.db").exists()
