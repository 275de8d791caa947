"""Local runner: train and evaluate from a config in one process, no Ray.

For quick iteration and for CPU-only machines. It uses the same engine,
checkpoints and artifacts as the distributed job, so a run started here can
be inspected, resumed and served the same way. Everything lands in
``train.output_dir``::

    checkpoints/epoch_NNNN/   resumable checkpoints (the newest train.keep_checkpoints)
    history.jsonl             one line of metrics per epoch
    model.pt                  the final weights + preprocessing (weights_only-loadable)
    test_metrics.json, test_report.txt, confusion_matrix.png, predictions.csv
    train_summary.json        once all epochs ran: the MLflow run, model file, val/test top-1
                              (the same keys as jobs.train's; ``jobs.promote --summary`` reads it)

With ``tracking.enabled`` the run is an MLflow run, the same as a Ray Train job's
(see imgcls_core.tracking): params, per-epoch metrics, artifacts, and ``model.pt``
as its MLflow model (registered as ``tracking.register_as`` when set). A re-run
with the same ``output_dir`` continues the same MLflow run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imgcls_core.config import Config
from imgcls_core.data import DatasetSplits, SplitRecords, build_weighted_sampler, class_weights, load_dataset
from imgcls_core.data.presets import build_batch_mix, build_eval_transform, build_train_transform
from imgcls_core.data.stats import IMAGENET_MEAN, IMAGENET_STD, compute_mean_std
from imgcls_core.engine.checkpoint import (
    CheckpointDir, Preprocessing, check_same_model, load_checkpoint, save_inference_model,
)
from imgcls_core.engine.fit import fit
from imgcls_core.engine.loop import Engine
from imgcls_core.engine.runtime import setup_runtime
from imgcls_core.evaluation import (
    EvalReport, compute_metrics, plot_confusion_matrix, plot_learning_curves, predict, write_predictions,
)
from imgcls_core.models import build_model
from imgcls_core.tracking import SUMMARY_FILE, Tracker, log_training_inputs, log_training_outputs

Log = Callable[[str], None]


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict[str, float]]
    test: EvalReport | None
    val: EvalReport
    used_ema: bool
    seconds: float
    resumed_from: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    summary: dict = field(default_factory=dict)  # train_summary.json (empty until every epoch ran)


def resolve_normalization(cfg: Config, train: SplitRecords) -> tuple[list[float], list[float]]:
    """ImageNet statistics for pretrained backbones, else statistics of the training split."""
    mode = cfg.data.normalization
    if mode == "imagenet" or (mode == "auto" and cfg.model.pretrained):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return compute_mean_std(train, cfg.data.image_size, seed=cfg.data.seed)


def build_preprocessing(cfg: Config, splits: DatasetSplits) -> Preprocessing:
    mean, std = resolve_normalization(cfg, splits.train)
    return Preprocessing(cfg.data.image_size, mean, std, cfg.augment.eval_crop_ratio, list(splits.classes))


def build_loaders(cfg: Config, splits: DatasetSplits, pre: Preprocessing) -> dict[str, DataLoader]:
    """DataLoaders for each split. Shuffling draws from torch's global RNG, which the engine
    reseeds every epoch, so the order is reproducible and resumable."""
    d = cfg.data
    train_tf = build_train_transform(d.image_size, pre.mean, pre.std, cfg.augment)
    eval_tf = build_eval_transform(d.image_size, pre.mean, pre.std, pre.crop_ratio)
    common = {"num_workers": d.num_workers, "pin_memory": torch.cuda.is_available(),
              "persistent_workers": d.num_workers > 0}
    sampler = build_weighted_sampler(splits.train.labels) if d.balance == "weighted_sampler" else None
    loaders = {
        "train": DataLoader(
            splits.train.dataset(train_tf), batch_size=d.batch_size, shuffle=sampler is None,
            sampler=sampler, drop_last=len(splits.train) > d.batch_size, **common,
        ),
        "val": DataLoader(splits.val.dataset(eval_tf), batch_size=d.eval_batch_size, **common),
    }
    if splits.test is not None:
        loaders["test"] = DataLoader(splits.test.dataset(eval_tf), batch_size=d.eval_batch_size, **common)
    return loaders


def train_and_evaluate(cfg: Config, *, log: Log = print, stop_after: int | None = None) -> RunResult:
    """Train (resuming from ``output_dir`` when there is a checkpoint), then evaluate on test."""
    start = time.perf_counter()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = setup_runtime(cfg.train)
    splits = load_dataset(cfg.data)
    log(splits.summary())
    pre = build_preprocessing(cfg, splits)
    loaders = build_loaders(cfg, splits, pre)
    num_classes = len(splits.classes)
    model = build_model(cfg.model, num_classes, cfg.data.image_size)
    weights = class_weights(splits.train.labels, num_classes) if cfg.data.balance == "weighted_loss" else None
    engine = Engine(cfg, model, runtime, len(loaders["train"]), class_weights=weights,
                    batch_mix=build_batch_mix(cfg.augment, num_classes))
    log(f"model={cfg.model.name} params={sum(p.numel() for p in model.parameters()):,} {engine.describe()}")
    (out / "config.yaml").write_text(cfg.to_yaml())

    checkpoints = CheckpointDir(out / "checkpoints", keep=cfg.train.keep_checkpoints)
    resumed_from = _maybe_resume(cfg, engine, checkpoints, log)
    tracker = start_tracking(cfg, splits, out, log)

    def report(metrics: dict[str, float], ckpt: Path | None) -> None:
        if metrics.get("mid_epoch"):
            checkpoints.commit(ckpt, int(metrics["epoch"]))
            log(f"mid-epoch checkpoint: epoch {int(metrics['epoch']) + 1}, step {int(metrics['epoch_step'])}")
            return
        tracker.log_metrics(metrics, step=int(metrics["epoch"]))
        with (out / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if ckpt is not None:
            checkpoints.commit(ckpt, int(metrics["epoch"]))
        log(_epoch_line(metrics, cfg.train.epochs))

    try:
        with _progress(cfg) as on_step:
            history = fit(engine, loaders["train"], loaders["val"], pre, report, stop_after=stop_after,
                          on_step=on_step, extra={"mlflow_run_id": tracker.run_id})
    except BaseException:
        tracker.close(status="FAILED")
        raise

    val = engine.evaluate(loaders["val"], pre.classes)
    used_ema = False
    if engine.ema is not None:
        ema_val = engine.evaluate(loaders["val"], pre.classes, use_ema=True)
        used_ema = ema_val.acc1 >= val.acc1  # keep whichever generalizes better on val
        val = ema_val if used_ema else val
    final = engine.inference_model(prefer_ema=used_ema)
    files = {"model": save_inference_model(out / "model.pt", final.state_dict(), cfg.to_dict()["model"],
                                           pre, val.metrics("val/"))}
    test = evaluate_to_files(final, loaders.get("test"), splits.test, runtime.device, pre, out, files)
    # RecordDataset skips corrupt images (counted here with data.num_workers=0; DataLoader
    # workers count in their own copies, and every skipped file is named in a warning).
    if skipped := {name: len(ld.dataset.skipped) for name, ld in loaders.items() if ld.dataset.skipped}:
        log(f"skipped corrupt images (named in the warnings above): {skipped}")
    if logged := read_history(out):
        files["curves"] = plot_learning_curves(logged, out / "learning_curves.png")
    seconds = time.perf_counter() - start
    if test is not None:
        log(test.summary())
        log(f"test top-1 {test.acc1:.2%} (n={test.n}) in {seconds:.1f}s; artifacts in {out}")
    result = RunResult(out, history, test, val, used_ema, seconds, resumed_from, files, tracker.run_id)
    if engine.epoch < cfg.train.epochs:
        tracker.close(status="KILLED")  # resumed (and finished) by the next run with this output_dir
        return result
    result.summary = finish_run(cfg, result, tracker, engine.epoch)
    return result


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


def finish_run(cfg: Config, result: RunResult, tracker: Tracker, epochs: int) -> dict:
    """After the last epoch: log the outcome to MLflow (once: a finished run that is only
    re-evaluated does not log its model again), close the run, write train_summary.json."""
    out, test = result.output_dir, result.test
    summary_file = out / SUMMARY_FILE
    earlier = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    logged_before = earlier.get("model_uri") and earlier.get("mlflow_run_id") == tracker.run_id
    info = None
    if tracker.active and (result.history or not logged_before):
        metrics = {**result.val.metrics("final_val/"), **(test.metrics("test/") if test is not None else {})}
        info = log_training_outputs(tracker, metrics=metrics, step=epochs, files=result.files,
                                    register_as=cfg.tracking.register_as,
                                    extra_metadata={"test_metrics": test.metrics("test/") if test else {}})
    summary = run_summary(run_id=tracker.run_id or earlier.get("mlflow_run_id"), epochs=epochs,
                          resumed_from=result.resumed_from, used_ema=result.used_ema, val=result.val, test=test,
                          model_file=result.files["model"], model=info)
    if info is None:  # not logged now: what an earlier invocation logged stays true
        summary.update(model_uri=earlier.get("model_uri"), registered_version=earlier.get("registered_version"))
    summary.update(seconds=result.seconds, job="train_local")
    tracker.close()
    summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def run_summary(*, run_id: str | None, epochs: int, resumed_from: int, used_ema: bool, val: EvalReport,
                test: EvalReport | None, model_file: Path, model=None) -> dict:
    """The keys of train_summary.json, the same for the local runner and jobs.train's rank 0;
    ``model`` is the ModelInfo of the run's logged MLflow model, if any."""
    return {
        "mlflow_run_id": run_id, "epochs": epochs, "resumed_from": resumed_from, "used_ema": used_ema,
        "val_acc1": val.acc1, "test_acc1": test.acc1 if test is not None else None, "model_file": str(model_file),
        "model_uri": model.model_uri if model is not None else None,
        "registered_version": getattr(model, "registered_model_version", None),
    }


