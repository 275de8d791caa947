"""The Ray Train worker of jobs.train: one DDP rank hosting the core's training session.

Each rank builds its engine and data (a Ray Data shard or a distributed
DataLoader, and its 1/world share of the validation split), restores the latest
checkpoint Ray hands it, and runs :class:`imgcls_core.engine.session.TrainingSession`
with a :class:`RayTrainHost`: checkpoints and metrics go to ``ray.train.report``,
rank 0's lines to the job's output and ``<output_dir>/train.log``. The driver
side (planning, the TorchTrainer, the CLI) is jobs.train.
"""

from __future__ import annotations

import os
import secrets
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls_core.config import Config

#: Most rows a worker's shuffle buffer holds (decoded images). Also at most a quarter of the rows the
#: worker sees per epoch: a buffer that holds the whole epoch stops all pipelining inside it.
SHUFFLE_BUFFER_ROWS = 2048
#: Rows per Ray Data decode/augment task and block (jobs.train.build_datasets): small enough that the
#: first batch of an epoch and its last task come soon (~0.5-1 s of work), large enough that the
#: per-block costs (task, split coordinator, block conversion) stay small: on 12k 48 px images, blocks of
#: 128 rows cost 2.12 CPU-ms/image against 1.78 for 512 (medians; bench/ingest.py's docstring).
DECODE_BLOCK_ROWS = 512


class RayTrainHost:
    """Runs a session in a Ray Train worker (``api``: ``ray.train``, the default) or, for a sweep's
    one-worker trial, in the Tune trial itself (``api``: ``ray.tune``): metrics and checkpoints go
    to ``api.report``."""

    def __init__(self, rank: int, out: Path, api=None):
        import ray.train

        self.rank, self.out, self.api = rank, out, api or ray.train

    def save(self, metrics: dict[str, float], write) -> None:
        if write is None:
            self.api.report(metrics)
            return
        # Ray copies the folder into the run's storage (a Train run registers it once every rank reported).
        with tempfile.TemporaryDirectory(prefix="imgcls-ckpt-") as folder:
            write(Path(folder))
            self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(folder))

    def log(self, message: str) -> None:
        """Rank 0's lines go to the job's output and <output_dir>/train.log; other ranks stay quiet."""
        if self.rank != 0:
            return
        print(f"[imgcls] {message}", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "train.log").open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: build the engine and data, restore, and run the session (rank 0 packages)."""
    import ray.train
    import ray.train.torch
    from torch import nn

    from imgcls_core.engine import Engine, Preprocessing, setup_runtime
    from imgcls_core.engine.session import TrainingSession
    from imgcls_core.models import build_model
    from imgcls_core.tracking import Tracker

    cfg = Config.from_dict(loop_config["config"])  # the one parse of this run's config in the worker
    pre = Preprocessing.from_dict(loop_config["preprocessing"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    host = RayTrainHost(rank, Path(cfg.train.output_dir))

    if "://" not in cfg.data.root and not Path(cfg.data.root).exists():
        raise FileNotFoundError(
            f"worker {rank} on node {ray.util.get_node_ip_address()} cannot see data.root={cfg.data.root}; "
            f"on a multi-node cluster put the data on a shared file system or object storage"
        )
    runtime = setup_runtime(cfg.train, device=ray.train.torch.get_device())
    data = WorkerData(cfg, pre, loop_config, rank, world)
    # Where the run starts: its own latest checkpoint (a restart, a resubmitted job), else the one
    # PBT hands a trial (exploit), else model.pretrained / fresh weights.
    checkpoint, start = ray.train.get_checkpoint(), loop_config.get("init_checkpoint")
    source = checkpoint if checkpoint is not None else start
    restored = restore_checkpoint(source, runtime.device, host.log) if source is not None else None
    # a checkpoint holds every weight: model.pretrained is neither loaded nor needed then
    model_cfg = replace(cfg.model, pretrained=None) if restored is not None else cfg.model
    model = build_model(model_cfg, len(pre.classes), cfg.data.image_size, log=host.log)
    if cfg.ray.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    engine = Engine(
        cfg, model, runtime, data.steps_per_epoch, world_size=world, rank=rank,
        class_weights=data.class_weights, batch_mix=data.batch_mix,
        wrap=_ddp if world > 1 else None,
        teacher=_load_teacher(loop_config.get("teacher"), cfg, pre, host.log),
    )
    session = TrainingSession(cfg, pre, engine, data.run_data(), host, job=loop_config["job"],
                              register_as=loop_config["register_as"])
    if checkpoint is not None:
        session.resume(*restored)
    elif start is not None:
        session.adopt(*restored)

    tracker = Tracker(cfg.tracking, log=host.log)
    if rank == 0:
        # The run the driver found (by run key) or created in this tracking store; the checkpoint's
        # only when the driver had none (its server was down), e.g. a store that was replaced.
        tracker.start(run_id=loop_config["mlflow_run_id"] or session.checkpoint_run_id, run_key=loop_config["run_key"])
    session.run(tracker, stop_after=loop_config["stop_after"],
                on_step=_fault_injector(loop_config.get("inject_kill"), engine, rank))


def _ddp(model):
    """DDP without its per-step broadcast of rank 0's buffers (BatchNorm statistics): on CPU gloo
    that broadcast was a fifth of a small CNN's step (21 -> 17 ms, 2 ranks x 1 thread). The engine
    averages the buffers over ranks once per epoch instead (Engine.sync_buffers)."""
    import ray.train.torch

    from imgcls_core.engine.loop import ddp_without_buffer_broadcast

    return ray.train.torch.prepare_model(model, move_to_device=False,
                                         parallel_strategy_kwargs=ddp_without_buffer_broadcast())


def restore_checkpoint(checkpoint, device, log) -> tuple[dict[str, Any], str]:
    """The state of a Ray Train checkpoint, and where it is. When it does not load (truncated by a
    crash or a full disk), the newest readable earlier checkpoint of the same run is used instead,
    and the fallback is logged."""
    from imgcls_core.engine.checkpoint import load_first_readable

    with checkpoint.as_directory() as directory:
        candidates = [Path(directory)]
        root = Path(checkpoint.path).parent
        if root.is_dir():  # the run's other checkpoints (local or shared storage), newest first
            siblings = [p for p in root.glob("checkpoint_*") if p.is_dir() and p.name != Path(checkpoint.path).name]
            candidates += sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
        state, path = load_first_readable(candidates, map_location=device, log=log)
        where = checkpoint.path if path == Path(directory) else str(path)
        return state, where


def _load_teacher(spec: str | None, cfg: Config, pre, log):
    """This worker's own copy of the pinned teacher (downloaded to a temporary folder), or None."""
    if not spec:
        return None
    from imgcls_core.engine.distill import load_teacher

    teacher = load_teacher(spec, pre, tracking_uri=cfg.tracking.tracking_uri)
    log(teacher.describe())
    return teacher.model  # the engine moves it to the worker's device and memory format


