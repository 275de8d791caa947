"""What a sweep's trial costs beyond its training: one-worker trials in the trial's own process
(jobs.tune's default) vs every trial on its own TorchTrainer (``tune.in_trial=false``).

    python -m bench.trial_startup [--trials 4] [--rounds 5]

Each round runs the same seeded FIFO sweep of ``--trials`` two-epoch trials, one trial at a
time, in both modes (alternating which goes first). Per trial: the wall time of the sweep over
the number of trials, the time the training session itself took (train_summary.json's
``seconds``: epochs, validation, packaging), and their difference, the per-trial start-up
(building the trial, its data and model, and with a TorchTrainer the Train controller, the
placement group, the worker actor and its process group; the sweep's own fixed costs are
spread over the trials). Medians over the rounds; ratios TorchTrainer / in-trial.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import median, save, start_local_ray, sweep_overrides


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (medians of >= 5)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = parser.parse_args(argv)

    import ray

    from imgcls_core.config import load_config
    from imgcls_core.data import materialize_digits
    from jobs.tune import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-startup-"))
    root = materialize_digits(tmp / "digits")
    start_local_ray(args.cpus)
    modes = {"in_trial": "tune.in_trial=true", "torch_trainer": "tune.in_trial=false"}
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for round_ in range(args.rounds):
            order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
            for mode in order:
                name = f"{mode}-{round_}"
                cfg = load_config(None, [*sweep_overrides(root, tmp / name, name, epochs=2, samples=args.trials,
                                                          scheduler="fifo"),
                                         "tune.max_concurrent_trials=1", modes[mode]])
                started = time.perf_counter()
                summary = run_sweep(cfg, log=lambda m: None)
                wall = time.perf_counter() - started
                sessions = [json.loads(f.read_text())["seconds"] for f in (tmp / name / "trials").glob("*/train_summary.json")]
                per_trial = wall / args.trials
                row = {"wall_s": wall, "per_trial_s": per_trial, "session_s": median(sessions),
                       "startup_s": per_trial - median(sessions), "errors": summary["errors"]}
                rows[mode].append(row)
                print(f"round {round_} {mode:>13}: {wall:5.1f} s for {args.trials} trials, {per_trial:5.1f} s per "
                      f"trial, of which training {row['session_s']:4.1f} s, start-up {row['startup_s']:4.1f} s",
                      flush=True)
    finally:
        ray.shutdown()
    med = {mode: {key: median([r[key] for r in rows[mode]]) for key in ("per_trial_s", "session_s", "startup_s")}
           for mode in modes}
    ratios = {"per_trial_wall_torch_trainer_over_in_trial": med["torch_trainer"]["per_trial_s"] / med["in_trial"]["per_trial_s"],
              "startup_torch_trainer_over_in_trial": med["torch_trainer"]["startup_s"] / med["in_trial"]["startup_s"]}
    for mode, m in med.items():
        print(f"{mode:>13}: per trial {m['per_trial_s']:.1f} s, training {m['session_s']:.1f} s, "
              f"start-up {m['startup_s']:.1f} s (medians of {args.rounds})")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    out = {"trials": args.trials, "rounds": args.rounds, "medians": med, "ratios": ratios, "rows": rows}
    save("trial_startup", out)
    return out


if __name__ == "__main__":
    main()
