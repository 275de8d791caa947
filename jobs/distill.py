"""Knowledge distillation on Ray Train: a smaller student learns from a trained teacher.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.distill --config configs/digits_ray.yaml \\
           --teacher models:/digits@champion --set model.width=0.125 [--register digits-small]

The student is the config's ``model`` section, trained exactly as jobs.train
trains it (DDP workers, checkpoints, resume, one MLflow run), with the loss
``alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE``
(``distill.temperature``, ``distill.alpha``). ``distill.teacher`` (or
``--teacher``) is ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a
local ``model.pt``; the driver pins an alias to its current version and checks
the teacher's classes and input size against the data, then every worker
downloads and loads the teacher itself. The MLflow run gets the ``distill.*``
params plus ``derived.teacher_uri`` / ``derived.teacher_version`` and a
``train/kd_loss`` curve. At the end the teacher is evaluated on the same test
split and the job prints student vs teacher test top-1 (logged as
``teacher/test_acc1``).

Exit status: 0 on success, 1 when training failed, 2 on a bad config (or no teacher).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from imgcls_core.config import Config
from jobs.common import add_config_args, job_config, positive_int
from jobs.train import run_job, run_training


def run_distillation(cfg: Config, *, register_as: str | None = None, stop_after: int | None = None,
                     log=print) -> dict[str, Any]:
    """Train the student with jobs.train's machinery, then compare it with its teacher on test."""
    if not cfg.distill.teacher:
        raise ValueError("distill.teacher is not set; pass --teacher models:/<name>@<alias> (or a model.pt path)")
    summary = run_training(cfg, register_as=register_as, stop_after=stop_after, log=log)
    if summary.get("test_acc1") is None:
        return summary  # stopped early, or no test split: nothing to compare yet
    teacher_acc1, n = evaluate_teacher(cfg, summary["teacher"], summary["model_file"])
    summary["teacher_test_acc1"] = teacher_acc1
    _log_teacher_metric(cfg, summary["mlflow_run_id"], teacher_acc1, summary["epochs"], log)
    log(f"student test top-1 {summary['test_acc1']:.4f} ({cfg.model.name} width {cfg.model.width}) vs teacher "
        f"{teacher_acc1:.4f} ({summary['teacher']}) on the same {n}-image test split: "
        f"{summary['test_acc1'] - teacher_acc1:+.4f}")
    return summary


def evaluate_teacher(cfg: Config, teacher: str, student_file: str) -> tuple[float, int]:
    """The teacher's top-1 on the student's test split (preprocessed the teacher's way), and its size."""
    from imgcls_core.data import load_dataset
    from imgcls_core.engine import Preprocessing, load_checkpoint, load_teacher
    from imgcls_core.predict import Predictor

    student = Preprocessing.from_dict(load_checkpoint(student_file)["preprocessing"])
    loaded = load_teacher(teacher, student, tracking_uri=cfg.tracking.tracking_uri)
    test = load_dataset(cfg.data).test
    report = Predictor(loaded.network, loaded.preprocessing).evaluate(test, cfg.data.eval_batch_size)
    return report.acc1, report.n


def _log_teacher_metric(cfg: Config, run_id: str | None, acc1: float, step: int, log) -> None:
    if run_id is None:
        return
    from imgcls_core.tracking import Tracker

    tracker = Tracker(cfg.tracking, log=log).start(run_id=run_id)
    tracker.log_metrics({"teacher/test_acc1": acc1}, step=step)
    tracker.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.distill", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ray_address=True)
    parser.add_argument("--teacher", metavar="URI",
                        help="the teacher: models:/<name>@<alias>, models:/<name>/<version> or a model.pt path "
                             "(same as --set distill.teacher=URI)")
    parser.add_argument("--register", metavar="NAME", help="register the student under this name")
    parser.add_argument("--stop-after", type=positive_int, metavar="N",
                        help="stop after N epochs of this invocation (re-run with the same name to resume)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.teacher:
        # quoted: a YAML string whatever the path holds ('#', '@', ': ')
        argv = [*(sys.argv[1:] if argv is None else argv), "--set", f"distill.teacher={json.dumps(args.teacher)}"]
    args, cfg, done = job_config(parser, argv)
    if done is not None:
        return done
    if not cfg.distill.teacher:
        print("error: bad config: distill.teacher is not set (use --teacher URI)", file=sys.stderr)
        return 2
    return run_job(cfg, args, run_distillation, "distillation")  # jobs.common.run_main's exit codes and errors


if __name__ == "__main__":
    # Run the imported module, not __main__: the worker loop must travel by reference (see jobs/train.py).
    from jobs.distill import main as _main

    sys.exit(_main())
