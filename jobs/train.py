"""Distributed training on Ray Train: PyTorch DDP over the workers of a Ray cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m jobs.train --config configs/digits_ray.yaml [--set ray.num_workers=4] [--register digits]

Each worker (jobs.train_worker) runs the core's training session
(imgcls_core.engine.session) under DDP (NCCL on GPUs, gloo on CPUs). Data comes from Parquet shards through Ray Data
(decoded and augmented in CPU tasks, reshuffled every epoch) or, with
``ray.ingest=dataloader``, from an ImageFolder through a DataLoader with a
distributed sampler. Every epoch's checkpoint goes to
``<ray.storage_path>/<ray.name>``; re-running with the same name resumes from
the latest one ("resuming from epoch N"); a finished run is not retrained. One
job at a time per train.output_dir: a second one is refused at once.
Rank 0 logs to MLflow (tracking.enabled): params, per-epoch metrics, config,
class index, confusion matrix, learning curves and the final model, which
``--register NAME`` (or tracking.register_as) adds to the model registry; a
registration that fails fails the job. With ``distill.teacher`` set the
workers distil from that teacher (see jobs/distill.py, which also compares the two).

Exit status: 0 on success, 1 when training failed, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls_core.config import TORCHVISION_PREFIX, Config, is_multi_label, score_name
from imgcls_core.tracking import SUMMARY_FILE  # rank 0 writes it into train.output_dir
from jobs.common import (
    add_config_args, fit_to_cluster, init_ray, is_uri, job_config, local_folder, positive_int, read_record,
    resolve_config_paths, resolve_path, run_main,
)
from jobs.train_worker import DECODE_BLOCK_ROWS, augment_batch, decode_batch, decode_pixels, train_loop_per_worker


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
    from imgcls_core.data import load_dataset
    from imgcls_core.data.preprocessing import build_preprocessing

    cfg = resolve_config_paths(cfg)
    ingest = resolve_ingest(cfg)
    if ingest == "ray_data" and cfg.data.format != "parquet":
        raise ValueError(
            f"ray.ingest=ray_data reads Parquet shards but data.format is {cfg.data.format!r}; convert "
            f"with `python -m jobs.prepare --source {cfg.data.root} --out <dir>` and set data.format=parquet, "
            f"or use ray.ingest=dataloader"
        )
    if cfg.data.balance == "weighted_sampler":
        raise ValueError(
            "data.balance=weighted_sampler is not available under Ray Train (Ray Data streams rows without a "
            "sampler, and each worker's DataLoader draws its share with a distributed sampler); use "
            "data.balance=weighted_loss, which weighs the loss by inverse class frequency, or train with "
            "python -m jobs.train_local"
        )
    ingest = _fit_to_running_cluster(cfg, ingest, log)
    check_data(cfg, ingest)
    _check_storage(cfg.ray.storage_path)
    # with Ray Data ingest the train images are read only for the normalization's sample
    splits = load_dataset(cfg.data, train_images=ingest != "ray_data")
    log(splits.summary())
    pre = build_preprocessing(cfg, splits, resumed=_resumed_preprocessing(cfg, log))
    teacher = pin_teacher(cfg, pre, log) if cfg.distill.teacher else None
    cfg.ray.name = name = cfg.ray.name or Path(cfg.train.output_dir).name
    return TrainPlan(cfg, name, ingest, pre.to_dict(), len(splits.train),
                     run_key or f"{cfg.ray.storage_path}/{name}", None, teacher)


def check_data(cfg: Config, ingest: str, *, missing: str = "does not exist on the driver's machine") -> None:
    """That the data a run of ``cfg`` reads with ``ingest`` is there (the digits are written to
    data.root first): a local data.root exists (else FileNotFoundError "data.root <root>
    <missing>"), and Ray Data ingest finds the validation split among the shards. A local
    ``model.pretrained`` file must be there too, unless the run resumes from checkpoints of its
    own (on local storage: see :func:`local_run_checkpoints`), which hold every weight."""
    from imgcls_core.data import materialize_digits
    from imgcls_core.models import check_pretrained_file

    if cfg.data.format == "digits":
        materialize_digits(cfg.data.root, seed=cfg.data.seed)
    if not is_uri(cfg.data.root) and not Path(cfg.data.root).exists():
        raise FileNotFoundError(f"data.root {cfg.data.root} {missing}")
    if ingest == "ray_data" and not (Path(cfg.data.root) / cfg.data.val_split).is_dir():
        raise ValueError(
            f"ray.ingest=ray_data needs a validation split in the shards ({cfg.data.root}/{cfg.data.val_split}); "
            f"give the source a {cfg.data.val_split}/ folder before converting, or use ray.ingest=dataloader"
        )
    if not local_run_checkpoints(cfg):
        check_pretrained_file(cfg.model.pretrained, "does not exist on the driver's machine (the workers load it "
                                                    "when the run starts; on several nodes, every node needs it)")


def local_run_checkpoints(cfg: Config) -> list[Path]:
    """The checkpoint folders of ``cfg``'s Ray Train run (``<ray.storage_path>/<ray.name>``, the name
    defaulting as :func:`plan_training` sets it), newest first; [] for remote storage (s3://, gs://),
    which is not looked into (a run there needs its model.pretrained file even to resume)."""
    storage = local_folder(cfg.ray.storage_path)
    if storage is None:
        return []
    run = storage / (cfg.ray.name or Path(cfg.train.output_dir).name)
    if not run.is_dir():
        return []
    folders = [p for p in run.glob("checkpoint_*") if p.is_dir()]
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)


def _resumed_preprocessing(cfg: Config, log):
    """The preprocessing of the run's own newest readable checkpoint when the run resumes without its
    local model.pretrained file (deleted since it started; check_data lets that through for a run with
    checkpoints), so that it goes on normalizing as it trained; None when the file is there (or no
    file is used): the normalization then follows the config as for a new run."""
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.checkpoint import load_first_readable

    pretrained = cfg.model.pretrained
    if not pretrained or pretrained.startswith(TORCHVISION_PREFIX) or Path(pretrained).is_file():
        return None
    folders = local_run_checkpoints(cfg)
    if not folders:
        return None  # a new run: check_data has refused the missing file already
    state, _ = load_first_readable(folders, map_location="cpu", log=log)
    return Preprocessing.from_dict(state["preprocessing"])


def resolve_ingest(cfg: Config) -> str:
    """``ray.ingest`` with ``auto`` decided: Ray Data for single-label Parquet shards, else a DataLoader."""
    if cfg.ray.ingest == "auto":
        return "ray_data" if cfg.data.format == "parquet" and not is_multi_label(cfg) else "dataloader"
    return cfg.ray.ingest


def _fit_to_running_cluster(cfg: Config, ingest: str, log) -> str:
    """The ingest that fits the connected cluster (unchanged when no Ray instance is connected)."""
    import ray

    if not ray.is_initialized():
        return ingest
    cluster = ray.cluster_resources()
    ingest = fit_to_cluster(cfg, ingest, cluster, log=log)
    r, free = cfg.ray, ray.available_resources()
    need = r.num_workers * r.cpus_per_worker
    if not r.autoscaling and need > free.get("CPU", 0.0):
        # Ray Train retries a worker group that cannot start without end (a message a minute)
        log(f"warning: the Train workers need {need:g} CPU and {free.get('CPU', 0.0):g} of the cluster's "
            f"{cluster.get('CPU', 0.0):g} are free now (Serve replicas or other jobs hold the rest): "
            f"the job waits until they are free; `ray status` shows who holds them")
    return ingest


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


#: The most decoded pixels (bytes, all rows) build_datasets keeps in the object store to decode once
#: and only augment per epoch; also at most a quarter of the cluster's object store.
DECODED_CACHE_BYTES = 2 * 2**30


def build_datasets(plan: TrainPlan) -> dict[str, Any]:
    """Ray Data pipelines for the ray_data ingest: read shards in small blocks, decode, augment in tasks.

    The order is a function of data.seed and the epoch (a seeded shard order, the trainer's
    ``preserve_order`` and a shuffle buffer seeded per epoch on each worker), so a run resumed
    from a mid-epoch checkpoint skips exactly the batches it had trained; the random draws of
    augmentation are new on every pass. Nothing waits for the whole split (no all-to-all step).

    When the decoded split fits :func:`decoded_cache_budget`, it is decoded once, here, and kept
    in the object store (in the same seeded order); every epoch then only augments."""
    if plan.ingest != "ray_data":
        return {}
    import ray.data
    from ray.data import FileShuffleConfig

    # Not "Starting execution of Dataset ..." and its plan on every epoch of every run (ray-data.log has them).
    ray.data.DataContext.get_current().print_on_execution_start = False

    from imgcls_core.data.presets import build_batch_augment, build_train_transform

    cfg, pre = plan.cfg, plan.preprocessing
    build = build_batch_augment if cfg.augment.batched else build_train_transform
    transform = build(cfg.data.image_size, pre["mean"], pre["std"], cfg.augment)
    rows = (
        # A seeded shard order, the same for every pass (reseeding per execution would give a resumed
        # run another order than an uninterrupted one: the execution count restarts with the job);
        # the rows of an epoch are mixed by a buffer seeded per epoch (train_worker.iter_train_batches).
        # This replaces randomize_block_order, an all-to-all step that waited for every shard to be
        # read before the first decode started, on every epoch.
        ray.data.read_parquet(f"{cfg.data.root}/{cfg.data.train_split}", columns=["image", "label", "path"],
                              shuffle=FileShuffleConfig(seed=cfg.data.seed, reseed_after_execution=False))
        # Shards hold thousands of rows: a task per shard would hold the first batch back until a
        # whole shard is decoded and leave CPUs idle at the end of an epoch.
        .repartition(target_num_rows_per_block=DECODE_BLOCK_ROWS)
    )
    augment = {"transform": transform, "image_size": cfg.data.image_size}
    if _decoded_bytes(cfg, plan.num_train) <= decoded_cache_budget():
        rows.context.execution_options.preserve_order = True  # the cached blocks in the seeded order
        decoded = rows.map_batches(decode_pixels, batch_size=DECODE_BLOCK_ROWS, batch_format="numpy").materialize()
        train = decoded.map_batches(augment_batch, fn_kwargs=augment, batch_size=DECODE_BLOCK_ROWS,
                                    batch_format="numpy")
    else:
        train = rows.map_batches(decode_batch, fn_kwargs=augment, batch_size=DECODE_BLOCK_ROWS, batch_format="numpy")
    return {"train": train}


def decoded_cache_budget() -> int:
    """Bytes of decoded pixels build_datasets may keep: DECODED_CACHE_BYTES, and at most a quarter of
    the connected cluster's object store."""
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return int(min(DECODED_CACHE_BYTES, store / 4))


def _decoded_bytes(cfg: Config, rows: int) -> int:
    """The decoded size of the train split, from its first image (3 x H x W bytes per row)."""
    import pyarrow.dataset as pads

    from imgcls_core.data import CorruptImageError, decode_image

    first = pads.dataset(f"{cfg.data.root}/{cfg.data.train_split}", format="parquet").head(1, columns=["image"])
    try:
        pixels = decode_image(first.column("image")[0].as_py()).numel() if first.num_rows else 0
    except CorruptImageError:
        return 1 << 62  # unknown: do not cache
    return rows * pixels


def ingest_options():
    """Ray Data's execution options for the trainer's datasets: Train's defaults with
    ``preserve_order``, so every pass gives each rank the same rows in the same order (for a
    given seed and epoch) and a mid-epoch resume skips exactly what was trained."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def build_trainer(plan: TrainPlan, *, stop_after: int | None = None, register_as: str | None = None,
                  inject_kill: dict | None = None, callbacks: list | None = None, storage_path: str | None = None,
                  init_checkpoint=None):
    """The TorchTrainer of a plan. ``init_checkpoint`` (a ray.train.Checkpoint, e.g. the one Tune's
    PBT hands a trial) is where the workers start when the run has no checkpoint of its own: they
    take its weights under this plan's hyperparameters. ``register_as``: the registered model name
    for the final model (jobs.train passes ``--register`` or ``tracking.register_as``; a sweep's
    trials register nothing: jobs.promote registers the one it promotes)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = plan.cfg
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    loop_config = {
        "config": cfg.to_dict(), "preprocessing": plan.preprocessing, "ingest": plan.ingest,
        "num_train": plan.num_train, "mlflow_run_id": plan.mlflow_run_id, "run_key": plan.run_key,
        "stop_after": stop_after, "register_as": register_as,
        "inject_kill": inject_kill, "init_checkpoint": init_checkpoint, "teacher": plan.teacher,
        "job": "distill" if plan.teacher else "train",
    }

    # Ray Train V2 reroutes print() in its workers through the logging module as well, so each line
    # of a worker shows twice wherever a library has wrapped sys.stdout (MLflow does): plain prints.
    # (Both settings pass from this process's environment to the controller and workers.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # A worker's ray.train.report waits until the controller has taken its previous report, and the
    # controller looks every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): about 1 s per epoch
    # spent waiting (bench/train_vs_local.py: report 0.9-1.3 s against 0.02 s with 0.2 s here).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources,
            accelerator_type=cfg.ray.accelerator_type,
        ),
        datasets=build_datasets(plan),
        dataset_config=DataConfig(execution_options=ingest_options()),
        run_config=RunConfig(
            name=plan.name,
            storage_path=storage_path or cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=f"val/{score_name(cfg)}",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            # Train's own INFO lines (each report and checkpoint, worker-group start) stay in its log
            # files under the Ray session folder; the job's output is the epoch lines and warnings.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_training(cfg: Config, *, register_as: str | None = None, stop_after: int | None = None,
                 inject_kill: dict | None = None, log=print) -> dict[str, Any]:
    """Plan, start tracking, fit on the connected Ray cluster; returns the rank-0 summary.

    The driver holds train.output_dir's lock while the workers run: a second job on the same
    folder is refused at once."""
    from imgcls_core.engine.rundir import lock_output_dir

    plan = plan_training(cfg, log=log)
    out = Path(plan.cfg.train.output_dir)
    with lock_output_dir(out):
        claim_run_folder(plan)
        return _fit(plan, out, register_as=register_as, stop_after=stop_after, inject_kill=inject_kill, log=log)


