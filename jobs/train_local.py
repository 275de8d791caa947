"""Train and evaluate on one machine, without Ray.

    python -m jobs.train_local --config configs/digits.yaml [--set optim.lr=0.05 ...]

Prints the data summary, one line per epoch (loss, top-1, LR, images/s) and
the test report; writes checkpoints and artifacts to train.output_dir.
Re-running with the same output_dir resumes from its newest checkpoint
("resuming from epoch N"); a finished run only re-evaluates.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_config_args, job_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_local", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs of this invocation (resume later by re-running)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done
    from imgcls_core.runner import train_and_evaluate  # heavy imports after the config is known good

    try:
        result = train_and_evaluate(cfg, stop_after=args.stop_after)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if result.history or result.test is not None else 1


if __name__ == "__main__":
    sys.exit(main())
