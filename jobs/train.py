"""Distributed training on Ray Train: PyTorch DDP over the workers of a Ray cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.train --config configs/digits_ray.yaml [--set ray.num_workers=4] [--register digits]

Each worker runs the core training engine (imgcls_core.engine) under DDP
(NCCL on GPUs, gloo on CPUs). Data comes from Parquet shards through Ray Data
(decoded and augmented in CPU tasks, reshuffled every epoch) or, with
``ray.ingest=dataloader``, from an ImageFolder through a DataLoader with a
distributed sampler. Every epoch's checkpoint goes to
``<ray.storage_path>/<ray.name>``; re-running with the same name resumes from
the latest one ("resuming from epoch N"); a finished run is not retrained.
Rank 0 logs to MLflow (tracking.enabled): params, per-epoch metrics, config,
class index, confusion matrix, learning curves and the final model, which
``--register NAME`` adds to the model registry. With ``distill.teacher`` set the
workers distil from that teacher (see jobs/distill.py, which also compares the two).

Exit status: 0 on success, 1 when training failed, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls_core.config import Config
from imgcls_core.tracking import SUMMARY_FILE  # rank 0 writes it into train.output_dir
from jobs.common import (
    add_config_args, fit_to_cluster, init_ray, is_uri, job_config, resolve_config_paths, resolve_path,
)


# --------------------------------------------------------------------------- driver


@dataclass
class TrainPlan:
    """Everything the driver decides before starting workers."""

    cfg: Config
    name: str
    ingest: str
    preprocessing: dict[str, Any]
    num_train: int
    run_key: str
    mlflow_run_id: str | None
    teacher: str | None = None  # distill.teacher pinned on the driver (an alias as its version)


def plan_training(cfg: Config, *, log=print, run_key: str | None = None) -> TrainPlan:
    """Resolve paths, check the data, compute normalization and the ingest path (on the driver).

    ``run_key`` names the MLflow run across attempts (default ``<storage_path>/<name>``); a
    sweep's trial keeps one key while its Train runs change name (PBT)."""
    from imgcls_core.data import load_dataset, materialize_digits
    from imgcls_core.runner import build_preprocessing

    cfg = resolve_config_paths(cfg)
    ingest = resolve_ingest(cfg)
    if ingest == "ray_data" and cfg.data.format != "parquet":
        raise ValueError(
            f"ray.ingest=ray_data reads Parquet shards but data.format is {cfg.data.format!r}; convert "
            f"with `python -m jobs.prepare --source {cfg.data.root} --out <dir>` and set data.format=parquet, "
            f"or use ray.ingest=dataloader"
        )
    ingest = _fit_to_running_cluster(cfg, ingest, log)
    if cfg.data.format == "digits":
        materialize_digits(cfg.data.root, seed=cfg.data.seed)
    if not is_uri(cfg.data.root) and not Path(cfg.data.root).exists():
        raise FileNotFoundError(f"data.root {cfg.data.root} does not exist on the driver's machine")
    if ingest == "ray_data" and not (Path(cfg.data.root) / cfg.data.val_split).is_dir():
        raise ValueError(
            f"ray.ingest=ray_data needs a validation split in the shards ({cfg.data.root}/{cfg.data.val_split}); "
            f"give the source a {cfg.data.val_split}/ folder before converting, or use ray.ingest=dataloader"
        )
    _check_storage(cfg.ray.storage_path)
    splits = load_dataset(cfg.data)
    log(splits.summary())
    pre = build_preprocessing(cfg, splits)
    teacher = pin_teacher(cfg, pre, log) if cfg.distill.teacher else None
    cfg.ray.name = name = cfg.ray.name or Path(cfg.train.output_dir).name
    return TrainPlan(cfg, name, ingest, pre.to_dict(), len(splits.train),
                     run_key or f"{cfg.ray.storage_path}/{name}", None, teacher)