def _maybe_resume(cfg: Config, engine: Engine, checkpoints: CheckpointDir, log: Log) -> int:
    latest = checkpoints.latest()
    if latest is None or not cfg.train.resume:
        if latest is not None:
            log(f"train.resume is false: ignoring checkpoints in {checkpoints.root} and starting from scratch")
        return 0
    state = load_checkpoint(latest, map_location=engine.runtime.device)
    check_same_model(state, cfg.to_dict(), str(latest))
    engine.load_state_dict(state)
    log(f"resuming from epoch {engine.epoch}"
        + (f", step {engine.epoch_step} of epoch {engine.epoch + 1}" if engine.epoch_step else "")
        + f" (checkpoint {latest})")
    return engine.epoch


def read_history(out: Path) -> list[dict[str, float]]:
    lines = (out / "history.jsonl").read_text().splitlines() if (out / "history.jsonl").exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def evaluate_to_files(model, loader, records, device, pre: Preprocessing, out: Path, files: dict) -> EvalReport | None:
    """Evaluate on a held-out split and write test_metrics.json, test_report.txt,
    confusion_matrix.png and predictions.csv into ``out`` (paths recorded in ``files``)."""
    if loader is None:
        return None
    preds = predict(model, loader, device)
    report = compute_metrics(preds.logits, preds.labels, pre.classes)
    files["test_metrics"] = out / "test_metrics.json"
    files["test_metrics"].write_text(json.dumps(report.to_dict(), indent=1))
    files["test_report"] = out / "test_report.txt"
    files["test_report"].write_text(report.summary() + "\n")
    files["confusion"] = plot_confusion_matrix(report.confusion, pre.classes, out / "confusion_matrix.png")
    files["predictions"] = out / "predictions.csv"
    write_predictions(files["predictions"], preds.logits, preds.labels, pre.classes, paths=records.paths)
    return report


def _epoch_line(m: dict[str, float], epochs: int) -> str:
    ema = f" val_ema/acc1 {m['val_ema/acc1']:.4f}" if "val_ema/acc1" in m else ""
    return (
        f"epoch {int(m['epoch'])}/{epochs}  train/loss {m['train/loss']:.4f}  train/acc1 {m['train/acc1']:.4f}  "
        f"val/loss {m['val/loss']:.4f}  val/acc1 {m['val/acc1']:.4f}{ema}  lr {m['lr']:.4g}  "
        f"{m['train/images_per_s']:.0f} img/s  {m['train/epoch_s']:.1f}s"
    )


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
