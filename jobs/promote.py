"""Promote a trained model into the MLflow registry, gated on held-out test accuracy.

    python -m jobs.promote --config configs/digits_ray.yaml --model digits          # the sweep's best trial
    python -m jobs.promote --config configs/digits_ray.yaml --model digits --run-id <MLflow run id>
    python -m jobs.promote --summary runs/mine/train_summary.json --model mine      # one training run
    python -m jobs.promote ... --force --reason "rollback after incident 42"

The candidate is the best trial of the sweep that ``jobs.tune`` ran with the
same config (``<train.output_dir>/sweep_summary.json``), the run given by
``--run-id``, or the run a ``train_summary.json`` names (``--summary``: written by
jobs.train, jobs.train_local and recorded by jobs.register; without ``--config``
the ``config.yaml`` that jobs.train_local writes beside it is the config, so the test
split is the run's own).
It is registered (once: re-running finds the same version),
tagged with its test metrics, the sweep and a SHA-256 of the test split, and
gets the ``challenger`` alias. ``champion`` moves to it only if its test top-1
beats the champion's by ``tracking.promote_margin`` (``--margin``), both models
evaluated on the same test split; ``--force --reason`` moves it anyway and
records the reason. The comparison is printed and written to
``<train.output_dir>/promotion.json``. No ``champion`` alias yet makes the
candidate the first champion; a registry that fails (the tracking server down)
fails the job and leaves ``champion`` alone. Right before moving it the champion
is read again: when another promotion moved it meanwhile, the decision is made
again against the new champion.

Exit status: 0 when the decision was made (promoted or not), 1 on failure, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from imgcls_core.config import Config, score_name
from imgcls_core.tracking import SUMMARY_FILE
from jobs.common import add_config_args, config_beside, config_or_exit, read_json, resolve_config_paths, run_main

DATA_TAG = "imgcls.test_data_sha256"


def candidate_run(cfg: Config, run_id: str | None, summary: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(run id, tags)`` of the model to promote: ``run_id``, else the run ``summary`` (a
    train_summary.json) names, else the sweep's best trial."""
    if run_id:
        return run_id, {}
    if summary is not None:
        return summary_run(Path(summary))
    sweep_file = Path(cfg.train.output_dir) / "sweep_summary.json"
    if not sweep_file.exists():
        raise FileNotFoundError(f"no sweep summary at {sweep_file}; run `python -m jobs.tune` with this config "
                                f"first, or pass --run-id or --summary <output_dir>/{SUMMARY_FILE}")
    sweep = read_json(sweep_file, "a sweep summary (jobs.tune writes it)",
                      ("best_output_dir", "best_trial", "sweep", "parent_run_id"))
    trial_file = Path(sweep["best_output_dir"]) / SUMMARY_FILE
    if not trial_file.exists():
        raise FileNotFoundError(f"the sweep's best trial left no {trial_file}; did it finish?")
    trial = read_json(trial_file, "a training summary")
    if not trial.get("mlflow_run_id"):
        raise LookupError(f"the best trial {sweep['best_trial']} has no MLflow run; was tracking enabled?")
    return trial["mlflow_run_id"], {"imgcls.sweep": sweep["sweep"], "imgcls.sweep_run_id": sweep["parent_run_id"],
                                    "imgcls.trial": sweep["best_trial"]}


def summary_run(summary: Path) -> tuple[str, dict[str, Any]]:
    """The MLflow run a train_summary.json names."""
    if not summary.is_file():
        raise FileNotFoundError(f"no training summary at {summary}; jobs.train and jobs.train_local write "
                                f"<train.output_dir>/{SUMMARY_FILE} once every epoch ran")
    run_id = read_json(summary, "a training summary (jobs.train and jobs.train_local write it)").get("mlflow_run_id")
    if not run_id:
        model = summary.parent / "model.pt"
        raise LookupError(f"{summary} names no MLflow run (tracking was off); register the model first: "
                          f"python -m jobs.register --model {model}")
    return run_id, {"imgcls.summary": str(summary.resolve())}