class WorkerData:
    """The rank's training batches (Ray Data shard or distributed DataLoader) and its val share."""

    def __init__(self, cfg: Config, pre, loop_config: dict[str, Any], rank: int, world: int):
        import ray.train
        from torch.utils.data.distributed import DistributedSampler

        from imgcls_core.data import class_weights, load_dataset
        from imgcls_core.data.loaders import eval_loader, train_loader
        from imgcls_core.data.presets import build_batch_mix

        self.cfg, self.pre, self.rank, self.world = cfg, pre, rank, world
        self.ingest = loop_config["ingest"]
        # Ray Data streams the train images: this rank needs only their labels (class weights)
        self.splits = splits = load_dataset(cfg.data, train_images=self.ingest != "ray_data")
        num_classes = len(pre.classes)
        self.class_weights = (
            class_weights(splits.train.labels, num_classes) if cfg.data.balance == "weighted_loss" else None
        )
        self.batch_mix = build_batch_mix(cfg.augment, num_classes)
        # Every rank evaluates a disjoint 1/world of val (no padding), and Engine.evaluate sums the
        # counts over ranks: the metrics are those of the whole split.
        self.val_loader = eval_loader(cfg, splits.val.subset(list(range(rank, len(splits.val), world))), pre)
        b = cfg.data.batch_size
        self.loader = None
        if self.ingest == "ray_data":
            self.shard = ray.train.get_dataset_shard("train")
            self.rows = loop_config["num_train"] // world  # streaming_split(equal=True) gives every rank this many
            self.steps_per_epoch = self.rows // b
        else:
            # Each rank's share: augment.batched's in-memory batches take it per epoch themselves; a
            # DataLoader gets our own DistributedSampler (seed 0, as Ray's): the loader stays ours
            # (ray.train.torch.prepare_data_loader would rebuild it).
            distribute = world > 1 and not cfg.augment.batched
            sampler = DistributedSampler(range(len(splits.train)), num_replicas=world, rank=rank) if distribute else None
            self.loader = train_loader(cfg, splits.train, pre, sampler=sampler, rank=rank, world=world)
            self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={b} is larger than a worker's share of the training split "
                             f"({loop_config['num_train']} images over {world} workers)")

    def train_batches(self, epoch: int):
        if self.ingest == "ray_data":
            return iter_train_batches(self.shard, self.cfg.data.batch_size, seed=self.cfg.data.seed + epoch,
                                      rows=self.rows)
        sampler = self.loader if self.cfg.augment.batched else getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        return self.loader

    def run_data(self):
        """What the session trains and evaluates on; the test split is evaluated by rank 0 alone."""
        from imgcls_core.data.loaders import eval_loader
        from imgcls_core.engine.session import RunData

        test = self.splits.test
        datasets = [self.val_loader.dataset] + ([self.loader.dataset] if self.loader is not None else [])
        return RunData(train=self.train_batches, val=self.val_loader,
                       test=(lambda: eval_loader(self.cfg, test, self.pre)) if test is not None else None,
                       test_records=test, datasets=datasets)


