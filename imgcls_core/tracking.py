"""MLflow tracking that never stops training.

Every call goes through :class:`Tracker`, which talks to the tracking server
with an explicit run id (no global "active run", so a restarted worker can
continue the same run). When the server cannot be reached (or its store fails),
the call is remembered instead of raised: metrics are buffered and delivered on
the next successful call, and whatever could not be delivered by
:meth:`Tracker.close` is listed in :attr:`Tracker.lost` and printed, so a job
says precisely what was not logged. Only such failures are remembered (see
:func:`is_tracking_failure`): a bug in the caller raises as usual.

The exception is the model registry: a job asked to register its model
(``register_as``) must not end as if it had, so a registration that fails raises
:class:`RegistrationError`.

A run is found again by its *run key* (a tag, e.g. the Ray run's storage
path and name): re-running a job with the same key continues the same run.

What a training run records, whichever host runs it (the local runner, rank 0 of
a Ray Train job): :func:`log_training_inputs` before the first epoch (params, tags,
config, class index), ``log_metrics`` per epoch, :func:`log_training_outputs` at the
end (final metrics, artifacts, the MLflow model).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgcls_core.config import Config, TrackingConfig

Log = Callable[[str], None]
# A finished training run's record in its output folder (written by the local runner and by
# rank 0 of jobs.train; read by jobs.promote --summary, jobs.register and sweeps).
SUMMARY_FILE = "train_summary.json"

RUN_KEY_TAG = "imgcls.run_key"
# Without these, an unreachable server stalls each call for minutes of retries.
_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class RegistrationError(RuntimeError):
    """The model could not be added to the model registry although the job asked for it."""


def is_tracking_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the tracking server or store failing (unreachable, timing out, erroring:
    an MlflowException, a network or I/O error) rather than a bug in the caller (a TypeError, a
    local file that is not there, ...)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False  # a wrong local path: the caller's mistake
    failures: list[type[BaseException]] = [MlflowException, OSError]  # requests' errors are OSErrors
    for module, name in (("urllib3.exceptions", "HTTPError"), ("botocore.exceptions", "BotoCoreError"),
                         ("botocore.exceptions", "ClientError")):
        loaded = sys.modules.get(module)  # only a loaded module can have raised it
        if loaded is not None and isinstance(getattr(loaded, name, None), type):
            failures.append(getattr(loaded, name))
    return isinstance(exc, tuple(failures))


_UNREACHABLE = re.compile(r"Max retries exceeded|Failed to establish a new connection|Connection refused|"
                          r"timed out|Name or service not known|name resolution|Connection reset|"
                          r"Remote end closed connection|Connection aborted", re.IGNORECASE)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server did not answer (refused, timed out, unknown host,
    only error responses), as opposed to answering that a request was wrong."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(_UNREACHABLE.search(str(exc)))


def describe_tracking_error(exc: BaseException, tracking_uri: str | None = None) -> str:
    """One line for an MLflow failure: ``MLflow at <uri> is unreachable (<cause>; N tries); ...``
    for a server that did not answer, else ``MLflow at <uri>: <first line of the message>``. The
    server is the one the error names, else ``tracking_uri``, else MLFLOW_TRACKING_URI."""
    text = str(exc)
    uri = _server_of(text) or tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_tracking_uri()
    if not is_unreachable(exc):
        return f"MLflow at {uri}: {_first_line(text) or type(exc).__name__}"
    cause = (re.search(r"\[Errno -?\d+\] [^'\")(]+", text) or re.search(r"Read timed out|timed out", text)
             or re.search(r"ResponseError\('([^']+)'", text))
    if cause is not None:
        reason = (cause.group(1) if cause.groups() else cause.group(0)).strip()
    else:
        reason = _first_line(text) or type(exc).__name__
    state = ("is failing" if "error responses" in reason else "did not answer" if "timed out" in reason
             else "is unreachable")
    tries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or 7) + 1
    return (f"MLflow at {uri} {state} ({reason}; {tries} tries); check tracking.tracking_uri or "
            f"MLFLOW_TRACKING_URI and that the server is up")


def _server_of(text: str) -> str | None:
    match = re.search(r"API request to (https?://[^/\s]+)", text)
    if match:
        return match.group(1)
    match = re.search(r"host='([^']+)', port=(\d+)", text)
    return f"http://{match.group(1)}:{match.group(2)}" if match else None


def _default_tracking_uri() -> str:
    tracking = sys.modules.get("mlflow.tracking")  # not imported: nothing talked to MLflow
    try:
        return tracking.get_tracking_uri() if tracking is not None else "the default tracking URI"
    except Exception:  # noqa: BLE001 - only for a message
        return "the default tracking URI"


def _first_line(text: str, limit: int = 300) -> str:
    line = next((item.strip() for item in text.splitlines() if item.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Tracker:
    """One MLflow run, or a no-op when tracking is off or the server is unreachable."""

    #: After a failed delivery, metrics are only buffered for this long before the next try, so
    #: a server that is down costs one failed call (seconds of retries) per window, not per step.
    retry_after_s = 15.0

    def __init__(self, cfg: TrackingConfig, *, log: Log = print):
        self.cfg, self.log = cfg, log
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.lost: list[str] = []
        self.last_error: str | None = None  # the latest tracking failure, for messages
        self._pending: list[tuple[dict[str, float], int, int]] = []  # (values, step, timestamp ms)
        self._warned = False
        self._failed_since_flush = False
        self._retry_at = 0.0  # time.monotonic() before which buffered metrics are not re-sent
        self._closed = False
        self._continued = False  # start() continued an existing run: it may hold params already

    # ------------------------------------------------------------------ lifecycle

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @property
    def continued(self) -> bool:
        """start() found the run in this store (by id or run key) rather than creating it."""
        return self._continued

    def start(
        self, *, run_id: str | None = None, run_key: str | None = None, run_name: str | None = None,
        tags: dict[str, str] | None = None, parent_run_id: str | None = None,
    ) -> Tracker:
        """Continue ``run_id``, else the newest run tagged with ``run_key``, else create one."""
        if not self.cfg.enabled:
            return self
        for key, value in _CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment_id()
            if run_id is None and run_key is not None:
                found = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                    order_by=["attributes.start_time DESC"], max_results=1,
                )
                run_id = found[0].info.run_id if found else None
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id, self._continued = run_id, True
                self.log(f"MLflow: continuing run {run_id} in experiment {self.cfg.experiment!r}")
            else:
                all_tags = dict(tags or {})
                if run_key is not None:
                    all_tags[RUN_KEY_TAG] = run_key
                if parent_run_id is not None:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = self.client.create_run(
                    self.experiment_id, run_name=run_name or self.cfg.run_name, tags=all_tags
                )
                self.run_id = run.info.run_id
                self.log(f"MLflow: started run {self.run_id} in experiment {self.cfg.experiment!r}")
        except Exception as exc:
            if not is_tracking_failure(exc):
                raise
            self.client, self.run_id = None, None  # a server or store that fails disables tracking
            self._lose(f"the whole run (tracking server {uri or 'default'} unreachable: {_short(exc)})")
        return self

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(self.cfg.experiment)

    def close(self, status: str = "FINISHED") -> list[str]:
        """Flush buffered metrics, end the run, and print what was not logged. Only the first
        call ends the run (a later one cannot turn a FAILED run FINISHED)."""
        if self._closed:
            return self.lost
        self._closed = True
        if self.active:
            self._flush(force=True)
            self._call("run status", lambda: self.client.set_terminated(self.run_id, status=status))
        if self._pending:
            steps = sorted({step for _, step, _ in self._pending})
            self.lost.append(f"metrics of steps {steps}")
            self._pending.clear()
        if self.lost:
            self.log("MLflow: NOT logged: " + "; ".join(self.lost))
        return self.lost

    # ------------------------------------------------------------------ logging

    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``params``. MLflow never changes a logged param: on a continued run only the new
        ones are logged, and those whose value differs from the logged one are named."""
        if not self.active:
            return None
        from mlflow.entities import Param

        values = {k: _param_value(v) for k, v in params.items()}
        if self._continued:
            logged = self._call("params", lambda: self.client.get_run(self.run_id).data.params)
            if logged is None:
                return None
            changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
            if changed:
                self.log("MLflow: this run was logged with other values of " + ", ".join(
                    f"{k} ({logged[k]!r}, now {values[k]!r})" for k in changed)
                    + "; MLflow keeps the first value of a param (the config in the run's artifacts is the current one)")
            values = {k: v for k, v in values.items() if k not in logged}
        items = [Param(k, v) for k, v in values.items()]
        for start in range(0, len(items), 100):  # the server takes at most 100 params a batch
            chunk = items[start : start + 100]
            self._call("params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        for key, value in tags.items():
            self._call(f"tag {key}", lambda k=key, v=value: self.client.set_tag(self.run_id, k, str(v)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step``; on failure they wait for the next successful call."""
        if not self.active:
            return None
        self._pending.append(({k: float(v) for k, v in metrics.items()}, int(step), _now_ms()))
        self._flush()

    def _flush(self, force: bool = False) -> None:
        """Send buffered metrics, oldest first, with the time they were measured (not sent)."""
        from mlflow.entities import Metric

        if not force and time.monotonic() < self._retry_at:
            return
        late: list[int] = []
        while self._pending:
            values, step, when = self._pending[0]
            batch = [Metric(_metric_key(k), v, when, step) for k, v in values.items()]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if not is_tracking_failure(exc):
                    raise
                self._warn(exc)
                self._failed_since_flush = True
                self._retry_at = time.monotonic() + self.retry_after_s
                return
            self._pending.pop(0)
            if self._failed_since_flush:
                late.append(step)
        if late:
            self.log(f"MLflow: tracking server reachable again; delivered {len(late)} buffered metric "
                     f"batches late (steps {late[0]}..{late[-1]})")
            self._failed_since_flush = False
            self._warned = False  # a later outage is reported again

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return None
        if Path(path).is_dir():  # a folder keeps its name and layout under the run's artifacts
            self._call(f"artifacts {Path(path).name}/", lambda: self.client.log_artifacts(
                self.run_id, str(path), artifact_path or Path(path).name))
            return None
        self._call(f"artifact {Path(path).name}",
                   lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / Path(artifact_file).name
            file.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(file, None if parent == "." else parent)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1), artifact_file)

    def log_model(self, model_file: str | Path, *, register_as: str | None = None,
                  extra_metadata: dict | None = None):
        """Log ``model_file`` as this run's MLflow model (see imgcls_core.packaging): its ModelInfo,
        or None when tracking is off or logging failed (then listed in :attr:`lost`).

        With ``register_as`` the logged model also becomes a version of that registered model
        (``info.registered_model_version``); when it cannot (tracking off or unreachable, the
        model not logged, the registry failing) this raises :class:`RegistrationError`."""
        if not self.active:
            if register_as:
                why = ("tracking is off (tracking.enabled=false)" if not self.cfg.enabled
                       else f"no MLflow run ({'; '.join(self.lost) or 'tracking did not start'})")
                raise RegistrationError(f"the model was not registered as {register_as!r}: {why}")
            return None

        def log():
            import mlflow

            from imgcls_core.packaging import log_model

            mlflow.set_tracking_uri(self.client.tracking_uri)
            return log_model(self.run_id, model_file, extra_metadata=extra_metadata)

        info = self._call("model", log)
        if register_as is None:
            return info
        if info is None:
            raise RegistrationError(f"the model was not registered as {register_as!r}: logging it to run "
                                    f"{self.run_id} failed ({self.last_error})")
        import mlflow

        try:
            version = mlflow.register_model(info.model_uri, register_as)
        except Exception as exc:
            if not is_tracking_failure(exc):
                raise
            raise RegistrationError(f"the model was logged to run {self.run_id} but registering it as "
                                    f"{register_as!r} failed: "
                                    f"{describe_tracking_error(exc, mlflow.get_registry_uri())}") from exc
        if version.status not in ("READY", None):
            raise RegistrationError(f"registered model {register_as!r} v{version.version} is {version.status}")
        info.registered_model_version = version.version
        self.log(f"MLflow: registered the model as {register_as!r} v{version.version}")
        return info

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (anything that talks to MLflow); on failure record ``what`` as not logged."""
        if not self.active:
            return None
        return self._call(what, fn)

    # ------------------------------------------------------------------ failures

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``; when the tracking server or store fails, None with ``what`` recorded as lost
        (logging must never stop training). Any other exception is a bug and propagates."""
        try:
            return fn()
        except Exception as exc:
            if not is_tracking_failure(exc):
                raise
            self._warn(exc)
            self._lose(what)
            return None

    def _warn(self, exc: Exception) -> None:
        self.last_error = _short(exc)
        if not self._warned:
            self.log(f"MLflow: tracking server error, training goes on without it: {_short(exc)}")
            self._warned = True

    def _lose(self, what: str) -> None:
        if what not in self.lost:
            self.lost.append(what)


def log_training_inputs(
    tracker: Tracker, cfg: Config, *, classes: list[str], derived: dict[str, Any], tags: dict[str, Any],
    skip: tuple[str, ...] = ("serve.", "distill."),
) -> None:
    """Before the first epoch: the config as params (but the sections in ``skip``, which do not
    change what is trained), ``derived`` as ``derived.*`` params, ``tags``, and the artifacts
    ``config.yaml`` and ``class_index.json``."""
    if not tracker.active:
        return
    params = {k: v for k, v in cfg.flat().items() if not k.startswith(skip)}
    tracker.log_params({**params, **{f"derived.{k}": v for k, v in derived.items()}})
    tracker.set_tags(tags)
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    tracker.log_dict({"classes": list(classes)}, "class_index.json")


def log_training_outputs(
    tracker: Tracker, *, metrics: dict[str, float], step: int, files: dict[str, Path],
    register_as: str | None = None, extra_metadata: dict | None = None,
):
    """After training: final ``metrics`` at ``step``, every file of ``files`` but ``files["model"]``
    as an artifact, and ``files["model"]`` as the run's MLflow model (registered as
    ``register_as`` when given). The ModelInfo, or None when tracking is off or it failed.

    A registration that was asked for and failed raises :class:`RegistrationError` (naming the
    model file, which stays where it is, and how to register it later) after everything else was
    logged and the run ended FAILED: a job that was to register its model must not succeed
    without it."""
    if tracker.active:
        tracker.log_metrics(metrics, step=step)
        for key, path in files.items():
            if key != "model":
                tracker.log_artifact(path)
    elif not register_as:
        return None
    try:
        return tracker.log_model(files["model"], register_as=register_as, extra_metadata=extra_metadata)
    except RegistrationError as exc:
        tracker.set_tags({"imgcls.registration_error": str(exc)[:5000]})
        tracker.close(status="FAILED")
        raise RegistrationError(f"{exc}; the model file {files['model']} is kept: register it with "
                                f"`python -m jobs.register --model {files['model']} --name {register_as}`") from exc


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:_MAX_PARAM_LENGTH]


def _metric_key(key: str) -> str:
    return key.replace("@", "_at_")  # MLflow keys allow / . - _ and alphanumerics


def _now_ms() -> int:
    return int(time.time() * 1000)


def _short(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:300] + "..."