OWNER_FILE = "imgcls_output_dir.json"  # in the Ray run's folder: the train.output_dir it belongs to


def claim_run_folder(plan: TrainPlan) -> None:
    """Refuse to train in a Ray run folder (``<ray.storage_path>/<ray.name>``) that belongs to another
    train.output_dir: its checkpoints would be resumed, and its MLflow run continued, by this job.
    Two output folders of one name (``runs/a/exp``, ``runs/b/exp``) give the same default ray.name.
    On local storage the first run records its output folder there (remote storage is not checked)."""
    storage = plan.cfg.ray.storage_path
    if (folder := local_folder(storage)) is None:
        return
    record = folder / plan.name / OWNER_FILE
    mine = str(Path(plan.cfg.train.output_dir).resolve())
    owner = read_record(record).get("output_dir")
    if owner is None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"output_dir": mine}))
    elif owner != mine:
        raise ValueError(
            f"the Ray run {plan.name} in {storage} belongs to train.output_dir {owner}, not {mine}: the two would "
            f"share checkpoints and an MLflow run. Set ray.name to another name (its default is the output "
            f"folder's name)")


def _fit(plan: TrainPlan, out: Path, *, register_as, stop_after, inject_kill, log) -> dict[str, Any]:
    world = plan.cfg.ray.num_workers
    log(f"Ray Train: {world} worker(s) x {plan.cfg.data.batch_size} = global batch "
        f"{plan.cfg.data.batch_size * world}; ingest={plan.ingest}; run {plan.run_key}")
    start_tracking(plan, log=log)
    started, since = time.perf_counter(), time.time()
    try:
        trainer = build_trainer(plan, stop_after=stop_after, register_as=register_as, inject_kill=inject_kill)
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C: Ray Train aborts the run and exits (SystemExit); `ray job stop`: SIGTERM (run_main)
        _mark_run(plan, "KILLED", log)
        if isinstance(exc, SystemExit):
            raise KeyboardInterrupt from exc
        raise
    except Exception:
        _mark_run(plan, "FAILED", log)
        raise
    # rank 0 writes it once it packaged the model; one from before this job is an earlier run's
    # (this one stopped early, --stop-after): not reported as this run's
    summary_file = out / SUMMARY_FILE
    fresh = summary_file.exists() and summary_file.stat().st_mtime >= since - 5
    summary = json.loads(summary_file.read_text()) if fresh else {}
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


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser, ray_address=True)
    parser.add_argument("--register", metavar="NAME", help="register the final model under this name")
    parser.add_argument("--stop-after", type=positive_int, metavar="N",
                        help="stop after N epochs of this invocation (re-run with the same name to resume)")
    return parser


def run_job(cfg: Config, args: argparse.Namespace, run=None, what: str = "training") -> int:
    """Connect to Ray, run ``run`` (default :func:`run_training`) and print its summary; the exit status
    (jobs.common.run_main's policy). Shared by the jobs built on this one's machinery (jobs.distill)."""

    def body() -> int:
        register_as = args.register or cfg.tracking.register_as
        if register_as:
            cfg.tracking.enabled = True
        # before Ray: a data.root that is not there is not a cluster problem (paths as the plan resolves
        # them: against IMGCLS_BASE_DIR in a submitted job, whose working directory holds no data)
        check_data(resolve_config_paths(cfg), "dataloader")
        init_ray(args.address)
        summary = (run or run_training)(cfg, register_as=register_as, stop_after=args.stop_after)
        print(json.dumps(summary, indent=1))
        if register_as and summary.get("epochs") == cfg.train.epochs and not summary.get("registered_version"):
            print(f"error: {what} finished but the model was not registered as {register_as!r} "
                  f"(see the MLflow messages above)", file=sys.stderr)
            return 1
        return 0

    return run_main(body, what=what)


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
