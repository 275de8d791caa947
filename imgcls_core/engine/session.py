"""One training run's lifecycle, owned in one place.

A :class:`TrainingSession` takes a built engine and the run's data and does
everything a run is made of: resuming from a checkpoint, the epochs (through
:func:`imgcls_core.engine.fit.fit`), the epoch line, ``history.jsonl``, MLflow
metrics, checkpoint commits, the EMA-or-raw choice, the final model
(``model.pt``), the test evaluation and its artifacts, the MLflow model and
``train_summary.json``. Whatever is added to a run is added here once.

Where it runs is the host's business (:class:`RunHost`). The local runner
(imgcls_core.runner) commits checkpoints into ``<output_dir>/checkpoints``; a
Ray Train worker (jobs.train_worker) hands them to ``ray.train.report``. Only
rank 0 writes files and logs to MLflow; every rank trains and evaluates (the
metrics are all-reduced).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import DataLoader, Subset

from imgcls_core.config import Config
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.data.records import SplitRecords
from imgcls_core.engine.checkpoint import (check_same_model, check_same_schedule, file_sha256, save_inference_model,
                                           write_text_durably)
from imgcls_core.engine.fit import StepCallback, WriteCheckpoint, fit
from imgcls_core.engine.loop import Batch, Engine
from imgcls_core.evaluation import (
    EvalReport, MultiLabelReport, compute_metrics, plot_confusion_matrix, plot_learning_curves, predict,
    without_skipped, write_multi_label_predictions, write_predictions,
)
from imgcls_core.tensorboard_log import TensorBoardLog
from imgcls_core.tracking import SUMMARY_FILE, RegistrationError, Tracker, log_training_outputs

HISTORY_FILE = "history.jsonl"


class RunHost(Protocol):
    """What a session needs from where it runs."""

    rank: int

    def save(self, metrics: dict[str, float], write: WriteCheckpoint | None) -> None:
        """Report an epoch's (or a mid-epoch point's) metrics, with a checkpoint when ``write`` is
        given: ``write(folder)`` writes it into a folder the host then commits."""

    def log(self, message: str) -> None:
        """A line for the user (rank 0's is shown; others may drop it)."""


@dataclass
class RunData:
    """The batches a session trains and evaluates on.

    ``train``/``val`` are re-iterable or factories (``train(epoch)``, ``val()``), as ``fit`` takes
    them. ``test`` builds the test split's loader on demand (rank 0 only, after training); ``None``
    when the data set has no test split. ``datasets`` are the Dataset objects whose ``skipped_count``
    counts the corrupt images passed over (Ray Data's decode tasks drop and print their own)."""

    train: Callable[[int], Iterable[Batch]] | Iterable[Batch]
    val: Callable[[], Iterable[Batch]] | Iterable[Batch]
    test: Callable[[], DataLoader] | None = None
    test_records: SplitRecords | None = None
    datasets: list[Any] = field(default_factory=list)

    def val_batches(self) -> Iterable[Batch]:
        return self.val() if callable(self.val) else self.val

    def skipped_images(self) -> int:
        """Corrupt records passed over, counted across this process and its DataLoader workers."""
        return sum(int(getattr(ds, "skipped_count", 0)) for ds in self.datasets)


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict[str, float]]
    test: EvalReport | MultiLabelReport | None
    val: EvalReport | MultiLabelReport | None
    used_ema: bool
    seconds: float
    resumed_from: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    summary: dict = field(default_factory=dict)  # train_summary.json (empty until every epoch ran)
    final_weights: FinalWeights | None = None


@dataclass
class FinalWeights:
    """The weights a run ships (train.final_weights) and why."""

    requested: str  # auto, best, last or ema
    chosen: str  # best, last or ema
    source: str  # last or ema: the raw or the averaged weights (a best epoch's are one of the two)
    epoch: int  # the epoch they are from
    val_score: dict[str, float]  # the val score (metric) of every candidate
    metric: str = "acc1"  # acc1 (top-1), or mAP for multi-label runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        figures = ", ".join(f"{name} {score:.4f}" for name, score in self.val_score.items())
        what = f"epoch {self.epoch}'s {'EMA' if self.source == 'ema' else 'raw'} weights"
        return (f"final weights: {self.chosen} ({what}; train.final_weights={self.requested}; "
                f"val {'top-1' if self.metric == 'acc1' else self.metric} {figures})")


