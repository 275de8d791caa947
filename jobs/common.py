"""What every Ray job shares: config flags, path resolution, connecting to Ray, and how a job
ends (:func:`run_main`: one exit-code policy and one ``error: ...`` line for every job)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgcls_core.config import TORCHVISION_PREFIX, Config, ConfigError, load_config
from imgcls_core.tracking import describe_tracking_error, is_unreachable

# Relative paths in a config are resolved against this directory when it is set.
# `ray job submit --working-dir .` runs the job in a copy of the repository that
# leaves out data/ and results/ (see jobs/runtime_env.yaml), so submitters set it
# to the repository on the cluster's shared file system.
BASE_DIR_ENV = "IMGCLS_BASE_DIR"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
#: The niceness the raylet gives the worker processes it starts: Ray's default is 15, so any
#: process at 0 (the raylet, GCS, dashboard agent, a job's driver) preempts a training rank mid-step,
#: and its other OpenMP threads spin at the next barrier meanwhile. On 2 cores that made Ray Train's
#: train pass use 1.3x the CPU of the same loop outside Ray for the same epochs; at 0 the train
#: pass measured 0.99-1.18x on a 2-core VM whose speed drifts between runs (bench/train_vs_local.py).
#: Read by the raylet when it starts: set it before `ray start` or a ray.init that starts a local
#: instance (:func:`init_local_ray`).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def worker_niceness_default() -> None:
    """Training workers at the niceness of every other process (unless already set): call before
    this process starts a Ray instance; a running instance keeps the niceness it started with."""
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")


#: The Serve ingress the endpoint runs behind (BENCHMARKS.md, serve_throughput): Ray Serve's
#: throughput-optimized mode (each replica answers HTTP itself, user code on its main loop,
#: buffered request logs) with HAProxy as the stable front on serve's HTTP port, balancing over
#: the replicas' own ports and following replacements. Read where Ray and the Serve controller
#: start: cluster/local/env.sh exports the same for `ray start`, the KubeRay RayService sets it
#: on its pods, and :func:`serve_ingress_default` sets it before a ray.init that starts Ray.
SERVE_INGRESS_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
#: HAProxy's statistics page and Prometheus exporter listen on fixed ports (8404, 9101) on every
#: interface (Ray's template); a Ray instance owned by one process (tests, benchmarks) moves them
#: to free ports so that it can run beside the local cluster.
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
#: A direct-ingress replica that stops (``serve.delete``, ``serve.shutdown``, a redeploy, a scale
#: down) stays open for this many seconds first, 30 by default, so that load balancers on other
#: nodes can deregister it; each of those calls blocks that long. A one-node Ray instance (owned
#: by one process, or the local cluster: cluster/local/env.sh) has its HAProxy beside the
#: replicas and holds them open for 2 s.
SERVE_DRAIN_ENV = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
#: `ray start --block` drains its node on SIGTERM, asking a GCS that a process-group SIGTERM stops
#: too and waiting 30 s for it; a one-node cluster has nowhere to drain to (cluster/local/env.sh).
NODE_DRAIN_ENV = ("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")


def serve_ingress_default(own_ports: bool = False) -> None:
    """The Serve ingress of :data:`SERVE_INGRESS_ENV` (unless this environment chose another): call
    before this process starts a Ray instance. ``own_ports`` (a one-node instance of this process's
    own) also gives HAProxy free ports and stopping replicas the short drain of :data:`SERVE_DRAIN_ENV`."""
    for key, value in SERVE_INGRESS_ENV.items():
        os.environ.setdefault(key, value)
    if own_ports:
        for key in HAPROXY_PORT_ENVS:
            os.environ.setdefault(key, str(free_port()))
        os.environ.setdefault(*SERVE_DRAIN_ENV)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_local_ray(**kwargs) -> None:
    """``ray.init(address="local", **kwargs)``: a new Ray instance owned by this process (benchmarks,
    the test session), its training workers at niceness 0, Serve in the ingress of
    :data:`SERVE_INGRESS_ENV`."""
    import ray

    worker_niceness_default()
    serve_ingress_default(own_ports=True)
    ray.init(address="local", **kwargs)


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (``--stop-after N``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def read_json(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object ``what`` (e.g. "a training summary") in ``path``, with ``keys``; a ValueError
    naming the file when it is not that (damaged, or written by something else)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); is it {what}?") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if not isinstance(data, dict) or missing:
        raise ValueError(f"{path} is not {what}: it has no {', '.join(repr(k) for k in missing) or 'fields'}")
    return data


def add_config_args(parser: argparse.ArgumentParser, *, ray_address: bool = False) -> None:
    parser.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    if ray_address:
        parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a new local instance)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=0.2 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace) -> Config | None:
    """The config, or None after printing ``error: bad config: ...`` to stderr."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: bad config: {exc}", file=sys.stderr)
        return None