def resolve_ingest(cfg: Config) -> str:
    """``ray.ingest`` with ``auto`` decided: Ray Data for Parquet shards, else a DataLoader."""
    if cfg.ray.ingest == "auto":
        return "ray_data" if cfg.data.format == "parquet" else "dataloader"
    return cfg.ray.ingest


def _fit_to_running_cluster(cfg: Config, ingest: str, log) -> str:
    """The ingest that fits the connected cluster (unchanged when no Ray instance is connected)."""
    import ray

    if not ray.is_initialized():
        return ingest
    return fit_to_cluster(cfg, ingest, ray.cluster_resources(), log=log)


def pin_teacher(cfg: Config, pre, log=print) -> str:
    """distill.teacher as every worker will load it: a registry alias pinned to the version it names
    now (a restart mid-run must not switch teachers), a relative path made absolute. The teacher is
    loaded here once so that a wrong one (other classes or input size) fails before any worker starts."""
    from imgcls_core.engine.distill import load_teacher, parse_teacher_spec

    spec = parse_teacher_spec(cfg.distill.teacher)
    if not spec.in_registry:
        spec = parse_teacher_spec(resolve_path(spec.path))
    teacher = load_teacher(spec, pre, tracking_uri=cfg.tracking.tracking_uri)
    log(f"distilling from {teacher.describe()} (distill.temperature={cfg.distill.temperature}, "
        f"distill.alpha={cfg.distill.alpha})")
    return teacher.spec.pinned


def _check_storage(storage_path: str) -> None:
    """A local storage_path must be writable here (and, on a multi-node cluster, shared)."""
    if is_uri(storage_path):
        return
    try:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage_path, prefix=".imgcls-write-test-"):
            pass  # a name of its own: concurrent trials probe the same folder
    except OSError as exc:
        raise FileNotFoundError(
            f"ray.storage_path {storage_path} is not writable ({exc.strerror}); use a writable folder that every "
            f"node sees (NFS) or a URI such as s3://bucket/prefix"
        ) from exc


def start_tracking(plan: TrainPlan, *, log=print, parent_run_id: str | None = None, params: bool = True) -> None:
    """Find the run of an earlier attempt (by storage path + name) or create it (nested under
    ``parent_run_id`` for a sweep's trial); log params (``params=False``: not again, e.g. for a PBT
    trial whose values were perturbed since: MLflow params cannot change)."""
    from imgcls_core.tracking import Tracker, log_training_inputs

    cfg = plan.cfg
    tracker = Tracker(cfg.tracking, log=log).start(run_key=plan.run_key, run_name=cfg.tracking.run_name or plan.name,
                                                   parent_run_id=parent_run_id)
    if not tracker.active:
        tracker.close()
        return
    plan.mlflow_run_id = tracker.run_id
    if not params:
        return  # the run stays RUNNING for the workers; rank 0 ends it
    world = cfg.ray.num_workers
    derived = {"world_size": world, "ingest": plan.ingest, "global_batch_size": cfg.data.batch_size * world,
               "num_train_images": plan.num_train}
    if plan.teacher:
        from imgcls_core.engine.distill import parse_teacher_spec

        derived.update({"teacher_uri": plan.teacher,
                        "teacher_version": parse_teacher_spec(plan.teacher).version or "file"})
    log_training_inputs(tracker, cfg, classes=plan.preprocessing["classes"], derived=derived,
                        tags={"imgcls.job": "distill" if plan.teacher else "train", "imgcls.storage": plan.run_key},
                        skip=("serve.",) if plan.teacher else ("serve.", "distill."))
    # The run stays RUNNING for the workers; rank 0 ends it.


