"""Training ingest at scale: Parquet shards through Ray Data vs the same shards through a DataLoader.

    python -m bench.ingest [--epochs 5] [--count 50000] [--size 48] [--batch-size 64] [--workers 2]

The data: ``--count`` (default 50,000) training images composed from the real digits
(imgcls_core.data.synth_digits, ``--size`` px PNGs in Parquet shards), written once to
``--data`` (default: a cache folder under the system temp dir) and reused.

Both sides are the trainer's own ingest paths, fed the same shards and config
(augment.strength 0.3): the DataLoader side is ``imgcls_core.data.loaders.train_loader``
with ``--workers`` worker processes (``ray.ingest=dataloader``); the Ray Data side is
``jobs.train.build_datasets`` split for one Train worker by Ray Train's own
``DataConfig.configure`` (with ``jobs.train.ingest_options``) and read per epoch with
``jobs.train_worker.iter_train_batches``, on a local Ray instance of ``--workers`` CPUs.
``build_datasets`` decodes a split that fits its cache budget once (a start-up cost,
reported as ``build_datasets_s``) and augments per epoch.
The Ray instance is up during both sides. Batches are only counted; nothing trains.

Each side runs one warm-up epoch (its first batch is the cold start: worker processes,
imports, the first execution), then ``--epochs`` measured epochs, alternating (DataLoader,
Ray Data, Ray Data, DataLoader, ...) so slow phases of the shared machine hit both. The
steady-state rate of a side is the median over its measured epochs of images / epoch
wall time, from asking for the epoch to its last batch: a trainer pays every epoch's
start (Ray Data starts a new execution per epoch), so that stays in; the time to the
first batch of those epochs is also reported on its own, as is the rate after it. CPU
time of every process involved (this process and all its descendants: DataLoader
workers, raylet, GCS, Ray workers; read from /proc) over each epoch gives
CPU-milliseconds per image. The ratio is ray_data / dataloader of the steady-state rates.

What each change to the Ray Data pipeline bought (12,000 composed 48 px images, 3 shards;
DataLoader and every variant interleaved in one process, medians of 3 epochs after a warm-up;
2 shared cores at load average 5-16, so rates are noisy and CPU-ms/image is the steadier figure):

    pipeline                                                    img/s  first batch  CPU-ms/img
    DataLoader, 2 workers                                         568        0.1 s        1.67
    before: randomize_block_order (all-to-all) + one decode
      task per 4,096-row shard, shuffle buffer 2,048               452       22.0 s        1.76
    seeded shard order at read (no barrier) + 128-row blocks       333       12.4 s        2.12
    the same with 512-row blocks                                   542       12.9 s        1.78
    + decode once (cached uint8), augment per epoch (256 rows)     827        4.8 s        1.51

The barrier and shard-sized tasks put a whole shard's decode before an epoch's first batch;
128-row blocks cost more per block (tasks, split coordinator, block conversion) than they
gained; decoding once takes ~10% of the per-image work and the Parquet read out of every
epoch. The shuffle buffer (capped at a quarter of a worker's rows per epoch) is 2,048 rows
on this data either way: the cap matters on the 1,259-image digits, where 2,048 rows were
more than a worker's whole epoch and stopped all pipelining (not re-measured here).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import median, save

_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of process ``root`` (default: this one) and all its descendants,
    with the children they reaped (so work of a process that ended inside a window still counts)."""
    root = os.getpid() if root is None else root
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        ppid = int(fields[1])
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        stats[int(entry.name)] = (ppid, ticks / _TICK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def timed_epoch(batches) -> dict:
    """Consume one epoch: its images/s (from asking for it to its last batch), time to first batch,
    the rate after the first batch, and CPU-ms/image of the whole epoch."""
    cpu0, start = tree_cpu_seconds(), time.perf_counter()
    it = iter(batches)
    first_images, _ = next(it)
    first, n = time.perf_counter(), len(first_images)
    for images, _labels in it:
        n += len(images)
    end = time.perf_counter()
    cpu = tree_cpu_seconds() - cpu0
    return {"images": n, "epoch_s": end - start, "images_per_s": n / (end - start),
            "first_batch_s": first - start,
            "after_first_batch_images_per_s": (n - len(first_images)) / (end - first),
            "cpu_ms_per_image": 1000 * cpu / n}


def default_data_dir(count: int, size: int) -> Path:
    return Path(tempfile.gettempdir()) / "imgcls-bench-data" / f"synth-digits-{count}-{size}px"


def summarize(epochs: list[dict]) -> dict:
    """Medians over the measured epochs (the first, warm-up epoch left out; its first batch is the
    cold start)."""
    measured = epochs[1:]
    return {
        "images_per_s": median([e["images_per_s"] for e in measured]),
        "cpu_ms_per_image": median([e["cpu_ms_per_image"] for e in measured]),
        "first_batch_s": median([e["first_batch_s"] for e in measured]),
        "first_batch_cold_s": epochs[0]["first_batch_s"],
        "after_first_batch_images_per_s": median([e["after_first_batch_images_per_s"] for e in measured]),
        "epoch_s": median([e["epoch_s"] for e in measured]),
        "epochs": epochs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="measured epochs per side, after one warm-up")
    parser.add_argument("--count", type=int, default=50_000, help="training images (default 50000)")
    parser.add_argument("--size", type=int, default=48, help="image side in px (default 48)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--strength", type=float, default=0.3, help="augment.strength")
    parser.add_argument("--data", type=Path, default=None, help="generated shards (written when absent)")
    parser.add_argument("--only", choices=("dataloader", "ray_data"), default=None, help="one side alone")
    args = parser.parse_args(argv)

    import ray
    import torch

    from imgcls_core.config import load_config
    from imgcls_core.data import load_dataset
    from imgcls_core.data.loaders import train_loader
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.data.synth_digits import write_synth_digits
    from jobs.train import build_datasets, ingest_options, plan_training
    from jobs.train_worker import iter_train_batches

    data = args.data or default_data_dir(args.count, args.size)
    t0 = time.perf_counter()
    manifest = write_synth_digits(data, {"train": args.count, "val": 2_000, "test": 0}, size=args.size,
                                  workers=args.workers, log=lambda m: print(m, flush=True))
    print(f"data: {data} ({manifest['splits']['train']['images']:,} train images in "
          f"{len(manifest['splits']['train']['shards'])} shards; ready in {time.perf_counter() - t0:.1f}s)")

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-ingest-"))
    cfg = load_config(None, [
        "data.format=parquet", f"data.root={data}", f"data.image_size={args.size}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"augment.strength={args.strength}", f"train.output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'results'}", "ray.ingest=ray_data", "ray.num_workers=1",
    ])
    plan = plan_training(cfg, log=lambda _m: None)
    cfg = plan.cfg
    torch.set_num_threads(1)  # the consumer only counts; keep both sides' main process alike

    from jobs.common import init_local_ray

    init_local_ray(num_cpus=args.workers, include_dashboard=False, configure_logging=False,
                   log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    sides = {}
    if args.only != "ray_data":
        pre = Preprocessing.from_dict(plan.preprocessing)
        loader = train_loader(cfg, load_dataset(cfg.data).train, pre)
        sides["dataloader"] = lambda epoch: (torch.manual_seed(cfg.data.seed + epoch), loader)[1]
    if args.only != "dataloader":
        from ray.train import DataConfig

        # As Ray Train hands the dataset to a one-worker run (jobs.train.build_trainer).
        built = time.perf_counter()
        datasets = build_datasets(plan)  # decodes the split once when it fits (a start-up cost)
        build_s = time.perf_counter() - built
        shard = DataConfig(execution_options=ingest_options()).configure(
            datasets, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
        sides["ray_data"] = lambda epoch: iter_train_batches(shard, cfg.data.batch_size,
                                                            seed=cfg.data.seed + epoch, rows=plan.num_train)

    epochs: dict[str, list[dict]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(args.epochs + 1):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            e = timed_epoch(sides[name](round_))
            epochs[name].append(e)
            tag = "warm-up" if round_ == 0 else f"epoch {round_}"
            print(f"{name:>10} {tag:>8}: {e['images']:,} images in {e['epoch_s']:.1f}s = {e['images_per_s']:.0f} "
                  f"img/s, first batch {e['first_batch_s']:.2f}s, {e['after_first_batch_images_per_s']:.0f} img/s "
                  f"after it, {e['cpu_ms_per_image']:.2f} CPU-ms/img", flush=True)
    ray.shutdown()

    result = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                         "data": str(data), "train_images": plan.num_train,
                         "shards": len(manifest["splits"]["train"]["shards"])}}
    for name in sides:
        result[name] = summarize(epochs[name])
    if "ray_data" in sides:
        result["ray_data"]["build_datasets_s"] = build_s
    if len(sides) == 2:
        dl, rd = result["dataloader"], result["ray_data"]
        result["dataloader_median"], result["ray_data_median"] = dl["images_per_s"], rd["images_per_s"]
        result["ratio_ray_data_over_dataloader"] = rd["images_per_s"] / dl["images_per_s"]
        result["cpu_ms_ratio_ray_data_over_dataloader"] = rd["cpu_ms_per_image"] / dl["cpu_ms_per_image"]
        print(f"DataLoader ({args.workers} workers): {dl['images_per_s']:.0f} img/s steady, "
              f"{dl['cpu_ms_per_image']:.2f} CPU-ms/img, first batch {dl['first_batch_s']:.2f}s "
              f"(cold {dl['first_batch_cold_s']:.2f}s)")
        print(f"Ray Data ({args.workers} CPUs): {rd['images_per_s']:.0f} img/s steady, "
              f"{rd['cpu_ms_per_image']:.2f} CPU-ms/img, first batch {rd['first_batch_s']:.2f}s "
              f"(cold {rd['first_batch_cold_s']:.2f}s)")
        print(f"ratio ray_data/dataloader (steady img/s): {result['ratio_ray_data_over_dataloader']:.2f}")
    save("ingest", result)
    return result


if __name__ == "__main__":
    main()