def job_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Config | None, int | None]:
    """Parse a job's command line: ``(args, cfg, None)`` to go on, or an exit code when the job is
    done already (2 after a bad config, 0 after ``--print-config``)."""
    args = parser.parse_args(argv)
    cfg, done = config_or_exit(args)
    return args, cfg, done


def config_or_exit(args: argparse.Namespace) -> tuple[Config | None, int | None]:
    """The config of parsed arguments: ``(cfg, None)`` to go on, or an exit code when the job is
    done already (2 after a bad config, 0 after ``--print-config``)."""
    cfg = config_from_args(args)
    if cfg is None:
        return None, 2
    if args.print_config:
        print(cfg.to_yaml())
        return cfg, 0
    return cfg, None


def config_beside(path: str | Path) -> str | None:
    """The config.yaml a training run wrote beside ``path`` (its model.pt or train_summary.json),
    if there is one: what the run trained with, so later steps see the same data and tracking."""
    config = Path(path).parent / "config.yaml"
    return str(config) if config.is_file() else None


def is_uri(path: str) -> bool:
    return "://" in path


def local_folder(location: str) -> Path | None:
    """``location`` (a plain path or a ``file://`` URI) as a local Path; None for remote storage (s3://, gs://)."""
    if is_uri(location) and not location.startswith("file://"):
        return None
    return Path(location.removeprefix("file://"))


def read_record(path: Path | None) -> dict[str, Any]:
    """The JSON object of a bookkeeping record a job keeps beside a run (whose parent run, whose output
    folder); {} when there is none, or the file is not one (unreadable, not JSON, not an object)."""
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_path(path: str) -> str:
    """An absolute local path (``~`` expanded, then against $IMGCLS_BASE_DIR, else the cwd); URIs
    unchanged."""
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return path
    base = Path(os.environ.get(BASE_DIR_ENV) or os.getcwd())
    return str((base / path).resolve())


def resolve_config_paths(cfg: Config) -> Config:
    """Make data.root, train.output_dir, ray.storage_path and a model.pretrained file absolute,
    so workers on any node and in any working directory see the same locations."""
    cfg.data.root = resolve_path(cfg.data.root)
    if cfg.model.pretrained and not cfg.model.pretrained.startswith(TORCHVISION_PREFIX):  # a name, not a path
        cfg.model.pretrained = resolve_path(cfg.model.pretrained)
    cfg.train.output_dir = resolve_path(cfg.train.output_dir)
    cfg.ray.storage_path = resolve_path(cfg.ray.storage_path)
    return cfg


