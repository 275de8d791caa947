"""Submit an imgcls job to a Ray cluster (what `ray job submit` does), with the right runtime_env.

    python -m jobs.submit [--address http://127.0.0.1:8265] [--no-wait] -- \\
        python -m jobs.train --config configs/digits_ray.yaml --register digits

Uploads the repository as the job's working_dir without data, results, .git
or the virtualenv (jobs/runtime_env.yaml), and sets IMGCLS_BASE_DIR to the
directory it runs in, so the config's relative paths (data/, results/, runs/)
mean the same folders on the cluster as for a local run there (true on one
machine or a shared file system).
MLFLOW_TRACKING_URI is passed on when set. Token authentication stays on:
RAY_AUTH_MODE=token is set for the client. Everything after ``--`` is the
job's entrypoint.

The job goes through Ray's job submission SDK, the client `ray job submit` uses,
so it is an ordinary Ray job (`ray job list|logs|stop` know it). Its output is
followed as it comes, and the command returns as soon as Ray marks the job
finished, with 0 when it succeeded and 1 when it failed or was stopped. (`ray
job submit`'s own log tail returns about 6 s after a job ends: its server side
polls the log file and the job state once a second each, one after the other.)
Ctrl-C stops following, not the job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import yaml

from jobs.common import BASE_DIR_ENV, dashboard_address, run_main

if TYPE_CHECKING:
    from ray.job_submission import JobStatus

REPO = Path(__file__).resolve().parents[1]
PASS_ON = ("MLFLOW_TRACKING_URI",)


def runtime_env(base_dir: Path) -> dict:
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(REPO)
    env_vars = {BASE_DIR_ENV: str(base_dir)}
    env_vars.update({k: os.environ[k] for k in PASS_ON if os.environ.get(k)})
    env.setdefault("env_vars", {}).update(env_vars)
    return env


STATUS_POLL_S = 0.2


async def follow(client, job_id: str, out: TextIO | None = None) -> JobStatus:
    """Print the job's output (to ``out``, default stdout) as it comes until the job ends; its
    final status.

    Ray's log stream (a websocket) ends a few seconds after the job does, so the job's status is
    polled beside it: once the job is finished the stream is dropped, and what it had not
    delivered yet is read from the job's whole log."""
    out = out or sys.stdout
    printed = 0

    async def stream() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    tail = asyncio.ensure_future(stream())
    try:
        while True:
            status = await asyncio.to_thread(client.get_job_status, job_id)
            if status.is_terminal():
                break
            await asyncio.sleep(STATUS_POLL_S)
    finally:
        tail.cancel()
        await asyncio.gather(tail, return_exceptions=True)
    rest = (await asyncio.to_thread(client.get_job_logs, job_id))[printed:]
    out.write(rest)
    out.flush()
    return status


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
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    return run_main(lambda: submit(args.address, entrypoint, no_wait=args.no_wait,
                                   submission_id=args.submission_id), what="submission")


def submit(address: str, entrypoint: list[str], *, no_wait: bool = False, submission_id: str | None = None) -> int:
    """Submit ``entrypoint`` as a Ray job and (unless ``no_wait``) follow it; the exit status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    # Ray's packaging logs each file it leaves out of the upload, and its SDK every upload, at
    # INFO (the SDK's logger sets its own level); their warnings still show.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # jobs/runtime_env.yaml's excludes name .git, .venv and the rest already; without Ray's own
    # default list, Ray does not warn that it now leaves .git and .venv out.
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(Path.cwd()),
                               submission_id=submission_id)
    print(f"job {job_id} submitted to {address}", flush=True)
    started = time.monotonic()
    if no_wait:
        print(f"follow it: ray job logs -f {job_id}    stop it: ray job stop {job_id}")
        return 0
    try:
        status = asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following job {job_id}; it keeps running (ray job logs -f {job_id}; "
              f"ray job stop {job_id})", file=sys.stderr)
        return 130
    seconds = time.monotonic() - started
    if status == JobStatus.SUCCEEDED:
        print(f"job {job_id} succeeded in {seconds:.0f} s", flush=True)
        return 0
    # Ray's message repeats the end of the log, printed already: its first part says why.
    message = (client.get_job_info(job_id).message or "").split(", last available logs")[0].strip()
    print(f"error: job {job_id} {status.value.lower()} after {seconds:.0f} s" + (f": {message}" if message else ""),
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
