"""The whole imgcls pipeline on one machine, every step through `ray job submit` (`make demo`).

    .venv/bin/python cluster/local/demo.py [--config configs/demo.yaml]
    bash cluster/local/stop.sh          # ends the Ray head and MLflow server started here (make stop)

Stages: start a local Ray head (token auth) and MLflow tracking server (sqlite,
local artifacts), all on 127.0.0.1; write the digits as PNGs and Parquet shards;
train with Ray Train (2 DDP workers, Ray Data ingest); promote that baseline to
`champion`; a small ASHA sweep with Ray Tune; promote the sweep's best only if
it beats the champion on the test split; deploy the Serve endpoint; classify
one real test digit of every class over HTTP. Each stage prints its time.

Re-running reuses what exists: a running head and server, the data, finished
training and sweep runs, registered versions (no duplicates) and the deployed app.
"""

from __future__ import annotations

import argparse
import json
import os
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


class Stages:
    def __init__(self, total: int):
        self.total, self.n, self.times = total, 0, []
        self.started = time.perf_counter()

    def run(self, title: str, command: list[str] | None = None, env: dict | None = None, fn=None):
        self.n += 1
        print(f"\n==> [{self.n}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        if command is not None:
            print("    $ " + " ".join(command), flush=True)
            code = subprocess.run(command, cwd=REPO, env=env).returncode
            if code != 0:
                print(f"error: stage '{title}' failed (exit {code})", file=sys.stderr)
                sys.exit(code)
        result = fn() if fn is not None else None
        seconds = time.perf_counter() - t0
        self.times.append((title, seconds))
        print(f"<== [{self.n}/{self.total}] {title}: {seconds:.0f} s", flush=True)
        return result

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
    stages = Stages(8)

    stages.run("start the local Ray head and MLflow server", ["bash", "cluster/local/start.sh"], env)
    stages.run("prepare: digits -> PNGs -> Parquet shards",
               [PY, "-m", "jobs.prepare", "--digits", "data/digits", "--shards", "data/digits_shards"], env)
    stages.run("train: Ray Train, 2 DDP workers (ray job submit)", submit("jobs.train", "--config", config), env)

    from imgcls_core.config import load_config

    cfg = load_config(REPO / config)
    summary = json.loads((REPO / cfg.train.output_dir / "train_summary.json").read_text())
    stages.run("promote the trained model (the first champion)",
               submit("jobs.promote", "--config", config, "--run-id", summary["mlflow_run_id"]), env)
    stages.run("tune: ASHA sweep over LR schedules and augmentation (ray job submit)",
               submit("jobs.tune", "--config", config, "--set", "ray.num_workers=1",
                      "--set", "ray.ingest=dataloader", "--set", "train.epochs=3"), env)
    stages.run("promote the sweep's best trial if it beats the champion",
               submit("jobs.promote", "--config", config), env)
    stages.run("deploy the Serve endpoint (ray job submit)",
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
