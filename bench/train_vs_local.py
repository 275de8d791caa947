"""Epoch time of Ray Train (1 worker, DDP machinery on) vs the core's local loop, in one run.

    python -m bench.train_vs_local [--epochs 4] [--model resnet18 --width 0.25]

Same model, data (digits, 32 px), batch size, augmentation and DataLoader
ingest on both sides; the first epoch of each side is a warm-up and is left out
of the median. Prints the median train epoch seconds and the ratio ray/local
(1.0 = no overhead), and the end-to-end wall time including Ray start-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import median, save


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    import ray

    from imgcls_core.config import load_config
    from imgcls_core.data import materialize_digits
    from imgcls_core.runner import train_and_evaluate
    from jobs.train import run_training

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    root = materialize_digits(tmp / "digits")
    common = [f"data.root={root}", "data.format=digits", f"data.batch_size={args.batch_size}",
              f"model.name={args.model}", f"model.width={args.width}", "augment.strength=0.2",
              f"train.epochs={args.epochs}", "train.log_every=1000", "data.num_workers=0"]

    start = time.perf_counter()
    local = train_and_evaluate(load_config(None, [*common, f"train.output_dir={tmp / 'local'}"]), log=lambda m: None)
    local_wall = time.perf_counter() - start
    local_epochs = [m["train/epoch_s"] for m in local.history][1:]

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    cfg = load_config(None, [*common, f"train.output_dir={tmp / 'ray'}", f"ray.storage_path={tmp / 'results'}",
                             "ray.num_workers=1", "ray.cpus_per_worker=2", "ray.ingest=dataloader"])
    run_training(cfg, log=lambda m: None)
    ray_wall = time.perf_counter() - start
    ray.shutdown()
    history = [json.loads(line) for line in (tmp / "ray" / "history.jsonl").read_text().splitlines()]
    ray_epochs = [m["train/epoch_s"] for m in history][1:]

    result = {
        "config": vars(args),
        "local_epoch_s": local_epochs, "ray_epoch_s": ray_epochs,
        "local_epoch_s_median": median(local_epochs), "ray_epoch_s_median": median(ray_epochs),
        "epoch_ratio_ray_over_local": median(ray_epochs) / median(local_epochs),
        "local_wall_s": local_wall, "ray_wall_s": ray_wall, "wall_ratio_ray_over_local": ray_wall / local_wall,
    }
    print(f"median train epoch: local {result['local_epoch_s_median']:.2f}s, Ray Train 1 worker "
          f"{result['ray_epoch_s_median']:.2f}s -> ratio {result['epoch_ratio_ray_over_local']:.2f}")
    print(f"wall incl. start-up: local {local_wall:.1f}s, Ray {ray_wall:.1f}s -> ratio {ray_wall / local_wall:.2f}")
    save("train_vs_local", result)
    return result


if __name__ == "__main__":
    main()
