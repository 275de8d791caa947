"""The whole imgcls pipeline on one machine, every step a Ray job (`make demo`).

    .venv/bin/python cluster/local/demo.py [--config configs/demo.yaml]
    bash cluster/local/stop.sh          # ends the Ray head and MLflow server started here (make stop)

Stages: start a local Ray head (token auth) and MLflow tracking server (sqlite,
local artifacts), all on 127.0.0.1; write the digits as PNGs and Parquet shards;
train with Ray Train (2 DDP workers, DataLoader ingest of the batched-augmentation recipe); promote that baseline to
`champion`; a small ASHA sweep with Ray Tune; promote the sweep's best only if
it beats the champion on the test split; deploy the Serve endpoint; classify
one real test digit of every class over HTTP. Each stage prints its time.

Each job goes through jobs.submit (Ray's job submission SDK, what `ray job submit` uses).
A stage's output is shown as it comes, less the known, harmless chatter of Ray's job submission
and internals listed in QUIET (each with the reason it is safe to leave out); every
line, those included, is in the stage's log under $IMGCLS_STATE_DIR/demo-logs/ (each line
prefixed with the seconds into the stage it came at), and the
stage's last line says how many were left out. A line that mentions an error is always
shown unless a QUIET entry names it exactly.

Re-running reuses what exists: a running head and server, the data, finished
training and sweep runs, registered versions (no duplicates) and the deployed app.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def local_env() -> dict[str, str]:
    """cluster/local/env.sh, evaluated by bash: one source of truth for ports and addresses."""
    out = subprocess.run(["bash", "-c", ". cluster/local/env.sh && env -0"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {**env, "PATH": f"{Path(PY).parent}:{env.get('PATH', '')}"}


# Lines left out of the demo's output (they stay in the stage logs), and why each is harmless.
QUIET = [re.compile(p) for p in (
    # Ray's job manager setting up the job's runtime env, at the top of every job's log
    r"\bINFO job_manager\.py:\d+ -- ",
    # Ray Data's notice that its progress bars are off: jobs/runtime_env.yaml turns them off
    r"Progress bars disabled\. To enable",
    # a deprecation inside Ray Data's own defaults, and the source line Python prints with it
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
    # matplotlib building its font cache on the first plot under a new HOME
    r"generated new fontManager",
    # Ray 2.60 logs every report and checkpoint at INFO under a logger named after its source file,
    # which Train's LoggingConfig (WARNING, set by jobs.train) cannot reach; the epoch lines say it all
    r"Reporting training result \d+: TrainingReport\(",
    r"Checkpoint successfully created at: Checkpoint\(",
    # Ray Data's INFO line at the end of each epoch's pass over the data
    r"✔️ +Dataset \S+ execution finished in ",
    # MLflow checks every PythonModel subclass for predict() type hints (inside a warnings filter of
    # its own, so it cannot be silenced); the model's explicit tensor signature makes them moot
    r"UserWarning: .*Add type hints to the `predict` method",
    r"(^|\s)color_warning\(\s*$",
    # MLflow's registry polling for the version it just created
    r"Waiting up to \d+ seconds for model version to finish creation",
)]
# Lines that mention an error are shown unless one of these names them exactly.
HARMLESS_ERRORS = [re.compile(p) for p in (
    # GCS asked a Ray Data actor to exit that had exited already
    r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: .*Socket closed",
)]
ERROR = re.compile(r"error|exception|traceback|failed", re.IGNORECASE)
# A trial that ASHA stops gets SIGTERM; Ray's handler raises SystemExit, which Python reports as
# ignored when it lands inside a weakref callback: the trial ended as intended. The whole report,
# from its first line to its last, is left out.
IGNORED_EXIT = (re.compile(r"Exception ignored in: <function WeakSet\.__init__\.<locals>\._remove"),
                re.compile(r"SystemExit: 1\s*$"))


def quiet(line: str) -> bool:
    if ERROR.search(line):
        return any(p.search(line) for p in HARMLESS_ERRORS)
    return any(p.search(line) for p in QUIET)


class LineFilter:
    """quiet() plus the multi-line report of an ignored SystemExit (IGNORED_EXIT), per output stream."""

    def __init__(self):
        self.in_ignored_exit = False

    def hides(self, line: str) -> bool:
        if IGNORED_EXIT[0].search(line):
            self.in_ignored_exit = True
        if self.in_ignored_exit:
            self.in_ignored_exit = not IGNORED_EXIT[1].search(line)
            return True
        return quiet(line)


class Stages:
    def __init__(self, total: int, log_dir: Path):
        self.total, self.n, self.times = total, 0, []
        self.started = time.perf_counter()
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def run(self, title: str, command: list[str] | None = None, env: dict | None = None, fn=None):
        self.n += 1
        print(f"\n==> [{self.n}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        if command is not None:
            print("    $ " + " ".join(command), flush=True)
            code = self._run(title, command, env)
            if code != 0:
                print(f"error: stage '{title}' failed (exit {code})", file=sys.stderr)
                sys.exit(code)
        result = fn() if fn is not None else None
        seconds = time.perf_counter() - t0
        self.times.append((title, seconds))
        print(f"<== [{self.n}/{self.total}] {title}: {seconds:.0f} s", flush=True)
        return result

    def _run(self, title: str, command: list[str], env: dict | None) -> int:
        """Run ``command``, its output to the stage's log and, less the QUIET lines, to the screen."""
        log = self.log_dir / f"{self.n}-{re.sub(r'[^a-z0-9]+', '-', title.split(':')[0].lower()).strip('-')}.log"
        left_out, lines, t0 = 0, LineFilter(), time.perf_counter()
        with open(log, "w") as out, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
            for line in proc.stdout:
                out.write(f"{time.perf_counter() - t0:7.2f} {line}")  # seconds into the stage: where time goes
                if lines.hides(line):
                    left_out += 1
                else:
                    print(line, end="", flush=True)
        if left_out:
            noun = "line" if left_out == 1 else "lines"
            print(f"    ({left_out} {noun} of Ray's routine output left out; all of it: {log.relative_to(REPO)})"
                  if log.is_relative_to(REPO) else f"    ({left_out} {noun} left out; all of it: {log})", flush=True)
        return proc.returncode

    def report(self) -> None:
        print("\nstage times:")
        for title, seconds in self.times:
            print(f"  {seconds:6.0f} s  {title}")
        print(f"  {time.perf_counter() - self.started:6.0f} s  total")