def shuffle_buffer_rows(rows: int | None, batch_size: int) -> int:
    """The shuffle buffer for a worker that sees ``rows`` rows per epoch (None: unknown)."""
    if rows is None:
        return SHUFFLE_BUFFER_ROWS
    return max(batch_size, min(SHUFFLE_BUFFER_ROWS, rows // 4))


def iter_train_batches(data, batch_size: int, seed: int | None = None, rows: int | None = None):
    """(images, labels) batches from a Ray Data shard or dataset, shuffled through a row buffer
    (seeded per epoch when ``seed`` is given) of :func:`shuffle_buffer_rows` rows for the ``rows``
    this worker sees per epoch."""
    buffer = shuffle_buffer_rows(rows, batch_size)
    batches = data.iter_torch_batches(batch_size=batch_size, drop_last=True, device="cpu", prefetch_batches=2,
                                      local_shuffle_buffer_size=buffer, local_shuffle_seed=seed)
    return ((b["image"], b["label"]) for b in batches)


def decode_batch(batch: dict[str, np.ndarray], transform, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: encoded bytes -> augmented float32 N x 3 x S x S (S = image_size).

    A row that does not decode is dropped and printed with its path (in the task's log): the
    epoch goes on with the others. jobs.prepare already left out every file that did not decode."""
    return augment_batch(decode_pixels(batch), transform, image_size)


def decode_pixels(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: encoded bytes -> uint8 3 x H x W pixels (one N x 3 x H x W array when all rows have
    one size, else an object array of them), and the labels. Rows that do not decode are dropped and
    printed with their path (in the task's log)."""
    from imgcls_core.data import CorruptImageError, decode_image

    pixels, kept = [], []
    for i, (data, path) in enumerate(zip(batch["image"], batch["path"])):
        try:
            pixels.append(decode_image(bytes(data), name=str(path)).numpy())
        except CorruptImageError as exc:
            print(f"decode_batch: skipping a corrupt image: {exc}", flush=True)
            continue
        kept.append(i)
    if len({p.shape for p in pixels}) == 1:
        stacked = np.stack(pixels)
    else:
        stacked = np.empty(len(pixels), dtype=object)
        stacked[:] = pixels
    return {"pixels": stacked, "label": batch["label"][kept].astype(np.int64)}


def augment_batch(batch: dict[str, np.ndarray], transform, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: uint8 pixels (of :func:`decode_pixels`) -> augmented float32 N x 3 x S x S, with
    new random draws on every call. A :class:`BatchAugment` (``augment.batched``) augments the
    whole block at once."""
    from imgcls_core.data.presets import BatchAugment

    torch.set_num_threads(1)
    torch.manual_seed(secrets.randbits(63))  # task processes would otherwise repeat one RNG stream
    pixels = batch["pixels"]
    if isinstance(transform, BatchAugment) and pixels.dtype != object:  # augment.batched: the block at once
        return {"image": transform(_tensor(pixels)).numpy(),
                "label": batch["label"].astype(np.int64)}
    images = np.empty((len(pixels), 3, image_size, image_size), dtype=np.float32)
    for i, one in enumerate(pixels):
        one = _tensor(one)
        images[i] = (transform(one[None])[0] if isinstance(transform, BatchAugment) else transform(one)).numpy()
    return {"image": images, "label": batch["label"].astype(np.int64)}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``, copied only when it is read-only (blocks from Ray's object store are)
    or not contiguous: torch warns about, and must not write into, read-only memory."""
    return torch.from_numpy(np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"]))


def _fault_injector(spec: dict | None, engine, rank: int):
    """For fault tests: SIGKILL this worker process once it is ``step`` steps into epoch
    ``epoch`` (0-based: that many epochs done), once; a marker file records that it happened,
    so the restarted worker group trains on."""
    if not spec or spec.get("rank", 1) != rank:
        return None

    def on_step(_metrics: dict[str, float]) -> None:
        marker = Path(spec["marker"])
        into_epoch = engine.step - engine.epoch * engine.steps_per_epoch
        if engine.epoch == spec.get("epoch", 1) and into_epoch >= spec.get("step", 1) and not marker.exists():
            marker.write_text(f"killed rank {rank} at epoch {engine.epoch + 1} step {engine.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step