def ray_init_address(address: str | None, log=print) -> str | None:
    """The address to hand ``ray.init``: ``address``, else RAY_ADDRESS, else None (a new local
    instance). An http(s) address is the dashboard's, which ``ray job submit`` wants and
    ``ray.init`` refuses ("Invalid Ray address"): for this machine it becomes "auto" (the
    cluster running here), for another host it is an error naming what to set."""
    from urllib.parse import urlparse

    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address or not address.startswith(("http://", "https://")):
        return address
    host = urlparse(address).hostname
    if host in LOCAL_HOSTS:
        log(f"Ray: {address} is a dashboard address (for `ray job submit`); connecting to the cluster "
            f"running on this machine (ray.init(address='auto'))")
        return "auto"
    raise ValueError(
        f"RAY_ADDRESS={address} is a dashboard address, which ray.init cannot use: submit the job with "
        f"`python -m jobs.submit -- python -m jobs.<step> ...`, or set RAY_ADDRESS to the head's cluster "
        f"address (e.g. {host}:6379) and RAY_API_SERVER_ADDRESS to {address}")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def dashboard_address() -> str:
    """Where ``ray job submit`` goes: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else the
    local head's default (Ray's own order of precedence)."""
    for name in (API_SERVER_ENV, "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return "http://127.0.0.1:8265"


def init_ray(address: str | None = None, log=print, **kwargs) -> None:
    """Connect to the cluster this job was submitted to (RAY_ADDRESS), or start a local one.

    A RAY_API_SERVER_ADDRESS in this process's environment is passed on to the job's workers
    (Ray Train's placement-group cleaner asks that state API whether a trial is still alive)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get(API_SERVER_ENV) and "runtime_env" not in kwargs:
        kwargs["runtime_env"] = {"env_vars": {API_SERVER_ENV: os.environ[API_SERVER_ENV]}}
    address = ray_init_address(address, log)
    worker_niceness_default()  # these two are only read when ray.init starts a local instance
    serve_ingress_default(own_ports=address in (None, "local"))
    # A Ray instance started here inherits this process's environment: its workers (the training
    # tracker, Serve replicas) keep MLflow's retries rather than the driver's fail-fast settings.
    driver_only = {key: os.environ.pop(key) for key, value in _fail_fast_set.items() if os.environ.get(key) == value}
    try:
        ray.init(address=address, **kwargs)
    finally:
        os.environ.update(driver_only)
    if _interrupting:  # ray.init puts its own SIGTERM handler (sys.exit) in place of run_main's
        signal.signal(signal.SIGTERM, _interrupt)


# Ray Data's read and decode tasks each ask for one CPU, which must lie outside the Train
# workers' placement group: with every CPU reserved by workers, ingest waits forever.
INGEST_CPUS = 1.0


class ResourceError(ValueError):
    """The job's workers (and their ingest) cannot run on the cluster as it is."""


def fit_to_cluster(cfg: Config, ingest: str, cluster: dict[str, float], *, trials: int = 1,
                   trial_cpus: float = 0.0, log=print) -> str:
    """The ingest path that lets ``trials`` concurrent runs of ``cfg`` make progress on ``cluster``
    (``ray.cluster_resources()``), or :class:`ResourceError` naming the numbers and the setting
    to change. Ray Data ingest that does not fit becomes DataLoader ingest when the config left
    the choice to us (``ray.ingest=auto``). ``ray.autoscaling`` skips the check of the workers
    themselves: there the cluster grows to fit them."""
    r = cfg.ray
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    workers_cpu = trials * (r.num_workers * r.cpus_per_worker + trial_cpus)
    shape = (f"{trials} trials x " if trials > 1 else "") + f"{r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU"
    fewer = "lower tune.max_concurrent_trials, " if trials > 1 else ""
    if not r.autoscaling:
        if workers_cpu > have_cpu:
            raise ResourceError(
                f"the Train workers need {workers_cpu:g} CPU ({shape}) but the cluster has {have_cpu:g}: lower "
                f"ray.num_workers or ray.cpus_per_worker, start the head with more --num-cpus, or set "
                f"ray.autoscaling=true on a cluster that adds nodes")
        workers_gpu = trials * r.num_workers * r.gpus_per_worker if r.use_gpu else 0.0
        if workers_gpu > have_gpu:
            raise ResourceError(
                f"the Train workers need {workers_gpu:g} GPU ({trials * r.num_workers} x {r.gpus_per_worker:g}) "
                f"but the cluster has {have_gpu:g}: set ray.use_gpu=false, lower ray.num_workers or "
                f"ray.gpus_per_worker, or set ray.autoscaling=true on a cluster that adds GPU nodes")
    if ingest != "ray_data" or r.autoscaling:
        return ingest
    left = have_cpu - workers_cpu
    if left >= trials * INGEST_CPUS:
        return ingest
    numbers = (f"{shape} reserve {workers_cpu:g} of the cluster's {have_cpu:g} CPU, leaving {left:g} for "
               f"Ray Data's read and decode tasks, which need {trials * INGEST_CPUS:g}")
    if r.ingest == "auto":
        log(f"ingest: {numbers}; using DataLoader ingest on each worker instead (set ray.ingest explicitly "
            f"to choose; give the cluster more CPUs to use Ray Data)")
        return "dataloader"
    raise ResourceError(
        f"{numbers}, so the job would wait forever: set ray.ingest=dataloader, {fewer}lower ray.num_workers or "
        f"ray.cpus_per_worker, or start the head with more --num-cpus")


# --------------------------------------------------------------------------- how a job ends

#: Set (to anything) to have a job print the full traceback after its one-line error.
TRACEBACK_ENV = "IMGCLS_TRACEBACK"

# MLflow's HTTP client defaults (7 retries, backoff factor 2, a 120 s timeout: see
# mlflow/environment_variables.py) keep a job waiting about 4.5 minutes on a tracking server
# that is down before it fails. A job's driver uses these instead, wherever the user has not
# set them: 2 tries, the second at once (urllib3 sleeps 0-1 s before a first retry), so a
# refused connection fails in about a second and a server that accepts nothing or answers
# nothing in at most 2 x 10 + 1 = 21 s; one retry still rides out a dropped connection, and
# 10 s per request leaves room for artifact uploads through a proxying server. Training
# workers keep the Tracker's own settings (imgcls_core.tracking), and ride out longer outages
# by buffering metrics, not by waiting inside one request.
FAIL_FAST_MLFLOW = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_fail_fast_set: dict[str, str] = {}  # what fail_fast_mlflow() set in this process (init_ray leaves it out)


def fail_fast_mlflow() -> dict[str, str]:
    """Make this process's MLflow client give up on an unreachable tracking server within 30 s
    (see FAIL_FAST_MLFLOW); a value already in the environment (the user's) is kept. Returns
    what this call set. For a job's driver: :func:`init_ray` keeps it out of a Ray instance
    it starts."""
    set_now = {key: value for key, value in FAIL_FAST_MLFLOW.items() if key not in os.environ}
    os.environ.update(set_now)
    _fail_fast_set.update(set_now)
    return set_now


def run_main(body: Callable[[], int | None], *, what: str, tracking_uri: str | None = None) -> int:
    """Run a job's ``body`` and turn how it ended into the job's exit status and at most one
    ``error: ...`` line on stderr, the same for every job:

    - ``body()`` returns None: 0; an int: that int.
    - a bad config (:class:`imgcls_core.config.ConfigError`, ``tune_spaces.SpaceError``):
      ``error: bad config: <message>``, 2.
    - MLflow failing (``MlflowException``, or a connection error raised inside MLflow's client):
      ``error: <what> failed: MLflow at <tracking uri> is unreachable (...)`` or
      ``... MLflow at <tracking uri>: <message>``, 1.
    - anything else (``FileNotFoundError``, ``LookupError``, ``ValueError``, ``RuntimeError``,
      ``OSError``: their message; other exceptions: their type and message):
      ``error: <what> failed: <message>``, 1. An error Ray wraps (a failed Train worker or Ray
      task) is reported as the worker's own error, and only its message's first line (the last
      ``SomeError: ...`` line of a traceback Ray put into the message).
    - Ctrl-C: ``error: <what> interrupted``, 130.

    ``what`` names the job's work ("training", "promotion"); ``tracking_uri`` is the server named
    when an MLflow error does not say which (default: MLFLOW_TRACKING_URI). With $IMGCLS_TRACEBACK
    set the traceback follows the line. MLflow is made to fail fast first (:func:`fail_fast_mlflow`).
    Use it as ``return run_main(lambda: _body(args, cfg), what="training")``."""
    mine = fail_fast_mlflow()
    previous = _interrupt_on_sigterm()
    try:
        result = body()
    except KeyboardInterrupt:
        print(f"error: {what} interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place a job's failure becomes its exit status
        code, line = describe_failure(exc, what=what, tracking_uri=tracking_uri)
        print(line, file=sys.stderr)
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exception(exc)
        return code
    finally:
        _restore_mlflow_settings(mine)  # a caller in the same process (a test, imgcls) gets its own back
        if previous is not None:
            _interrupting.clear()
            signal.signal(signal.SIGTERM, previous)
    return 0 if result is None else int(result)


def _interrupt_on_sigterm():
    """Make SIGTERM a KeyboardInterrupt while a job runs (in the main thread, when nothing else
    handles it): `ray job stop` and `kill` send it, and by default it ends Python without unwinding,
    leaving the job's MLflow run RUNNING. Returns the handler to put back, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    _interrupting.append(True)
    signal.signal(signal.SIGTERM, _interrupt)
    return signal.SIG_DFL


_interrupting: list[bool] = []  # non-empty while run_main turns SIGTERM into KeyboardInterrupt (init_ray too)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _restore_mlflow_settings(mine: dict[str, str]) -> None:
    for key, value in mine.items():
        if os.environ.get(key) == value:
            del os.environ[key]
        _fail_fast_set.pop(key, None)


def describe_failure(exc: BaseException, *, what: str, tracking_uri: str | None = None) -> tuple[int, str]:
    """``(exit status, "error: ..." line)`` for an exception that ended a job (see :func:`run_main`)."""
    exc = unwrap_ray_error(exc)
    if isinstance(exc, ConfigError):  # tune_spaces.SpaceError is one too
        return 2, f"error: bad config: {one_line(exc)}"
    failing = mlflow_failure(exc)
    if failing is not None:
        return 1, f"error: {what} failed: {describe_tracking_error(failing, tracking_uri)}"
    known = (FileNotFoundError, LookupError, ValueError, RuntimeError, OSError)
    message = one_line(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {one_line(exc)}"
    quiet = isinstance(exc, known) or os.environ.get(TRACEBACK_ENV)
    hint = "" if quiet else f" ({TRACEBACK_ENV}=1 shows the traceback)"
    return 1, f"error: {what} failed: {message}{hint}"


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The error under Ray's wrappers: a Train worker group's (lowest rank's) or controller's
    failure, a Ray task's cause; ``exc`` itself when Ray did not wrap it."""
    for _ in range(8):
        failures = getattr(exc, "worker_failures", None)
        controller = getattr(exc, "controller_failure", None)
        health = getattr(exc, "health_check_failure", None)  # a worker that died: its ActorDiedError says why
        cause = getattr(exc, "cause", None) if type(exc).__module__.startswith("ray.") else None
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
        elif isinstance(controller, BaseException):
            exc = controller
        elif isinstance(health, BaseException):
            exc = health
        elif isinstance(cause, BaseException) and cause is not exc:
            exc = cause
        else:
            break
    return exc


def mlflow_failure(exc: BaseException) -> BaseException | None:
    """The MLflow error that ended a job: ``exc`` when it is one, else, for a LookupError, an
    unreachable server among its causes (a registry call that did not answer is no "not found")."""
    if _is_mlflow_error(exc):
        return exc
    if not isinstance(exc, LookupError):
        return None  # other errors that chain an MLflow one say more than it does (RegistrationError)
    seen, inner = {id(exc)}, exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        if _is_mlflow_error(inner) and is_unreachable(inner):
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return None


def _is_mlflow_error(exc: BaseException) -> bool:
    exceptions = sys.modules.get("mlflow.exceptions")  # not imported: MLflow cannot have raised it
    if exceptions is not None and isinstance(exc, exceptions.MlflowException):
        return True
    requests = sys.modules.get("requests.exceptions")
    network = (ConnectionError, TimeoutError, *((requests.RequestException,) if requests is not None else ()))
    return isinstance(exc, network) and _raised_in_mlflow(exc)


def _raised_in_mlflow(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("mlflow."):
            return True
        tb = tb.tb_next
    return False


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure)\b[^:]*: ")


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of ``exc``'s message; for a message that carries a traceback (Ray puts the
    worker's into it), the last ``SomeError: ...`` line of it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(lines) > 1 and any(item.startswith("Traceback (most recent call last)") for item in lines):
        line = next((item for item in reversed(lines) if _ERROR_LINE.match(item)), line)
    return line if len(line) <= limit else line[: limit - 3] + "..."
