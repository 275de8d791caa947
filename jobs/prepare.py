"""Prepare a data set: an ImageFolder tree to Parquet shards, or scikit-learn's digits to disk.

    python -m jobs.prepare --source data/flowers --out data/flowers_shards [--workers N]
    python -m jobs.prepare --digits data/digits [--shards data/digits_shards]
    python -m jobs.prepare --synth-digits data/digits50k [--count 50000] [--size 48]

--source takes <src>/{train,val,test}/<class>/<image> or a flat <src>/<class>/<image>
tree (all of it train). A val or test split the source lacks is held out of its
train files: --val-fraction and --test-fraction of them (default 0.1 each; 0: none),
each file's split a hash of --seed and its path, so a re-run writes the same splits
and images added to the source later never move an earlier one between train and
val/test; the output says which splits were held out and how many files each got. Every image is
decoded once to check it; corrupt, truncated and empty files are skipped. Prints
the images and shards per split (--shard-size images per file, default 2048) and
each skipped file with its reason; the full report is written to <out>/report.json.
Train on the result with data.format=parquet and data.root=<out> (printed).

--digits writes 1,797 32x32 RGB PNGs to <dir>/{train,val,test}/<digit>/ (about
2 s; a second run does nothing) and, with --shards, converts them too.
--synth-digits writes a larger data set composed from the real digits (one real
digit per image, randomly scaled and placed on a tinted --size px canvas with faint
distractor strokes and noise; the label is the digit's class) straight to Parquet
shards: --count train images (default 50,000) built from the train digits only,
--val-count and --test-count (default 5,000 each) from the val and test digits,
4,096 rows (~12 MB at 48 px) per shard unless --shard-size says otherwise. Seeded by
--seed; about 40 s for the default 60,000 images with 2 --workers.
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
    what.add_argument(
        "--synth-digits", metavar="DIR",
        help="write Parquet shards of images composed from the real digits here",
    )
    parser.add_argument("--out", metavar="DIR", help="shard folder to write (with --source)")
    parser.add_argument("--labels", metavar="FILE",
                        help="multi-label source: a labels CSV (path,labels) or JSON giving each <split>/<image> "
                             "its label set (relative to --source); writes multi-label shards")
    parser.add_argument(
        "--shards", metavar="DIR", help="also convert the digits to shards here (with --digits)"
    )
    parser.add_argument("--workers", type=int, default=2,
                        help="decode-check processes (default 2; 0 or 1: in this process)")
    parser.add_argument(
        "--shard-size", type=int, default=None,
        help="images per Parquet file (default 2048; 4096 with --synth-digits)",
    )
    parser.add_argument("--count", type=int, default=50_000,
                        help="train images to compose (with --synth-digits; default 50000)")
    parser.add_argument("--val-count", type=int, default=5_000,
                        help="val images to compose (with --synth-digits; default 5000)")
    parser.add_argument("--test-count", type=int, default=5_000,
                        help="test images to compose (with --synth-digits; default 5000)")
    parser.add_argument("--size", type=int, default=48,
                        help="side of the composed images in px, 32..64 (with --synth-digits; default 48)")
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
    if args.synth_digits:
        if not 32 <= args.size <= 64:
            parser.error(f"--size must be in 32..64, got {args.size}")
        if args.count < 1 or args.val_count < 0 or args.test_count < 0:
            parser.error("--count must be >= 1, --val-count and --test-count >= 0")
    if args.shard_size is not None and args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return run_main(lambda: prepare(args), what="data preparation")


def prepare(args: argparse.Namespace) -> None:
    from imgcls_core.data import (
        convert_image_folder,
        materialize_digits,
    )  # heavy imports after parsing

    if args.synth_digits:
        from imgcls_core.data.synth_digits import DEFAULT_SHARD_ROWS, write_synth_digits

        counts = {"train": args.count, "val": args.val_count, "test": args.test_count}
        manifest = write_synth_digits(
            args.synth_digits, counts, size=args.size, seed=args.seed,
            shard_rows=args.shard_size or DEFAULT_SHARD_ROWS, workers=max(1, args.workers),
            log=lambda m: print(m, flush=True),
        )
        for split, s in manifest["splits"].items():
            mb = sum(s["shard_bytes"]) / 2**20
            print(f"  {split:<5} {s['images']:>7,} images  {len(s['shards']):>3} shard(s)  {mb:,.1f} MB")
        print(f"composed digits ready in {args.synth_digits} ({manifest['seconds']:.1f}s)")
        print(f"train on it with: --set data.format=parquet --set data.root={args.synth_digits} "
              f"--set data.image_size={args.size}")
        return
    if args.digits:
        root = materialize_digits(args.digits, seed=args.seed)
        print(f"digits ready in {root}")
        args.source, args.out = (root, args.shards) if args.shards else (None, None)
    if args.source:
        report = convert_image_folder(
            args.source, args.out, num_workers=args.workers, shard_size=args.shard_size or 2048,
            seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
            max_pixels=args.max_pixels, labels_file=args.labels,
        )
        print(report.summary())
        multi = " --set data.multi_label=true" if args.labels else ""
        print(f"train on it with: --set data.format=parquet --set data.root={args.out}{multi}")


if __name__ == "__main__":
    sys.exit(main())
