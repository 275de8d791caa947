"""The epoch driver shared by the local runner and the Ray Train worker.

``fit`` trains, validates and decides when a checkpoint is due; what happens to
each epoch's metrics and checkpoint is the caller's ``report(metrics, write)``.
``write(directory)`` writes the checkpoint into a folder of the caller's
choosing (rank 0 only; ``None`` when no checkpoint is due or on other ranks):
the run session (imgcls_core.engine.session) stages it beside its final place
locally, or in a folder a Ray job hands to ``ray.train.report``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import save_checkpoint
from imgcls_core.engine.loop import Batch, Engine

WriteCheckpoint = Callable[[Path], None]
Report = Callable[[dict[str, float], WriteCheckpoint | None], None]
StepCallback = Callable[[dict[str, float]], None]


def fit(
    engine: Engine,
    train_batches: Callable[[int], Iterable[Batch]] | Iterable[Batch],
    val_batches: Callable[[], Iterable[Batch]] | Iterable[Batch],
    preprocessing: Preprocessing,
    report: Report,
    *,
    stop_after: int | None = None,
    on_step: StepCallback | None = None,
    extra: dict | None = None,
) -> list[dict[str, float]]:
    """Run the remaining epochs (from ``engine.epoch`` to ``train.epochs``).

    ``train_batches``/``val_batches`` are re-iterable (a DataLoader) or
    factories called per epoch (``train_batches(epoch)``), for ingest that is
    built per epoch such as Ray Data shards. ``stop_after`` ends this call after
    that many epochs (a time-boxed run that resumes later). Only rank 0 writes
    checkpoints; the other ranks report ``(metrics, None)``. With
    ``train.checkpoint_every_minutes`` a checkpoint is also written mid-epoch
    (checked every ``train.log_every`` steps); its metrics carry ``mid_epoch: 1``
    and the last validation figures, and ``report`` is called with them too. ``extra`` is stored
    in every checkpoint as is (e.g. the MLflow run id, so a resumed job
    continues the same run).
    """
    cfg = engine.cfg
    history: list[dict[str, float]] = []
    end = cfg.train.epochs if stop_after is None else min(cfg.train.epochs, engine.epoch + stop_after)
    minutes = cfg.train.checkpoint_every_minutes
    last = {"save": time.monotonic(), "val": {}}

    def checkpoint(metrics: dict[str, float]) -> None:
        last["save"] = time.monotonic()
        if engine.rank != 0:
            report(metrics, None)
            return

        # A multi-label checkpoint decides at the threshold its val chose (model.pt gets the shipped
        # weights' at the end); its first epoch's, before any val, at the default.
        pre = (dataclasses.replace(preprocessing, threshold=metrics["val/threshold"])
               if preprocessing.multi_label and "val/threshold" in metrics else preprocessing)

        def write(directory: Path) -> None:
            save_checkpoint(directory, engine.state_dict(), cfg.to_dict(), pre, metrics, extra)

        report(metrics, write)

    def step_hook(step_metrics: dict[str, float]) -> None:
        if on_step is not None:
            on_step(step_metrics)
        # Every rank must agree: a checkpoint is reported by all ranks together.
        if minutes > 0 and engine.any_rank(time.monotonic() - last["save"] >= minutes * 60):
            # A mid-epoch checkpoint: resuming from it skips the epoch's first epoch_step batches,
            # starts from the epoch's sums so far and reseeds as this run does right after it.
            engine.mid_epoch_progress()
            checkpoint({f"val/{engine.score}": 0.0, **last["val"], "epoch": engine.epoch, "step": engine.step,
                        "epoch_step": engine.epoch_step, "mid_epoch": 1.0})
            engine.reseed_mid_epoch()

    while engine.epoch < end:
        epoch = engine.epoch
        train = train_batches(epoch) if callable(train_batches) else train_batches
        metrics = engine.train_epoch(train, step_hook)
        val = engine.evaluate(val_batches() if callable(val_batches) else val_batches, preprocessing.classes)
        metrics.update(val.metrics("val/"))
        if engine.ema is not None:
            ema_val = engine.evaluate(val_batches() if callable(val_batches) else val_batches,
                                      preprocessing.classes, use_ema=True)
            metrics.update(ema_val.metrics("val_ema/"))
        engine.end_epoch(metrics)
        metrics["epoch"] = engine.epoch
        metrics["step"] = engine.step
        last["val"] = {k: v for k, v in metrics.items() if k.startswith("val")}
        history.append(metrics)
        due = (
            engine.epoch % cfg.train.checkpoint_every_epochs == 0
            or engine.epoch in (end, cfg.train.epochs)
            or (minutes > 0 and engine.any_rank(time.monotonic() - last["save"] >= minutes * 60))
        )
        if due:
            checkpoint(metrics)
        else:
            report(metrics, None)
    return history
