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
    cfg = config_from_args(args)
    if cfg is None:
        return args, None, 2
    if args.print_config:
        print(cfg.to_yaml())
        return args, cfg, 0
    return args, cfg, None


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


def init_ray(address: str | None = None, **kwargs) -> None:
    """Connect to the cluster this job was submitted to (RAY_ADDRESS), or start a local one.

    A RAY_API_SERVER_ADDRESS in this process's environment is passed on to the job's workers
    (Ray Train's placement-group cleaner asks that state API whether a trial is still alive)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get(API_SERVER_ENV) and "runtime_env" not in kwargs:
        kwargs["runtime_env"] = {"env_vars": {API_SERVER_ENV: os.environ[API_SERVER_ENV]}}
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, **kwargs)
