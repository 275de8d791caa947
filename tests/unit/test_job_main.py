"""jobs.common.run_main: one exit-code policy and one ``error: ...`` line for every job."""

from __future__ import annotations

import os
import time

import pytest

from imgcls_core.config import ConfigError
from jobs.common import FAIL_FAST_MLFLOW, TRACEBACK_ENV, fail_fast_mlflow, free_port, run_main


def raises(exc: BaseException):
    def body():
        raise exc

    return body


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_traceback(monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    for key in FAIL_FAST_MLFLOW:
        monkeypatch.delenv(key, raising=False)


def test_what_the_body_returns_is_the_exit_status():
    assert run_main(lambda: None, what="x") == 0
    assert run_main(lambda: 0, what="x") == 0
    assert run_main(lambda: 1, what="x") == 1  # e.g. jobs.tune after a trial errored
    assert run_main(lambda: 2, what="x") == 2


def test_a_bad_config_is_exit_2(capsys):
    from tune_spaces import SpaceError

    assert run_main(raises(ConfigError("optim.lr: expected a number, got 'x'")), what="training") == 2
    assert one_error_line(capsys) == "error: bad config: optim.lr: expected a number, got 'x'"
    assert run_main(raises(SpaceError("bad.yaml: the search space is empty")), what="sweep") == 2
    assert one_error_line(capsys) == "error: bad config: bad.yaml: the search space is empty"


@pytest.mark.parametrize("exc", [
    FileNotFoundError("data.root /x does not exist"), LookupError("model 'm' has no version 3"),
    KeyError("m"), ValueError("need at least 2 check images"), RuntimeError("no trial finished"),
    OSError("disk full"),
])
def test_expected_failures_are_exit_1_with_their_message(exc, capsys):
    assert run_main(raises(exc), what="export") == 1
    assert one_error_line(capsys) == f"error: export failed: {exc}"


def test_any_other_exception_names_its_type_and_first_line(capsys, monkeypatch):
    assert run_main(raises(TypeError("unsupported operand\nsecond line")), what="training") == 1
    assert one_error_line(capsys) == ("error: training failed: TypeError: unsupported operand "
                                      f"({TRACEBACK_ENV}=1 shows the traceback)")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    assert run_main(raises(TypeError("boom")), what="training") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: training failed: TypeError: boom\n") and "Traceback" in err


def test_ctrl_c_is_exit_130(capsys):
    assert run_main(raises(KeyboardInterrupt()), what="sweep") == 130
    assert one_error_line(capsys) == "error: sweep interrupted"


def test_a_ray_worker_error_is_reported_as_the_workers_own(capsys):
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = FileNotFoundError("data.root /nope does not exist")
    wrapped = WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File ...\n"
                               "FileNotFoundError: data.root /nope does not exist", {1: KeyError("x"), 0: cause})
    assert run_main(raises(wrapped), what="training") == 1
    assert one_error_line(capsys) == "error: training failed: data.root /nope does not exist"
    # a message that carries a traceback: its last "SomeError: ..." line, not the first
    text = RuntimeError("Training failed:\nTraceback (most recent call last):\n  File \"x.py\"\n"
                        "ZeroDivisionError: division by zero\n")
    assert run_main(raises(text), what="training") == 1
    assert one_error_line(capsys) == "error: training failed: ZeroDivisionError: division by zero"


