"""Submit an imgcls job to a Ray cluster with `ray job submit`, with the right runtime_env.

    python -m jobs.submit [--address http://127.0.0.1:8265] [--no-wait] -- \\
        python -m jobs.train --config configs/digits_ray.yaml --register digits

Uploads the repository as the job's working_dir without data, results, .git
or the virtualenv (jobs/runtime_env.yaml), and sets IMGCLS_BASE_DIR to this
checkout so the config's relative paths (data/, results/, runs/) mean the same
folders on the cluster as here (true on one machine or a shared file system).
MLFLOW_TRACKING_URI is passed on when set. Token authentication stays on:
RAY_AUTH_MODE=token is set for the client. Everything after ``--`` is the
job's entrypoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from jobs.common import BASE_DIR_ENV, dashboard_address, run_main

REPO = Path(__file__).resolve().parents[1]
PASS_ON = ("MLFLOW_TRACKING_URI",)


def runtime_env(base_dir: Path) -> dict:
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env_vars = {BASE_DIR_ENV: str(base_dir)}
    env_vars.update({k: os.environ[k] for k in PASS_ON if os.environ.get(k)})
    env.setdefault("env_vars", {}).update(env_vars)
    return env


def ray_cli() -> str:
    """The ``ray`` command installed beside this Python (``.venv/bin/ray``), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] -- COMMAND ...")
    parser.add_argument("--address", default=dashboard_address(),
                        help="the cluster's dashboard address (default: RAY_API_SERVER_ADDRESS, else an http "
                             "RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting")
    parser.add_argument("--submission-id", help="job id (default: chosen by Ray)")
    if "--" not in argv:
        if {"-h", "--help"} & set(argv):
            parser.parse_args(["--help"])  # prints the help and exits 0
        print("error: put the job's command after --, e.g. -- python -m jobs.train --config ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    entrypoint = argv[split + 1 :]
    if not entrypoint:
        print("error: no job command after --", file=sys.stderr)
        return 2
    command = [ray_cli(), "job", "submit", "--address", args.address,
               "--runtime-env-json", json.dumps(runtime_env(Path.cwd()))]
    if args.no_wait:
        command.append("--no-wait")
    if args.submission_id:
        command += ["--submission-id", args.submission_id]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    # `ray job submit` prints its own errors; a missing `ray` command or Ctrl-C get run_main's line.
    return run_main(lambda: subprocess.run([*command, "--", *entrypoint], env=env).returncode,
                    what="submission")


if __name__ == "__main__":
    sys.exit(main())