def submit(*job: str) -> list[str]:
    return [PY, "-m", "jobs.submit", "--", "python", "-m", *job]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster/local/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    args = parser.parse_args(argv)
    env = local_env()
    os.environ.update(env)
    config = args.config
    stages = Stages(8, Path(env["IMGCLS_STATE_DIR"]) / "demo-logs")

    stages.run("start the local Ray head and MLflow server", ["bash", "cluster/local/start.sh"], env)
    stages.run("prepare: digits -> PNGs -> Parquet shards",
               [PY, "-m", "jobs.prepare", "--digits", "data/digits", "--shards", "data/digits_shards"], env)
    stages.run("train: Ray Train, 2 DDP workers (Ray job)", submit("jobs.train", "--config", config), env)

    from imgcls_core.config import load_config

    cfg = load_config(REPO / config)
    summary = json.loads((REPO / cfg.train.output_dir / "train_summary.json").read_text())
    stages.run("promote the trained model (the first champion)",
               submit("jobs.promote", "--config", config, "--run-id", summary["mlflow_run_id"]), env)
    stages.run("tune: ASHA sweep over LR schedules and augmentation (Ray job)",
               submit("jobs.tune", "--config", config, "--set", "ray.num_workers=1",
                      "--set", "ray.ingest=dataloader", "--set", "train.epochs=3"), env)
    stages.run("promote the sweep's best trial if it beats the champion",
               submit("jobs.promote", "--config", config), env)
    stages.run("deploy the Serve endpoint (Ray job)",
               submit("jobs.deploy", "--config", config, "--port", env["SERVE_PORT"]), env)

    def predict():
        from serve.client import Client, format_predictions

        files = [sorted((REPO / "data/digits/test" / str(d)).glob("*.png"))[0] for d in range(10)]
        result = Client(env["IMGCLS_SERVE_URL"], token=os.environ.get(cfg.serve.token_env)).predict(files, top_k=3)
        print(format_predictions(result))
        right = sum(p["top_k"][0]["label"] == f.parent.name for p, f in zip(result["predictions"], files))
        print(f"{right}/{len(files)} correct (true labels are the folder names)")
        if right < 9:
            print(f"error: only {right} of {len(files)} test digits classified right (expected at least 9)",
                  file=sys.stderr)
        return right

    right = stages.run("classify real test digits over HTTP", fn=predict)
    stages.report()
    print(f"""
MLflow UI        {env['MLFLOW_TRACKING_URI']}
Ray dashboard    {env['RAY_API_SERVER_ADDRESS']}   (sign in with the token that `ray get-auth-token` prints)
endpoint         {env['IMGCLS_SERVE_URL']}/v1/predict   (docs {env['IMGCLS_SERVE_URL']}/docs)
try it           .venv/bin/python -m serve.client data/digits/test/3/*.png
stop everything  make stop""")
    return 0 if right >= 9 else 1


if __name__ == "__main__":
    sys.exit(main())