def build_datasets(plan: TrainPlan) -> dict[str, Any]:
    """Ray Data pipelines for the ray_data ingest: read shards, shuffle, decode + augment in tasks."""
    if plan.ingest != "ray_data":
        return {}
    import ray.data

    from imgcls_core.data.presets import build_train_transform

    cfg, pre = plan.cfg, plan.preprocessing
    transform = build_train_transform(cfg.data.image_size, pre["mean"], pre["std"], cfg.augment)
    train = (
        ray.data.read_parquet(f"{cfg.data.root}/{cfg.data.train_split}")
        .select_columns(["image", "label", "path"])
        # A new order every epoch (the pipeline re-executes per epoch): shuffled shard order
        # here, and a row-level shuffle buffer on each worker (iter_train_batches), instead of
        # a full all-to-all random_shuffle.
        .randomize_block_order()
        .map_batches(decode_batch, fn_kwargs={"transform": transform, "image_size": cfg.data.image_size},
                     batch_size=128, batch_format="numpy")
    )
    return {"train": train}


SHUFFLE_BUFFER_ROWS = 2048


def iter_train_batches(data, batch_size: int):
    """(images, labels) batches from a Ray Data shard or dataset, shuffled through a row buffer."""
    batches = data.iter_torch_batches(batch_size=batch_size, drop_last=True, device="cpu", prefetch_batches=2,
                                      local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS)
    return ((b["image"], b["label"]) for b in batches)