class TrainingSession:
    """A run from its first (or resumed) epoch to its summary; see the module docstring."""

    def __init__(self, cfg: Config, pre: Preprocessing, engine: Engine, data: RunData, host: RunHost, *,
                 job: str, register_as: str | None = None):
        self.cfg, self.pre, self.engine, self.data, self.host = cfg, pre, engine, data, host
        self.job, self.register_as = job, register_as
        self.out = Path(cfg.train.output_dir)
        self.resumed_from = 0
        self.checkpoint_run_id: str | None = None  # the MLflow run a resumed checkpoint belongs to
        self.tensorboard = TensorBoardLog(self.out, enabled=self.is_writer and cfg.tracking.tensorboard)
        params = sum(p.numel() for p in engine.model.parameters())
        self.log(f"model={cfg.model.name} params={params:,} {engine.describe()}")

    @property
    def is_writer(self) -> bool:
        return self.host.rank == 0

    def log(self, message: str) -> None:
        self.host.log(message)

    # ------------------------------------------------------------------ starting point

    def resume(self, state: dict[str, Any] | None, where: str | Path | None) -> int:
        """Continue from a checkpoint of this run (``None``: start at epoch 0); the epoch reached."""
        if state is None:
            return 0
        check_same_model(state, self.cfg.to_dict(), str(where))
        check_same_schedule(state, self.cfg.to_dict(), str(where))
        self.engine.load_state_dict(state)
        self.checkpoint_run_id = state.get("extra", {}).get("mlflow_run_id")
        self.resumed_from = self.engine.epoch
        e = self.engine
        self.log(f"resuming from epoch {e.epoch}" + (f", step {e.epoch_step} of epoch {e.epoch + 1}" if e.epoch_step
                                                      else "") + f" (checkpoint {where})")
        return e.epoch

    def adopt(self, state: dict[str, Any], where: str | Path) -> None:
        """Start from another run's checkpoint (e.g. PBT's exploit): its weights and epoch, this
        run's hyperparameters and MLflow run."""
        check_same_model(state, self.cfg.to_dict(), str(where))
        self.engine.adopt_state(state)
        self.log(f"starting from epoch {self.engine.epoch} of {where} with lr={self.cfg.optim.lr:.4g} "
                 f"augment.strength={self.cfg.augment.strength:.3g}")

    def _trim_history(self, epoch: int) -> None:
        """Drop history lines past the resumed epoch: a crash after an epoch's line was written but
        before its checkpoint was committed re-runs that epoch, and it must be listed once."""
        path = self.out / HISTORY_FILE
        text = path.read_text() if path.exists() else ""
        rows = parse_history(text, path)
        kept = [row for row in rows if int(row.get("epoch", 0)) <= epoch]
        if len(kept) != len(rows) or (text and not text.endswith("\n")):
            write_text_durably(path, "".join(json.dumps(row) + "\n" for row in kept))

    # ------------------------------------------------------------------ the run

    def run(self, tracker: Tracker, *, stop_after: int | None = None,
            on_step: StepCallback | None = None) -> RunResult:
        """Train the remaining epochs, then (once every epoch ran) package and evaluate the model.

        ``tracker`` is this run's MLflow run on rank 0 (inactive elsewhere or with tracking off); the
        session ends it: KILLED when ``stop_after`` stopped the run early (the next run with this
        output_dir resumes it), FINISHED after packaging."""
        start = time.perf_counter()
        cfg, engine = self.cfg, self.engine
        if self.is_writer:
            # From the epoch it starts at (0, resumed or adopted): history lines past it are of an
            # attempt that crashed before its next checkpoint, and that epoch is trained again.
            self._trim_history(engine.epoch)
            self.tensorboard.purge_step = engine.epoch + 1  # steps are 1-based epochs, as history's
            # What jobs.promote --summary and jobs.register read as the config the run trained with;
            # written once a resume was accepted (a refused one leaves the run's own).
            write_text_durably(self.out / "config.yaml", cfg.to_yaml())
        if engine.epoch >= cfg.train.epochs:
            self.log(f"run already finished all {cfg.train.epochs} epochs; evaluating its model again")
        try:
            history = fit(engine, self._show_samples(self.data.train), self.data.val, self.pre,
                          self._reporter(tracker), stop_after=stop_after,
                          on_step=on_step, extra={"mlflow_run_id": tracker.run_id or self.checkpoint_run_id})
            if engine.epoch < cfg.train.epochs:
                self.log(f"stopped after epoch {engine.epoch} of {cfg.train.epochs}; run again with the same "
                         f"train.output_dir (and ray.name) to resume")
                tracker.close(status="KILLED")
                return RunResult(self.out, history, None, None, False, time.perf_counter() - start,
                                 self.resumed_from, mlflow_run_id=tracker.run_id)
            return self._finish(tracker, history, start)
        finally:
            self.tensorboard.close()  # its file and thread, whatever ended the run

    def _show_samples(self, train):
        """``train`` as fit takes it, the first batch it yields in this session also written to
        TensorBoard (augmented, before MixUp or CutMix); ``train`` itself when TensorBoard is off."""
        if not self.tensorboard.enabled:
            return train
        pending = True

        def batches(epoch: int):
            nonlocal pending
            for batch in train(epoch) if callable(train) else train:
                if pending:
                    pending = False
                    self.tensorboard.samples(batch[0], self.pre.mean, self.pre.std, step=epoch + 1)
                yield batch

        return batches

    def _reporter(self, tracker: Tracker):
        epochs = self.cfg.train.epochs

        def report(metrics: dict[str, float], write: WriteCheckpoint | None) -> None:
            if metrics.get("mid_epoch"):
                self.host.save(metrics, write)
                self.log(f"mid-epoch checkpoint: epoch {int(metrics['epoch']) + 1}, step {int(metrics['epoch_step'])}")
                return
            if self.is_writer:
                tracker.log_metrics(metrics, step=int(metrics["epoch"]))
                self.tensorboard.scalars(metrics, step=int(metrics["epoch"]))
                with (self.out / HISTORY_FILE).open("a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            self.host.save(metrics, write)
            self.log(epoch_line(metrics, epochs))

        return report

    def _finish(self, tracker: Tracker, history: list[dict[str, float]], start: float) -> RunResult:
        """Every rank: the final validation and the choice of weights to ship (train.final_weights).
        Rank 0: model.pt, test evaluation and artifacts, the MLflow model, train_summary.json."""
        engine = self.engine
        choice, val = self._final_weights()
        self.log(choice.describe())
        result = RunResult(self.out, history, None, val, choice.source == "ema", 0.0, self.resumed_from,
                           mlflow_run_id=tracker.run_id, final_weights=choice)
        if not self.is_writer:
            tracker.close()
            result.seconds = time.perf_counter() - start
            return result

        final = engine.inference_model(choice.chosen)
        pre = self.pre
        if isinstance(val, MultiLabelReport):  # the decision threshold, chosen on val, ships with the model
            pre.threshold = val.threshold
            self.log(f"multi-label threshold {val.threshold:.3f} (best micro F1 on val: {val.micro_f1:.4f})")
        files = result.files
        files["model"] = save_inference_model(self.out / "model.pt", final.state_dict(), self.cfg.to_dict()["model"],
                                              pre, val.metrics("val/"), weights=choice.to_dict())
        if self.data.test is not None:
            result.test = evaluate_to_files(final, self.data.test(), self.data.test_records, engine.runtime.device,
                                            pre, self.out, files)
            self.log(result.test.summary())
        # Corrupt images are skipped, named in a SkippedImageWarning each, and counted here
        # (DataLoader workers included; Ray Data's decode tasks print theirs in the task logs).
        skipped = self.data.skipped_images()
        if skipped:
            self.log(f"skipped {skipped} corrupt image(s) (named in the warnings above)")
        if rows := read_history(self.out):
            files["curves"] = plot_learning_curves(rows, self.out / "learning_curves.png")
        if self.tensorboard.enabled:
            if "confusion" in files:
                self.tensorboard.png("test/confusion_matrix", files["confusion"], step=engine.epoch)
            self.tensorboard.close()
            files["tensorboard"] = self.tensorboard.dir
        result.seconds = time.perf_counter() - start
        result.summary = self._summarize(tracker, result, skipped)
        test = result.test
        what = "top-1" if val.score_name == "acc1" else val.score_name
        self.log(f"done: val {what} {val.score:.4f}" + (f", test {what} {test.score:.4f} (n={test.n})" if test else "")
                 + f" in {result.seconds:.1f}s; model {files['model']}"
                 + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))
        return result

    def _final_weights(self) -> tuple[FinalWeights, EvalReport | MultiLabelReport]:
        """Which weights the run ships, and their validation report (every rank: a collective).

        ``last`` and ``ema`` are measured now; ``best`` is the best epoch's (its val score from that
        epoch: top-1, or mAP for multi-label). ``auto`` takes the highest val score of the three; a tie
        prefers ema, then last: the best epoch was picked on this same val split, so its figure flatters it."""
        engine, classes, requested = self.engine, self.pre.classes, self.cfg.train.final_weights
        val = {"last": engine.evaluate(self.data.val_batches(), classes)}
        if engine.ema is not None:
            val["ema"] = engine.evaluate(self.data.val_batches(), classes, use_ema=True)
        measured = {name: report.score for name, report in val.items()}
        best = engine.best
        if best is not None:
            measured["best"] = best["acc1"]
        if requested == "auto":
            order = [w for w in ("ema", "last", "best") if w in measured]
            chosen = max(order, key=lambda w: (measured[w], -order.index(w)))
        elif requested in measured:
            chosen = requested
        else:  # best from a checkpoint written before the best epoch was kept
            chosen = "ema" if "ema" in measured else "last"
            self.log(f"train.final_weights: no {requested} weights were kept; shipping the {chosen} ones")
        if chosen == "best":  # its report: the epoch's figure alone is not one
            val["best"] = engine.evaluate(self.data.val_batches(), classes, model=engine.inference_model("best"))
        source = best["source"] if chosen == "best" else chosen
        choice = FinalWeights(requested, chosen, source, engine.epoch if chosen != "best" else best["epoch"],
                              {name: round(score, 6) for name, score in measured.items()}, engine.score)
        return choice, val[chosen]

    def _summarize(self, tracker: Tracker, result: RunResult, skipped: int) -> dict:
        """Log the outcome to MLflow (once: a finished run that is only evaluated again does not log
        its model again, unless it now ships other weights), end the MLflow run and write train_summary.json."""
        summary_file = self.out / SUMMARY_FILE
        earlier = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        logged_before = earlier.get("model_uri") and earlier.get("mlflow_run_id") == tracker.run_id
        if logged_before and result.final_weights is not None:  # evaluated again, shipping other weights:
            shipped = {k: (earlier.get("final_weights") or {}).get(k) for k in ("chosen", "source", "epoch")}
            logged_before = shipped == {k: getattr(result.final_weights, k) for k in shipped}  # log those too
        test = result.test
        info, failure = None, None
        if (tracker.active and (result.history or not logged_before)) or (self.register_as and not tracker.active):
            metrics = {**result.val.metrics("final_val/"), **(test.metrics("test/") if test is not None else {}),
                       "data/skipped_images": float(skipped)}
            try:
                weights = result.final_weights.to_dict() if result.final_weights else {}
                info = log_training_outputs(tracker, metrics=metrics, step=self.engine.epoch, files=result.files,
                                            register_as=self.register_as,
                                            extra_metadata={"test_metrics": test.metrics("test/") if test else {},
                                                            "final_weights": weights})
            except RegistrationError as exc:
                failure = exc  # the summary is still written (registered_version: null), then the run fails
        summary = {
            "job": self.job, "mlflow_run_id": tracker.run_id or earlier.get("mlflow_run_id"),
            "epochs": self.engine.epoch, "resumed_from": result.resumed_from, "used_ema": result.used_ema,
            "final_weights": result.final_weights.to_dict() if result.final_weights else None,
            "metric": result.val.score_name, f"val_{result.val.score_name}": result.val.score,
            f"test_{result.val.score_name}": test.score if test is not None else None,
            "skipped_images": skipped, "model_file": str(result.files["model"]),
            "model_uri": info.model_uri if info is not None else earlier.get("model_uri"),
            # the logged model's bytes: jobs.register trusts model_uri for model_file only when they match
            "model_sha256": (file_sha256(result.files["model"]) if info is not None
                             else earlier.get("model_sha256")),
            "registered_version": (getattr(info, "registered_model_version", None) if info is not None
                                   else earlier.get("registered_version")),
            "seconds": result.seconds,
        }
        if failure is not None:
            summary["registration_error"] = str(failure)
        tracker.close()
        tmp = summary_file.with_name(summary_file.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(summary_file)
        if failure is not None:
            raise failure
        return summary


def read_history(out: Path) -> list[dict[str, float]]:
    """The per-epoch metrics a run wrote to ``<output_dir>/history.jsonl``. A last line cut short
    (a full disk or a kill while appending it) is left out: that epoch's checkpoint was not
    committed either, so the run re-trains it."""
    path = Path(out) / HISTORY_FILE
    return parse_history(path.read_text() if path.exists() else "", path)


def parse_history(text: str, path: Path) -> list[dict[str, float]]:
    """The rows of a history.jsonl's ``text`` (see :func:`read_history`); ``path`` names it in errors."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}, line {number}: not a JSON line ({exc}); the file is damaged") from None
    return rows


def evaluate_to_files(model, loader, records, device, pre: Preprocessing, out: Path,
                      files: dict) -> EvalReport | MultiLabelReport:
    """Evaluate on a held-out split and write test_metrics.json, test_report.txt,
    confusion_matrix.png (single-label) and predictions.csv into ``out`` (paths recorded in
    ``files``), and with the split's records the views inside the model (imgcls_core.explain:
    filters, feature maps, Grad-CAM galleries of misclassified and correct images). Multi-label
    decisions use the threshold in ``pre``."""
    dataset = getattr(loader, "dataset", None)
    preds, kept = without_skipped(predict(model, loader, device), dataset)
    paths = records.paths if records is not None else None
    if kept is not None:  # corrupt test images: not scored, not listed (the run counts them as skipped)
        paths = [paths[i] for i in kept] if paths is not None else None
        dataset = Subset(dataset, kept)
    files["test_metrics"] = out / "test_metrics.json"
    files["test_report"] = out / "test_report.txt"
    files["predictions"] = out / "predictions.csv"
    if pre.multi_label:
        report = compute_metrics(preds.logits, preds.labels, pre.classes, threshold=pre.threshold)
        write_multi_label_predictions(files["predictions"], preds.logits, preds.labels, pre.classes, pre.threshold,
                                      paths=paths)
    else:
        report = compute_metrics(preds.logits, preds.labels, pre.classes)
        files["confusion"] = plot_confusion_matrix(report.confusion, pre.classes, out / "confusion_matrix.png")
        write_predictions(files["predictions"], preds.logits, preds.labels, pre.classes, paths=paths)
    files["test_metrics"].write_text(json.dumps(report.to_dict(), indent=1))
    files["test_report"].write_text(report.summary() + "\n")
    if records is not None and hasattr(model, "stage_names"):
        from imgcls_core.explain import write_model_views

        # the loader's dataset: the records in order, through the eval transform the model was tested with
        files.update(write_model_views(model, dataset, preds.logits, preds.labels, pre.classes,
                                       pre.mean, pre.std, out, device))
    return report


def epoch_line(m: dict[str, float], epochs: int) -> str:
    """The line printed after each epoch (multi-label runs: label accuracy and mAP for top-1)."""
    train, score = ("train/label_acc", "mAP") if "val/mAP" in m else ("train/acc1", "acc1")
    ema = f"  val_ema/{score} {m[f'val_ema/{score}']:.4f}" if f"val_ema/{score}" in m else ""
    return (
        f"epoch {int(m['epoch'])}/{epochs}  train/loss {m['train/loss']:.4f}  {train} {m[train]:.4f}  "
        f"val/loss {m['val/loss']:.4f}  val/{score} {m[f'val/{score}']:.4f}{ema}  lr {m['lr']:.4g}  "
        f"{m['train/images_per_s']:.0f} img/s  {m['train/epoch_s']:.1f}s"
    )
