"""Local runner: train and evaluate from a config in one process, no Ray.

For quick iteration and for CPU-only machines. The run itself is the core's
:class:`~imgcls_core.engine.session.TrainingSession`, the same as in a Ray Train
worker, so a run started here can be inspected, resumed and served the same
way. Everything lands in ``train.output_dir``::

    checkpoints/epoch_NNNN/   resumable checkpoints (the newest train.keep_checkpoints)
    history.jsonl             one line of metrics per epoch
    model.pt                  the final weights + preprocessing (weights_only-loadable)
    test_metrics.json, test_report.txt, confusion_matrix.png, predictions.csv
    train_summary.json        once all epochs ran: the MLflow run, model file, val/test top-1
                              (the same keys as jobs.train's; ``jobs.promote --summary`` reads it)

One run at a time per output_dir: a second one is refused at once (an OS lock).
With ``tracking.enabled`` the run is an MLflow run, the same as a Ray Train job's
(see imgcls_core.tracking): params, per-epoch metrics, artifacts, and ``model.pt``
as its MLflow model (registered as ``tracking.register_as`` when set). A re-run
with the same ``output_dir`` continues the same MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from imgcls_core.config import Config
from imgcls_core.data import DatasetSplits, class_weights, load_dataset
from imgcls_core.data.loaders import build_loaders
from imgcls_core.data.preprocessing import Preprocessing, build_preprocessing
from imgcls_core.data.presets import build_batch_mix
from imgcls_core.engine.checkpoint import CheckpointDir
from imgcls_core.engine.fit import WriteCheckpoint
from imgcls_core.engine.loop import Engine
from imgcls_core.engine.rundir import lock_output_dir
from imgcls_core.engine.runtime import Runtime, setup_runtime
from imgcls_core.engine.session import RunData, RunHost, RunResult, TrainingSession
from imgcls_core.models import build_model, check_pretrained_file
from imgcls_core.tracking import SUMMARY_FILE, Tracker, log_training_inputs

__all__ = ["SUMMARY_FILE", "RunResult", "build_session", "train_and_evaluate"]

Log = Callable[[str], None]


class LocalHost:
    """Runs a session in this process: checkpoints go to ``<output_dir>/checkpoints``."""

    rank = 0

    def __init__(self, checkpoints: CheckpointDir, log: Log):
        self.checkpoints, self.log = checkpoints, log

    def save(self, metrics: dict[str, float], write: WriteCheckpoint | None) -> None:
        if write is not None:
            self.checkpoints.save(int(metrics["epoch"]), write)


def train_and_evaluate(cfg: Config, *, log: Log = print, stop_after: int | None = None) -> RunResult:
    """Train (resuming from ``output_dir`` when there is a checkpoint), then evaluate on test."""
    out = Path(cfg.train.output_dir)
    with lock_output_dir(out):
        checkpoints = CheckpointDir(out / "checkpoints", keep=cfg.train.keep_checkpoints)
        if not cfg.train.resume and checkpoints.latest() is not None:
            raise ValueError(
                f"train.resume is false, but {out} holds a run's checkpoints (up to {checkpoints.latest().name}); "
                f"a new run there would mix into that run's history, MLflow run and checkpoints: "
                f"set another train.output_dir, or move {checkpoints.root} away")
        runtime = setup_runtime(cfg.train)
        found = checkpoints.load_latest(map_location=runtime.device, log=log) if cfg.train.resume else None
        if found is None:  # a new run starts from model.pretrained: refused before the data is loaded
            check_pretrained_file(cfg.model.pretrained)
        session, splits = build_session(cfg, LocalHost(checkpoints, log), job="train_local",
                                        register_as=cfg.tracking.register_as, runtime=runtime,
                                        resume=found[0] if found else None)
        session.resume(*(found or (None, None)))
        tracker = start_tracking(cfg, splits, out, log)
        try:
            with _progress(cfg) as on_step:
                return session.run(tracker, stop_after=stop_after, on_step=on_step)
        except BaseException:
            tracker.close(status="FAILED")
            raise


def build_session(cfg: Config, host: RunHost, *, job: str, register_as: str | None = None,
                  pre: Preprocessing | None = None, runtime: Runtime | None = None,
                  resume: dict[str, Any] | None = None) -> tuple[TrainingSession, DatasetSplits]:
    """A training session in this process over DataLoaders of the config's data (the local runner's,
    and a one-worker sweep trial's, which passes the preprocessing its driver computed).

    ``resume``: the checkpoint state the caller will restore into the session (``session.resume``
    or ``session.adopt``). The model is then built without ``model.pretrained``'s weights (the
    checkpoint holds every weight; the file need not be there any more), and the run keeps the
    checkpoint's normalization."""
    runtime = runtime or setup_runtime(cfg.train)
    splits = load_dataset(cfg.data)
    if pre is None:  # a caller with the preprocessing (a sweep's driver) has shown the data already
        host.log(splits.summary())
        resumed = Preprocessing.from_dict(resume["preprocessing"]) if resume is not None else None
        pre = build_preprocessing(cfg, splits, resumed=resumed)
    loaders = build_loaders(cfg, splits, pre)
    num_classes = len(splits.classes)
    model_cfg = replace(cfg.model, pretrained=None) if resume is not None else cfg.model
    model = build_model(model_cfg, num_classes, cfg.data.image_size, log=host.log)
    weights = class_weights(splits.train.labels, num_classes) if cfg.data.balance == "weighted_loss" else None
    engine = Engine(cfg, model, runtime, len(loaders["train"]), class_weights=weights,
                    batch_mix=build_batch_mix(cfg.augment, num_classes))
    data = RunData(train=loaders["train"], val=loaders["val"],
                   test=(lambda: loaders["test"]) if "test" in loaders else None, test_records=splits.test,
                   datasets=[loader.dataset for loader in loaders.values()])
    return TrainingSession(cfg, pre, engine, data, host, job=job, register_as=register_as), splits


def start_tracking(cfg: Config, splits: DatasetSplits, out: Path, log: Log) -> Tracker:
    """The run's MLflow run (inactive when tracking is off): the one of an earlier run with the
    same output_dir, else a new one, with the config, class index and data sizes logged."""
    tracker = Tracker(cfg.tracking, log=log)
    if not cfg.tracking.enabled:
        return tracker
    run_key = f"local:{out.resolve()}"
    tracker.start(run_key=run_key, run_name=cfg.tracking.run_name or out.name)
    derived = {"world_size": 1, "ingest": "local", "global_batch_size": cfg.data.batch_size,
               "num_train_images": len(splits.train)}
    log_training_inputs(tracker, cfg, classes=list(splits.classes), derived=derived,
                        tags={"imgcls.job": "train_local", "imgcls.storage": run_key})
    return tracker


class _progress:
    """A tqdm bar over optimizer steps, shown only on a terminal."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.bar: tqdm | None = None

    def __enter__(self):
        self.bar = tqdm(desc="train", unit="step", disable=None, dynamic_ncols=True, leave=False)

        def on_step(m: dict[str, float]) -> None:
            self.bar.update(self.cfg.train.log_every)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.3g}")

        return on_step

    def __exit__(self, *exc) -> None:
        self.bar.close()