def decode_batch(batch: dict[str, np.ndarray], transform, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: encoded bytes -> augmented float32 N x 3 x S x S (S = image_size).

    A row that does not decode is dropped and printed with its path (in the task's log): the
    epoch goes on with the others. jobs.prepare already left out every file that did not decode."""
    from imgcls_core.data import CorruptImageError, decode_image

    torch.set_num_threads(1)
    torch.manual_seed(secrets.randbits(63))  # task processes would otherwise repeat one RNG stream
    images, kept = [], []
    for i, (data, path) in enumerate(zip(batch["image"], batch["path"])):
        try:
            images.append(transform(decode_image(bytes(data), name=str(path))).numpy())
        except CorruptImageError as exc:
            print(f"decode_batch: skipping a corrupt image: {exc}", flush=True)
            continue
        kept.append(i)
    stacked = np.stack(images) if images else np.zeros((0, 3, image_size, image_size))
    return {"image": stacked.astype(np.float32), "label": batch["label"][kept].astype(np.int64)}


def build_trainer(plan: TrainPlan, *, stop_after: int | None = None, register_as: str | None = None,
                  inject_kill: dict | None = None, callbacks: list | None = None, storage_path: str | None = None,
                  init_checkpoint=None):
    """The TorchTrainer of a plan. ``init_checkpoint`` (a ray.train.Checkpoint, e.g. the one Tune's
    PBT hands a trial) is where the workers start when the run has no checkpoint of its own: they
    take its weights under this plan's hyperparameters."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    loop_config = {
        "config": cfg.to_dict(), "preprocessing": plan.preprocessing, "ingest": plan.ingest,
        "num_train": plan.num_train, "mlflow_run_id": plan.mlflow_run_id, "run_key": plan.run_key,
        "stop_after": stop_after, "register_as": register_as, "inject_kill": inject_kill,
        "init_checkpoint": init_checkpoint, "teacher": plan.teacher,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources,
            accelerator_type=cfg.ray.accelerator_type,
        ),
        datasets=build_datasets(plan),
        run_config=RunConfig(
            name=plan.name,
            storage_path=storage_path or cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val/acc1",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
    )


def run_training(cfg: Config, *, register_as: str | None = None, stop_after: int | None = None,
                 inject_kill: dict | None = None, log=print) -> dict[str, Any]:
    """Plan, start tracking, fit on the connected Ray cluster; returns the rank-0 summary."""
    plan = plan_training(cfg, log=log)
    out = Path(plan.cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(plan.cfg.to_yaml())  # as the local runner's: jobs.promote --summary reads it
    world = plan.cfg.ray.num_workers
    log(f"Ray Train: {world} worker(s) x {plan.cfg.data.batch_size} = global batch "
        f"{plan.cfg.data.batch_size * world}; ingest={plan.ingest}; run {plan.run_key}")
    start_tracking(plan, log=log)
    started = time.perf_counter()
    trainer = build_trainer(plan, stop_after=stop_after, register_as=register_as, inject_kill=inject_kill)
    try:
        result = trainer.fit()
    except Exception:
        _mark_run(plan, "FAILED", log)
        raise
    summary_file = Path(plan.cfg.train.output_dir) / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary.update({"seconds": time.perf_counter() - started, "checkpoint": getattr(result.checkpoint, "path", None),
                    "storage": plan.run_key})
    if plan.teacher:
        summary["teacher"] = plan.teacher
    return summary


def _mark_run(plan: TrainPlan, status: str, log) -> None:
    if plan.mlflow_run_id is None:
        return
    from imgcls_core.tracking import Tracker

    tracker = Tracker(plan.cfg.tracking, log=log).start(run_id=plan.mlflow_run_id)
    tracker.close(status=status)


# --------------------------------------------------------------------------- workers


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: build the engine, restore the latest checkpoint, fit, then (rank 0) package."""
    import ray.train
    import ray.train.torch
    from torch import nn

    from imgcls_core.engine import Engine, Preprocessing, check_same_model, fit, load_checkpoint, setup_runtime
    from imgcls_core.models import build_model
    from imgcls_core.tracking import Tracker

    cfg = Config.from_dict(loop_config["config"])
    pre = Preprocessing.from_dict(loop_config["preprocessing"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))

    out = Path(cfg.train.output_dir)

    def log(msg: str) -> None:  # rank 0 to the job's output and <output_dir>/train.log
        if rank == 0:
            print(f"[imgcls] {msg}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            with (out / "train.log").open("a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    if not is_uri(cfg.data.root) and not Path(cfg.data.root).exists():
        raise FileNotFoundError(
            f"worker {rank} on node {ray.util.get_node_ip_address()} cannot see data.root={cfg.data.root}; "
            f"on a multi-node cluster put the data on a shared file system or object storage"
        )
    runtime = setup_runtime(cfg.train, device=ray.train.torch.get_device())
    data = _WorkerData(cfg, pre, loop_config, rank, world)
    model = build_model(cfg.model, len(pre.classes), cfg.data.image_size)
    if cfg.ray.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    engine = Engine(
        cfg, model, runtime, data.steps_per_epoch, world_size=world, rank=rank,
        class_weights=data.class_weights, batch_mix=data.batch_mix,
        wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False) if world > 1 else m,
        teacher=_load_teacher(loop_config.get("teacher"), cfg, pre, log),
    )
    log(f"model={cfg.model.name} params={sum(p.numel() for p in model.parameters()):,} {engine.describe()}")

    run_id = loop_config["mlflow_run_id"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, map_location=runtime.device)
        check_same_model(state, cfg.to_dict(), checkpoint.path)
        engine.load_state_dict(state)
        run_id = state.get("extra", {}).get("mlflow_run_id") or run_id
        log(f"resuming from epoch {engine.epoch}"
        + (f", step {engine.epoch_step} of epoch {engine.epoch + 1}" if engine.epoch_step else "")
        + f" (checkpoint {checkpoint.path})")
    elif loop_config.get("init_checkpoint") is not None:
        start = loop_config["init_checkpoint"]
        with start.as_directory() as directory:
            state = load_checkpoint(directory, map_location=runtime.device)
        check_same_model(state, cfg.to_dict(), start.path)
        engine.adopt_state(state)  # its weights, this run's hyperparameters (and its own MLflow run)
        log(f"starting from epoch {engine.epoch} of {start.path} with lr={cfg.optim.lr:.4g} "
            f"augment.strength={cfg.augment.strength:.3g}")
    resumed_from = engine.epoch
    if engine.epoch >= cfg.train.epochs:
        log(f"run already finished all {cfg.train.epochs} epochs; nothing to train")

    tracker = Tracker(cfg.tracking if rank == 0 else _disabled(cfg), log=log)
    if rank == 0:
        tracker.start(run_id=run_id, run_key=loop_config["run_key"])

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        if metrics.get("mid_epoch"):
            log(f"mid-epoch checkpoint: epoch {int(metrics['epoch']) + 1}, step {int(metrics['epoch_step'])}")
        elif rank == 0:
            tracker.log_metrics(metrics, step=int(metrics["epoch"]))
            with (out / "history.jsonl").open("a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            log(_epoch_line(metrics, cfg.train.epochs))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    history = fit(engine, data.train_batches, data.val_batches, pre, report,
                  stop_after=loop_config["stop_after"], extra={"mlflow_run_id": tracker.run_id or run_id},
                  on_step=_fault_injector(loop_config.get("inject_kill"), engine, rank))
    if engine.epoch < cfg.train.epochs:
        log(f"stopped after epoch {engine.epoch} of {cfg.train.epochs}; re-run with the same name to resume")
        tracker.close(status="KILLED")
        return
    if not history and (out / SUMMARY_FILE).exists():
        tracker.close()
        return  # an earlier attempt already packaged this run
    val = engine.evaluate(data.val_batches(), pre.classes)
    used_ema = False
    if engine.ema is not None:  # every rank takes part: evaluation all-reduces
        ema_val = engine.evaluate(data.val_batches(), pre.classes, use_ema=True)
        used_ema = ema_val.acc1 >= val.acc1
        val = ema_val if used_ema else val
    if rank == 0:
        _package(cfg, engine, pre, val, used_ema, data, tracker, out, loop_config, resumed_from)


def _load_teacher(spec: str | None, cfg: Config, pre, log):
    """This worker's own copy of the pinned teacher (downloaded to a temporary folder), or None."""
    if not spec:
        return None
    from imgcls_core.engine.distill import load_teacher

    teacher = load_teacher(spec, pre, tracking_uri=cfg.tracking.tracking_uri)
    log(teacher.describe())
    return teacher.model  # the engine moves it to the worker's device and memory format


def _disabled(cfg: Config):
    from dataclasses import replace

    return replace(cfg.tracking, enabled=False)


class _WorkerData:
    """The rank's training batches (Ray Data shard or distributed DataLoader) and its val share."""

    def __init__(self, cfg: Config, pre, loop_config: dict[str, Any], rank: int, world: int):
        import ray.train
        import ray.train.torch
        from torch.utils.data import DataLoader

        from imgcls_core.data import class_weights, load_dataset
        from imgcls_core.data.presets import build_batch_mix, build_eval_transform
        from imgcls_core.runner import build_loaders

        self.cfg, self.pre, self.rank, self.world = cfg, pre, rank, world
        self.ingest = loop_config["ingest"]
        splits = load_dataset(cfg.data)
        self.splits = splits
        num_classes = len(pre.classes)
        self.class_weights = (
            class_weights(splits.train.labels, num_classes) if cfg.data.balance == "weighted_loss" else None
        )
        self.batch_mix = build_batch_mix(cfg.augment, num_classes)
        eval_tf = build_eval_transform(cfg.data.image_size, pre.mean, pre.std, pre.crop_ratio)
        # Every rank evaluates a disjoint 1/world of val (no padding), and Engine.evaluate sums the
        # counts over ranks: the metrics are those of the whole split.
        share = splits.val.subset(list(range(rank, len(splits.val), world)))
        self.val_loader = DataLoader(share.dataset(eval_tf), batch_size=cfg.data.eval_batch_size,
                                     num_workers=cfg.data.num_workers)
        b = cfg.data.batch_size
        if self.ingest == "ray_data":
            self.shard = ray.train.get_dataset_shard("train")
            rows = loop_config["num_train"] // world  # streaming_split(equal=True) gives every rank this many
            self.steps_per_epoch = rows // b
        else:
            loaders = build_loaders(cfg, splits, pre)
            self.loader = ray.train.torch.prepare_data_loader(loaders["train"], move_to_device=False)
            self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={b} is larger than a worker's share of the training split "
                             f"({loop_config['num_train']} images over {world} workers)")

    def train_batches(self, epoch: int):
        if self.ingest == "ray_data":
            return iter_train_batches(self.shard, self.cfg.data.batch_size)
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
        return self.loader

    def val_batches(self):
        return self.val_loader


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


def _epoch_line(m: dict[str, float], epochs: int) -> str:
    return (f"epoch {int(m['epoch'])}/{epochs} train/loss {m['train/loss']:.4f} train/acc1 {m['train/acc1']:.4f} "
            f"val/loss {m['val/loss']:.4f} val/acc1 {m['val/acc1']:.4f} lr {m['lr']:.4g} "
            f"{m['train/images_per_s']:.0f} img/s {m['train/epoch_s']:.1f}s")


def _package(cfg, engine, pre, val, used_ema, data, tracker, out: Path, loop_config, resumed_from: int) -> None:
    """Rank 0 after training: model.pt, test evaluation, artifacts, MLflow model (+ registry)."""
    from torch.utils.data import DataLoader

    from imgcls_core.data.presets import build_eval_transform
    from imgcls_core.engine import save_inference_model
    from imgcls_core.evaluation import plot_learning_curves
    from imgcls_core.runner import evaluate_to_files, read_history, run_summary
    from imgcls_core.tracking import log_training_outputs

    final = engine.inference_model(prefer_ema=used_ema)
    files = {"model": save_inference_model(out / "model.pt", final.state_dict(), cfg.to_dict()["model"], pre,
                                           val.metrics("val/"))}
    test = None
    if data.splits.test is not None:
        eval_tf = build_eval_transform(cfg.data.image_size, pre.mean, pre.std, pre.crop_ratio)
        loader = DataLoader(data.splits.test.dataset(eval_tf), batch_size=cfg.data.eval_batch_size)
        test = evaluate_to_files(final, loader, data.splits.test, engine.runtime.device, pre, out, files)
        print(test.summary(), flush=True)
    if history := read_history(out):
        files["curves"] = plot_learning_curves(history, out / "learning_curves.png")
    metrics = {**val.metrics("final_val/"), **(test.metrics("test/") if test is not None else {})}
    info = log_training_outputs(tracker, metrics=metrics, step=engine.epoch, files=files,
                                register_as=loop_config["register_as"],
                                extra_metadata={"test_metrics": test.metrics("test/") if test else {}})
    summary = run_summary(run_id=tracker.run_id, epochs=engine.epoch, resumed_from=resumed_from, used_ema=used_ema,
                          val=val, test=test, model_file=files["model"], model=info)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    tracker.close()
    print(f"[imgcls] done: val top-1 {val.acc1:.4f}" + (f", test top-1 {test.acc1:.4f}" if test else "")
          + f"; model {files['model']}" + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""), flush=True)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ray_address=True)
    parser.add_argument("--register", metavar="NAME", help="register the final model under this name")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop after N epochs of this invocation (re-run with the same name to resume)")
    return parser


def run_job(cfg: Config, args: argparse.Namespace, run=None, what: str = "training") -> int:
    """Connect to Ray, run ``run`` (default :func:`run_training`) and print its summary; the exit status.

    Shared by the jobs built on this one's machinery (jobs.distill)."""
    if args.register:
        cfg.tracking.enabled = True
    init_ray(args.address)
    try:
        summary = (run or run_training)(cfg, register_as=args.register, stop_after=args.stop_after)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause, not a traceback wall
        print(f"error: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args, cfg, done = job_config(build_parser(), argv)
    if done is not None:
        return done
    return run_job(cfg, args)


if __name__ == "__main__":
    # Run the imported module, not __main__: Ray pickles functions of __main__ by value, and the
    # worker loop must travel by reference (the workers import jobs.train from the working_dir).
    from jobs.train import main as _main

    sys.exit(_main())
