"""Prepare a data set: an ImageFolder tree to Parquet shards, or scikit-learn's digits to disk.

    python -m jobs.prepare --source data/flowers --out data/flowers_shards [--workers N]
    python -m jobs.prepare --digits data/digits [--shards data/digits_shards]

--source takes <src>/{train,val,test}/<class>/<image> or a flat <src>/<class>/<image>
tree (all of it train). A val or test split the source lacks is held out of its
train files: --val-fraction and --test-fraction of them (default 0.1 each; 0: none),
stratified by class and seeded by --seed, so a re-run writes the same splits; the
output says which splits were held out and how many files each got. Every image is
decoded once to check it; corrupt, truncated and empty files are skipped. Prints
the images and shards per split (--shard-size images per file, default 2048) and
each skipped file with its reason; the full report is written to <out>/report.json.
Train on the result with data.format=parquet and data.root=<out> (printed).

--digits writes 1,797 32x32 RGB PNGs to <dir>/{train,val,test}/<digit>/ (about
2 s; a second run does nothing) and, with --shards, converts them too.
Exit status: 0 on success, 1 with one "error: ..." line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0]
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--source", metavar="DIR", help="ImageFolder tree to convert to Parquet shards"
    )
    what.add_argument(
        "--digits", metavar="DIR", help="materialize scikit-learn's digits as PNGs here"
    )
    parser.add_argument("--out", metavar="DIR", help="shard folder to write (with --source)")
    parser.add_argument(
        "--shards", metavar="DIR", help="also convert the digits to shards here (with --digits)"
    )
    parser.add_argument("--workers", type=int, default=2, help="decode-check processes (default 2)")
    parser.add_argument(
        "--shard-size", type=int, default=2048, help="images per Parquet file (default 2048)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="of the train files, held out as val when the source has no val/ "
                             "(default 0.1; 0: none)")
    parser.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                        help="of the train files, held out as test when the source has no test/ "
                             "(default 0.1; 0: none)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="skip images of more than N pixels (declared in the header, checked before "
                             "decoding; default: Pillow's decompression-bomb limit)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the digits split and of the held-out splits (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.source and not args.out:
        parser.error("--source needs --out")
    fractions = {"--val-fraction": args.val_fraction, "--test-fraction": args.test_fraction}
    for flag, value in fractions.items():
        if not 0.0 <= value < 1.0:
            parser.error(f"{flag} must be in [0, 1), got {value}")
    return run_main(lambda: prepare(args), what="data preparation")


def prepare(args: argparse.Namespace) -> None:
    from imgcls_core.data import (
        convert_image_folder,
        materialize_digits,
    )  # heavy imports after parsing

    if args.digits:
        root = materialize_digits(args.digits, seed=args.seed)
        print(f"digits ready in {root}")
        args.source, args.out = (root, args.shards) if args.shards else (None, None)
    if args.source:
        report = convert_image_folder(
            args.source, args.out, num_workers=args.workers, shard_size=args.shard_size,
            seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            max_pixels=args.max_pixels,
        )
        print(report.summary())
        print(f"train on it with: --set data.format=parquet --set data.root={args.out}")


if __name__ == "__main__":
    sys.exit(main())