def promote(cfg: Config, *, model_name: str, run_id: str | None = None, margin: float | None = None,
            force_reason: str | None = None, summary: str | Path | None = None, log=print):
    """Register the candidate, evaluate it and the champion on the test split, and move the aliases."""
    from imgcls_core.data import load_dataset, materialize_digits
    from imgcls_core.predict import Predictor
    from imgcls_core.registry import CHALLENGER, CHAMPION, Decision, Registry, gate_champion

    cfg = resolve_config_paths(cfg)
    margin = cfg.tracking.promote_margin if margin is None else margin
    run_id, tags = candidate_run(cfg, run_id, summary)
    registry = Registry(cfg.tracking.tracking_uri, model_name)  # a missing store is refused before any work
    if cfg.data.format == "digits":
        materialize_digits(cfg.data.root, seed=cfg.data.seed)
    test = load_dataset(cfg.data).test
    if test is None:
        raise ValueError(f"{cfg.data.root} has no held-out test split ({cfg.data.test_split}/); promotion "
                         f"compares models on data neither was trained or selected on")
    data_hash = test.fingerprint()
    version, created = registry.register(run_id, tags)
    number = str(version.version)
    log(f"{'registered' if created else 'found'} {model_name} v{number} for run {run_id}")
    metric = score_name(cfg)  # test top-1, or test mAP for multi-label data
    score_tag = f"test/{metric}"

    def test_score(v) -> float:
        if v.tags.get(DATA_TAG) == data_hash and score_tag in v.tags:
            return float(v.tags[score_tag])  # measured on this very split before
        with tempfile.TemporaryDirectory(prefix="imgcls-model-") as tmp:
            predictor = Predictor.from_file(registry.model_file(v.version, tmp))
        report = predictor.evaluate(test, cfg.data.eval_batch_size)
        registry.tag(v.version, {**report.metrics("test/"), DATA_TAG: data_hash})
        log(f"{model_name} v{v.version}: test {'top-1' if metric == 'acc1' else metric} {report.score:.4f} "
            f"on {len(test)} images")
        return report.score

    challenger_acc = test_score(version)
    registry.set_alias(CHALLENGER, number)
    promoted, reason, champion, champion_acc = gate_champion(
        registry, number, challenger_acc, evaluate=test_score, margin=margin, force_reason=force_reason, log=log)
    after = registry.alias(CHAMPION)
    if promoted and (after is None or str(after.version) != number):
        log(f"warning: {model_name}'s champion is {f'v{after.version}' if after else 'unset'} now: another "
            f"promotion moved it right after this one")
    decision = Decision(model_name, number, run_id, challenger_acc,
                        str(champion.version) if champion is not None else None, champion_acc,
                        margin, promoted, reason, created, str(after.version) if after else None,
                        extra={"test_images": len(test), "test_data_sha256": data_hash, **tags}, metric=metric)
    registry.tag(number, {"imgcls.promotion": "promoted" if promoted else "not promoted",
                                   "imgcls.promotion_reason": reason,
                                   "imgcls.compared_with": f"v{decision.champion_version}: {champion_acc}"
                                   if champion_acc is not None else
                                   f"v{decision.champion_version}: not evaluated" if decision.champion_version
                                   and decision.champion_version != number else "none"})
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "promotion.json").write_text(json.dumps(decision.to_dict(), indent=1))
    log(decision.summary())
    return decision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--model", help="registered model name (default: tracking.register_as, else 'imgcls')")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="promote this MLflow run's model instead of the sweep's best trial")
    which.add_argument("--summary", metavar="TRAIN_SUMMARY_JSON",
                       help="promote the run this train_summary.json names (its config.yaml is the default "
                            "--config)")
    parser.add_argument("--margin", type=float, help="test top-1 (multi-label: test mAP) to gain over the champion "
                                                     "(default: tracking.promote_margin)")
    parser.add_argument("--force", action="store_true", help="move champion whatever the comparison says")
    parser.add_argument("--reason", help="why --force was needed (required with --force; recorded on the version)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary and not Path(args.summary).is_file() and not args.print_config:
        print(f"error: no training summary at {args.summary}; jobs.train and jobs.train_local write "
              f"<train.output_dir>/{SUMMARY_FILE} once every epoch ran", file=sys.stderr)
        return 2
    if args.summary and not args.config:
        args.config = config_beside(args.summary)  # the run's own data, test split and tracking server
        if args.config is None and not args.overrides:
            print(f"error: no config.yaml beside {args.summary}; pass --config (or --set data.format=... "
                  f"--set data.root=...): the data the run trained on holds the test split", file=sys.stderr)
            return 2
    cfg, done = config_or_exit(args)
    if done is not None:
        return done
    if args.margin is not None and not math.isfinite(args.margin):
        print(f"error: --margin must be a number (it is {args.margin})", file=sys.stderr)
        return 2
    if args.force and not (args.reason or "").strip():
        print("error: --force needs --reason TEXT (it is recorded on the model version)", file=sys.stderr)
        return 2
    if args.reason and not args.force:
        print("error: --reason goes with --force", file=sys.stderr)
        return 2

    def body() -> None:
        promote(cfg, model_name=args.model or cfg.tracking.register_as or "imgcls", run_id=args.run_id,
                margin=args.margin, force_reason=args.reason if args.force else None, summary=args.summary)

    return run_main(body, what="promotion", tracking_uri=cfg.tracking.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
