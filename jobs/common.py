"""What every Ray job shares: config flags, path resolution, connecting to Ray."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgcls_core.config import Config, ConfigError, load_config

# Relative paths in a config are resolved against this directory when it is set.
# `ray job submit --working-dir .` runs the job in a copy of the repository that
# leaves out data/ and results/ (see jobs/runtime_env.yaml), so submitters set it
# to the repository on the cluster's shared file system.
BASE_DIR_ENV = "IMGCLS_BASE_DIR"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


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


def resolve_path(path: str) -> str:
    """An absolute local path (against $IMGCLS_BASE_DIR, else the cwd); URIs unchanged."""
    if is_uri(path) or os.path.isabs(path):
        return path
    base = Path(os.environ.get(BASE_DIR_ENV) or os.getcwd())
    return str((base / path).resolve())


def resolve_config_paths(cfg: Config) -> Config:
    """Make data.root, train.output_dir and ray.storage_path absolute, so workers on any
    node and in any working directory see the same locations."""
    cfg.data.root = resolve_path(cfg.data.root)
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
    ray.init(address=ray_init_address(address, log), **kwargs)


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
