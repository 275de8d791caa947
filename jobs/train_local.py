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

from imgcls_core.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (defaults apply to missing keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=0.2 (repeatable)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N epochs of this invocation (resume later by re-running)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: bad config: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from imgcls_core.runner import train_and_evaluate  # heavy imports after the config is known good

    try:
        result = train_and_evaluate(cfg, stop_after=args.stop_after)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if result.history or result.test is not None else 1


if __name__ == "__main__":
    sys.exit(main())
