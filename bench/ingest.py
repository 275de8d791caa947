"""Training ingest throughput: Parquet shards through Ray Data vs ImageFolder through a DataLoader.

    python -m bench.ingest [--epochs 3] [--batch-size 64] [--workers 2]

Both sides decode the same digit images and apply the same training transform
(augment.strength 0.3) and deliver float batches; nothing trains. Ray Data runs
its decode tasks on a local Ray instance with --workers CPUs; the DataLoader
uses --workers worker processes. Prints images/s of each (median over epochs,
the first epoch left out as warm-up) and the ratio ray_data/dataloader.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import median, save


def timed_epochs(make_batches, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _labels in make_batches():
            n += len(images)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import ray
    from torch.utils.data import DataLoader

    from imgcls_core.config import load_config
    from imgcls_core.data import convert_image_folder, load_dataset, materialize_digits
    from imgcls_core.data.presets import build_train_transform
    from jobs.train import build_datasets, plan_training
    from jobs.train_worker import iter_train_batches

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-"))
    root = materialize_digits(tmp / "digits")
    convert_image_folder(root, tmp / "shards", num_workers=args.workers)
    common = [f"data.batch_size={args.batch_size}", "augment.strength=0.3", f"train.output_dir={tmp / 'out'}"]

    folder_cfg = load_config(None, ["data.format=imagefolder", f"data.root={root}", *common])
    splits = load_dataset(folder_cfg.data)
    transform = build_train_transform(32, [0.5] * 3, [0.25] * 3, folder_cfg.augment)
    loader = DataLoader(splits.train.dataset(transform), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    loader_rates = timed_epochs(lambda: iter(loader), args.epochs)

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    plan = plan_training(load_config(None, ["data.format=parquet", f"data.root={tmp / 'shards'}", *common]),
                         log=lambda m: None)
    dataset = build_datasets(plan)["train"]

    ray_rates = timed_epochs(lambda: iter_train_batches(dataset, args.batch_size), args.epochs)
    ray.shutdown()

    result = {
        "config": vars(args), "dataloader_images_per_s": loader_rates, "ray_data_images_per_s": ray_rates,
        "dataloader_median": median(loader_rates[1:]), "ray_data_median": median(ray_rates[1:]),
    }
    result["ratio_ray_data_over_dataloader"] = result["ray_data_median"] / result["dataloader_median"]
    print(f"ImageFolder + DataLoader ({args.workers} workers): {result['dataloader_median']:.0f} images/s")
    print(f"Parquet + Ray Data ({args.workers} CPUs): {result['ray_data_median']:.0f} images/s")
    print(f"ratio ray_data/dataloader: {result['ratio_ray_data_over_dataloader']:.2f}")
    save("ingest", result)
    return result


if __name__ == "__main__":
    main()
