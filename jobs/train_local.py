"""Train and evaluate on one machine, without Ray.

    python -m jobs.train_local --config configs/digits.yaml [--set optim.lr=0.05 ...]

Prints the data summary, one line per epoch (loss, top-1, LR, images/s) and
the test report; writes checkpoints and artifacts to train.output_dir, and
train_summary.json there once every epoch ran. Re-running with the same
output_dir resumes from its newest checkpoint ("resuming from epoch N"); a
finished run only re-evaluates. With tracking.enabled (--set tracking.enabled=true;
the server is tracking.tracking_uri, else MLFLOW_TRACKING_URI) the run is logged
to MLflow like a Ray Train job's: params, per-epoch metrics, artifacts and the
model (registered as tracking.register_as when set). Serve the model with
``python -m jobs.register --model <output_dir>/model.pt`` and ``jobs.promote --summary``.

Exit status: 0 on success, 1 when training failed, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import sys

from imgcls_core.config import Config
from jobs.common import add_config_args, job_config, positive_int, resolve_config_paths, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_local", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                        help="stop after N epochs of this invocation (resume later by re-running)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done
    return run_main(lambda: train(cfg, args), what="training", tracking_uri=cfg.tracking.tracking_uri)


def train(cfg: Config, args: argparse.Namespace) -> int:
    """Train, evaluate and report; the exit status."""
    # heavy imports after the config is known good
    from imgcls_core.runner import train_and_evaluate
    from imgcls_core.tracking import SUMMARY_FILE

    # absolute paths in <output_dir>/config.yaml: jobs.promote --summary reads it from anywhere
    result = train_and_evaluate(resolve_config_paths(cfg), stop_after=args.stop_after)
    if result.summary:
        run = f"MLflow run {result.mlflow_run_id}; " if result.mlflow_run_id else ""
        print(f"done: {run}model {result.files['model']}; summary {result.output_dir / SUMMARY_FILE}")
    # a finished run run again trains nothing and has no test split to evaluate: still done
    return 0 if result.summary or result.history else 1


if __name__ == "__main__":
    sys.exit(main())
