"""ASHA vs the same search without early stopping (FIFO), on digits, in one run.

    python -m bench.tune_asha [--samples 32] [--epochs 8] [--reduction-factor 4] [--seed 0] [--data synth]

Both sweeps draw the same trials (the same seeded random search over
tune_spaces/lr_schedules.yaml) and train each as jobs.tune does (a small CNN
at 16 px, one worker, in the trial's own process). ``--data synth`` (the
default) trains on 3,000 composed digits and validates on 2,000 (jobs.prepare
--synth-digits, written once under the temp folder), so one image is 0.05 points
of val top-1 and "within 0.5 points" means something; ``--data digits`` uses the
1,797 real digits (179 val images: one is 0.56 points). Prints the epochs each sweep trained, the best
validation top-1 each reached and the wall time, and the ratios ASHA/FIFO:
how much compute ASHA saves and what it costs in accuracy.

The sweep that runs first also pays the cold start (first trial processes, imports, the data's
first read), which the wall-time ratio would charge to it alone: ``--first auto`` (the default)
runs ASHA first on even repeats of bench.run (IMGCLS_BENCH_REPEAT) and FIFO first on odd ones,
so that the harness's medians see both orders.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import save, start_local_ray, sweep_overrides


def first_sweep(choice: str, env: dict | None = None) -> str:
    """The sweep that runs first: ``choice``, or for ``auto`` ASHA on even repeats of bench.run
    (IMGCLS_BENCH_REPEAT, 0-based; a run alone is repeat 0) and FIFO on odd ones."""
    if choice != "auto":
        return choice
    repeat = int((env if env is not None else os.environ).get("IMGCLS_BENCH_REPEAT", "0"))
    return "fifo" if repeat % 2 else "asha"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--data", choices=["synth", "digits"], default="synth")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reduction-factor", type=int, default=4,
                        help="ASHA keeps the top 1/this of the trials at each rung (epochs 1, rf, rf^2, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seeds Tune's random search: both sweeps draw the same trials")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--first", choices=["auto", "asha", "fifo"], default="auto",
                        help="which sweep runs first (the first one also pays the cold start); auto: ASHA on "
                             "even repeats of bench.run, FIFO on odd ones")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for both sweeps (repeatable), e.g. train.ema_decay=0.98")
    args = parser.parse_args(argv)
    args.first = first_sweep(args.first)

    import ray

    from imgcls_core.config import load_config
    from imgcls_core.data import materialize_digits
    from imgcls_core.data.synth_digits import write_synth_digits
    from jobs.tune import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-tune-"))
    if args.data == "synth":
        root, data_format = Path(tempfile.gettempdir()) / "imgcls-bench-asha-synth", "parquet"
        write_synth_digits(root, {"train": 3000, "val": 2000, "test": 500}, size=32, seed=0)
    else:
        root, data_format = materialize_digits(tmp / "digits"), "imagefolder"
    start_local_ray(args.cpus)
    results = {}
    try:
        for scheduler in (args.first, "fifo" if args.first == "asha" else "asha"):
            cfg = load_config(None, sweep_overrides(root, tmp / scheduler, scheduler, epochs=args.epochs,
                                                    samples=args.samples, scheduler=scheduler, seed=args.seed,
                                                    reduction_factor=args.reduction_factor, data_format=data_format)
                             + args.overrides)
            started = time.perf_counter()
            summary = run_sweep(cfg, log=lambda m: print(f"[{scheduler}] {m}", flush=True))
            results[scheduler] = {"epochs": summary["epochs_run"], "best_val_acc1": summary["best_metric"],
                                  "seconds": time.perf_counter() - started, "errors": summary["errors"],
                                  "best_sample": summary["best_sample"]}
    finally:
        ray.shutdown()
    asha, fifo = results["asha"], results["fifo"]
    ratios = {
        "epochs_asha_over_fifo": asha["epochs"] / fifo["epochs"],
        "best_acc_asha_over_fifo": asha["best_val_acc1"] / fifo["best_val_acc1"],
        "seconds_asha_over_fifo": asha["seconds"] / fifo["seconds"],
        "best_acc_fifo_minus_asha_points": 100 * (fifo["best_val_acc1"] - asha["best_val_acc1"]),
    }
    for name, r in results.items():
        print(f"{name:>4}: {r['epochs']:3d} epochs, best val top-1 {r['best_val_acc1']:.4f}, {r['seconds']:.0f} s")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    out = {"samples": args.samples, "epochs_per_trial": args.epochs, "reduction_factor": args.reduction_factor,
           "data": args.data, "overrides": args.overrides,
           "first": args.first, "results": results,
           "ratios": ratios}
    save(f"tune_asha_{args.first}_first", out)
    return out


if __name__ == "__main__":
    main()