def test_an_unreachable_tracking_server_is_one_line_naming_it_fast(capsys):
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    code = run_main(lambda: MlflowClient(uri).get_experiment_by_name("x"), what="promotion")
    took = time.monotonic() - started
    assert code == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: promotion failed: MLflow at {uri} is unreachable (")
    assert "Connection refused" in line and "2 tries" in line
    assert took < 10, f"{took:.1f} s to give up on a closed port"
    assert not any(key in os.environ for key in FAIL_FAST_MLFLOW)  # the settings were for the body only


def test_an_unreachable_server_behind_another_error_is_still_named(capsys):
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def body():
        try:
            MlflowClient(uri).get_model_version("m", "3")
        except Exception as exc:  # a caller that turns any failure into "not found"
            raise LookupError("registered model 'm' has no version 3") from exc

    assert run_main(body, what="compression") == 1
    assert one_error_line(capsys).startswith(f"error: compression failed: MLflow at {uri} is unreachable (")


def test_an_mlflow_error_names_the_store(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the store exists (MLflow logs its creation to stderr)
    capsys.readouterr()
    assert run_main(lambda: MlflowClient(uri).get_run("abc"), what="promotion", tracking_uri=uri) == 1
    assert one_error_line(capsys) == f"error: promotion failed: MLflow at {uri}: Run with id=abc not found"


def test_fail_fast_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    seen = {}
    assert run_main(lambda: seen.update({k: os.environ.get(k) for k in FAIL_FAST_MLFLOW}), what="x") == 0
    assert seen == {**FAIL_FAST_MLFLOW, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # run_main put back what it found


def test_a_ray_instance_started_by_the_driver_keeps_mlflows_retries(monkeypatch):
    """The fail-fast settings are the driver's: a local Ray instance (its training workers, whose
    tracker rides out outages) is started without them."""
    import ray

    from jobs.common import init_ray

    seen = {}

    def fake_init(address=None, **kwargs):  # stands in for starting Ray: what would its raylet inherit?
        seen.update({k: os.environ.get(k) for k in FAIL_FAST_MLFLOW})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # the user's own: passed on
    try:
        assert fail_fast_mlflow() == {k: v for k, v in FAIL_FAST_MLFLOW.items() if k != "MLFLOW_HTTP_REQUEST_TIMEOUT"}
        init_ray(None, log=lambda m: None)
        assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": None, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": None,
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == FAIL_FAST_MLFLOW["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    finally:
        from jobs.common import _restore_mlflow_settings

        _restore_mlflow_settings(FAIL_FAST_MLFLOW)


def test_a_dead_workers_own_cause_is_reported(capsys):
    """A worker killed mid-run (OOM, a lost node) reaches the driver as a failed health check whose
    cause says why."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    died = RuntimeError("The actor is dead because its worker process has died (killed by the OOM killer)")
    wrapped = WorkerGroupError("workers failed", {1: WorkerHealthCheckFailedError("A worker health check failed.",
                                                                                  died)})
    assert run_main(raises(wrapped), what="training") == 1
    assert one_error_line(capsys) == f"error: training failed: {died}"


@pytest.fixture
def default_sigterm():
    """SIGTERM's default action, as a job's process starts with: the suite's shared Ray instance
    (ray.init) has put its own handler in place, which run_main leaves alone. Put back after."""
    import signal

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_ends_a_job_as_an_interruption_and_the_handler_is_put_back(capsys, default_sigterm):
    """`ray job stop` sends SIGTERM: the job unwinds (its MLflow run ends) instead of dying at once."""
    import signal

    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)

    assert run_main(body, what="training") == 130
    assert one_error_line(capsys) == "error: training interrupted" and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(("raised", "status"), [(SystemExit(0), "KILLED"), (KeyboardInterrupt(), "KILLED"),
                                                (RuntimeError("boom"), "FAILED")])
def test_an_interrupted_or_failed_training_job_ends_its_mlflow_run(tmp_path, monkeypatch, raised, status):
    """Ctrl-C makes Ray Train abort the run and call sys.exit: the run must end KILLED, not stay RUNNING,
    and the job report an interruption (exit 130)."""
    from mlflow.tracking import MlflowClient

    import jobs.train as train
    from imgcls_core.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, ["tracking.enabled=true", f"tracking.tracking_uri={uri}", f"train.output_dir={tmp_path}"])
    plan = train.TrainPlan(cfg, "exp", "dataloader", {"classes": ["a", "b"]}, 10, "key", None)

    class Trainer:
        def fit(self):
            raise raised

    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: Trainer())
    expected = RuntimeError if isinstance(raised, RuntimeError) else KeyboardInterrupt
    with pytest.raises(expected):
        train._fit(plan, tmp_path, register_as=None, stop_after=None, inject_kill=None, log=lambda m: None)
    assert MlflowClient(uri).get_run(plan.mlflow_run_id).info.status == status


def test_sigterm_still_interrupts_after_ray_init_put_its_own_handler(capsys, monkeypatch, default_sigterm):
    """ray.init installs a SIGTERM handler that calls sys.exit; init_ray puts run_main's back."""
    import signal
    import sys

    import ray

    from jobs.common import init_ray

    def ray_init(**_kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)

    def body():
        init_ray("local")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    assert run_main(body, what="sweep") == 130
    assert one_error_line(capsys) == "error: sweep interrupted"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
