"""Evaluation: predictions, metrics from summable counts, and the report's files.

Every metric is computed from *sums* kept by :class:`MetricAccumulator` (loss
sum, correct counts, the confusion matrix, calibration-bin sums). Sums add
elementwise across batches and across ranks, so a distributed job all-reduces
``acc.state()`` and gets exactly the single-process numbers;
:func:`compute_metrics` runs the same code on one big batch.

    preds = predict(model, loader, device)
    report = compute_metrics(preds.logits, preds.labels, class_names)
    report.metrics("test/")   # {"test/acc1": 0.97, ...} for logging
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STATE_KEYS = (
    "loss_sum",
    "correct1",
    "correct5",
    "count",
    "confusion",
    "bin_count",
    "bin_confidence",
    "bin_correct",
)


@dataclass
class Predictions:
    logits: torch.Tensor  # N x C float32, cpu
    labels: torch.Tensor  # N int64, cpu


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Predictions:
    """Run ``model`` in eval mode over ``(images, labels)`` batches; logits come back on cpu."""
    device = torch.device(device)
    model.eval()
    logits, labels = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images)
        logits.append(out.float().cpu())
        labels.append(torch.as_tensor(target).long().cpu())
    if not logits:
        raise ValueError("predict: the loader yielded no batches; is the split empty?")
    return Predictions(torch.cat(logits), torch.cat(labels))


@dataclass
class EvalReport:
    """Overall and per-class metrics of one evaluation; fractions in [0, 1], not percent."""

    class_names: list[str]
    n: int
    loss: float  # mean cross-entropy, nats
    acc1: float
    acc5: float  # top-k accuracy with k = top_k = min(5, number of classes)
    top_k: int
    macro_f1: float  # mean F1 over all classes in class_names (absent classes count as 0)
    ece: float  # expected calibration error over n_bins equal-width confidence bins
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: np.ndarray  # C x C int64, rows = true class, columns = predicted class
    bin_count: list[int] = field(default_factory=list)  # per confidence bin: for reliability plots
    bin_confidence: list[float] = field(default_factory=list)  # mean confidence (0 for empty bins)
    bin_accuracy: list[float] = field(default_factory=list)  # accuracy (0 for empty bins)

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        """Flat scalars for MLflow / Ray reports: ``{prefix}acc1`` etc."""
        values = {
            "acc1": self.acc1,
            "acc5": self.acc5,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
        }
        return {f"{prefix}{k}": float(v) for k, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        """The full report as JSON-safe builtins."""
        per_class = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(
                self.class_names, self.precision, self.recall, self.f1, self.support
            )
        }
        return {
            "n": self.n,
            "loss": self.loss,
            "acc1": self.acc1,
            "acc5": self.acc5,
            "top_k": self.top_k,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "class_names": list(self.class_names),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
            "calibration": {
                "bin_count": self.bin_count,
                "bin_confidence": self.bin_confidence,
                "bin_accuracy": self.bin_accuracy,
            },
        }

    def summary(self) -> str:
        """A plain-text table: overall numbers, then one row per class."""
        width = max([len("class"), *(len(c) for c in self.class_names)])
        lines = [
            f"n={self.n}  loss={self.loss:.4f}  acc1={self.acc1:.2%}  "
            f"acc{self.top_k}={self.acc5:.2%}  macro_f1={self.macro_f1:.4f}  ece={self.ece:.4f}",
            "",
            f"{'class':<{width}}  precision  recall      f1  support",
        ]
        for name, p, r, f, s in zip(
            self.class_names, self.precision, self.recall, self.f1, self.support
        ):
            lines.append(f"{name:<{width}}  {p:9.4f}  {r:6.4f}  {f:6.4f}  {s:7d}")
        return "\n".join(lines)


class MetricAccumulator:
    """Summable evaluation counts; ``state()`` may be all-reduced (SUM) across ranks as is.

    Calibration bins are equal-width over confidence (max softmax probability):
    bin b holds confidences in (b/n_bins, (b+1)/n_bins], bin 0 also holds 0
    (Guo et al. 2017). ECE = sum_b |correct_b - confidence_sum_b| / N.
    """

    def __init__(self, num_classes: int, n_bins: int = 15):
        if num_classes < 1 or n_bins < 1:
            raise ValueError(f"num_classes and n_bins must be >= 1, got {num_classes} and {n_bins}")
        self.num_classes, self.n_bins = num_classes, n_bins
        self.top_k = min(5, num_classes)
        f64, i64 = torch.float64, torch.int64
        self._state = {
            "loss_sum": torch.zeros((), dtype=f64),
            "correct1": torch.zeros((), dtype=i64),
            "correct5": torch.zeros((), dtype=i64),
            "count": torch.zeros((), dtype=i64),
            "confusion": torch.zeros(num_classes, num_classes, dtype=i64),
            "bin_count": torch.zeros(n_bins, dtype=i64),
            "bin_confidence": torch.zeros(n_bins, dtype=f64),
            "bin_correct": torch.zeros(n_bins, dtype=i64),
        }

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: ``logits`` N x C (any float dtype/device), ``labels`` N class indices."""
        logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
        if (
            logits.ndim != 2
            or logits.shape[1] != self.num_classes
            or labels.shape != logits.shape[:1]
        ):
            raise ValueError(
                f"expected logits N x {self.num_classes} and labels N, "
                f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}"
            )
        st, c = self._state, self.num_classes
        probs = logits.softmax(dim=1)
        confidence, pred = probs.max(dim=1)
        correct = pred == labels
        st["loss_sum"] += F.cross_entropy(logits, labels, reduction="sum")
        st["correct1"] += correct.sum()
        st["correct5"] += (
            (logits.topk(self.top_k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        )
        st["count"] += labels.numel()
        st["confusion"] += torch.bincount(labels * c + pred, minlength=c * c).view(c, c)
        bins = (torch.ceil(confidence * self.n_bins).long() - 1).clamp_(0, self.n_bins - 1)
        st["bin_count"] += torch.bincount(bins, minlength=self.n_bins)
        st["bin_confidence"] += torch.bincount(bins, weights=confidence, minlength=self.n_bins)
        st["bin_correct"] += torch.bincount(bins[correct], minlength=self.n_bins)

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of the sums (float64/int64 cpu tensors), safe to all-reduce in place."""
        return {k: v.clone() for k, v in self._state.items()}

    def merge(self, other: dict[str, torch.Tensor] | MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's sums (e.g. another rank's) into this one; returns self."""
        other_state = other.state() if isinstance(other, MetricAccumulator) else other
        if set(other_state) != set(STATE_KEYS):
            raise ValueError(
                f"state must have keys {sorted(STATE_KEYS)}, got {sorted(other_state)}"
            )
        for key in STATE_KEYS:
            value = torch.as_tensor(other_state[key]).cpu()
            expected = tuple(self._state[key].shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(value.shape)}, expected {expected}"
                )
            self._state[key] += value.to(self._state[key].dtype)
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> MetricAccumulator:
        """Rebuild an accumulator from (possibly all-reduced) sums."""
        acc = cls(num_classes=state["confusion"].shape[0], n_bins=state["bin_count"].shape[0])
        return acc.merge(state)

    def report(self, class_names: Sequence[str]) -> EvalReport:
        """Metrics from the sums.

        Undefined ratios (no support, no predictions) are 0, like sklearn's ``zero_division=0``.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        st = {k: v.double() for k, v in self._state.items()}
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("no samples were evaluated; is the split empty?")
        conf = st["confusion"]
        tp, support, predicted = conf.diagonal(), conf.sum(1), conf.sum(0)
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        f1 = _safe_div(2 * precision * recall, precision + recall)
        ece = (st["bin_correct"] - st["bin_confidence"]).abs().sum().item() / n
        return EvalReport(
            class_names=list(class_names),
            n=n,
            loss=st["loss_sum"].item() / n,
            acc1=st["correct1"].item() / n,
            acc5=st["correct5"].item() / n,
            top_k=self.top_k,
            macro_f1=f1.mean().item(),
            ece=ece,
            precision=precision.tolist(),
            recall=recall.tolist(),
            f1=f1.tolist(),
            support=[int(s) for s in self._state["confusion"].sum(1)],
            confusion=self._state["confusion"].numpy().copy(),
            bin_count=self._state["bin_count"].tolist(),
            bin_confidence=_safe_div(st["bin_confidence"], st["bin_count"]).tolist(),
            bin_accuracy=_safe_div(st["bin_correct"], st["bin_count"]).tolist(),
        )


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def compute_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], n_bins: int = 15
) -> EvalReport:
    """Metrics of a whole prediction set (the same code path as the accumulated one)."""
    acc = MetricAccumulator(len(class_names), n_bins)
    acc.update(logits, labels)
    return acc.report(class_names)


# --------------------------------------------------------------------------- files


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], path: str | Path, normalize: bool = True
) -> Path:
    """Write a confusion-matrix PNG (rows = true, columns = predicted).

    ``normalize`` divides each row by its support, so the diagonal reads as
    per-class recall. Cells are annotated up to 20 classes; beyond that the
    colours carry the information and tick labels are thinned.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; a no-op when already selected
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    c = len(class_names)
    if confusion.shape != (c, c):
        raise ValueError(
            f"confusion has shape {confusion.shape}, expected {(c, c)} for {c} class names"
        )
    values = confusion.astype(np.float64)
    if normalize:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    side = min(
        max(4.0, 0.45 * c + 2.0), 16.0
    )  # inches: 0.45 in per class up to 30 classes, then 16
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(
        values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0)
    )
    fig.colorbar(
        image,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="fraction of true class" if normalize else "count",
    )
    step = max(1, math.ceil(c / 50))  # at most ~50 tick labels per axis
    ticks = np.arange(0, c, step)
    names = [str(class_names[i]) for i in ticks]
    ax.set_xticks(
        ticks,
        names,
        rotation=90 if c > 10 or max(map(len, names)) > 3 else 0,
        fontsize=8 if c > 30 else 10,
    )
    ax.set_yticks(ticks, names, fontsize=8 if c > 30 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"confusion matrix ({'row-normalized' if normalize else 'counts'}, "
        f"n={int(confusion.sum())})"
    )
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    text = f"{values[i, j]:.2f}" if normalize else str(int(confusion[i, j]))
                    color = "white" if values[i, j] > 0.5 * image.norm.vmax else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    return _save_figure(fig, path)


def plot_learning_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Loss and top-1 per epoch, train vs val (and val_ema when present), plus the LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_learning_curves: the history is empty")
    epochs = [int(m["epoch"]) for m in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes[:2], ("loss", "acc1")):
        for split in ("train", "val", "val_ema"):
            key = f"{split}/{metric}"
            if all(key in m for m in history):
                ax.plot(epochs, [m[key] for m in history], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title("top-1" if metric == "acc1" else metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [m["lr"] for m in history], marker="o", ms=3)
    axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CSV_COLUMNS = (
    "index",
    "path",
    "label",
    "label_name",
    "pred",
    "pred_name",
    "confidence",
    "correct",
    "topk",
)


def write_predictions(
    path: str | Path,
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    paths: Sequence[str | Path] | None = None,
    top_k: int = 3,
) -> Path:
    """One CSV row per sample; ``topk`` is ``"class:prob|class:prob|..."`` (highest first)."""
    probs = logits.detach().float().cpu().softmax(dim=1)
    labels = labels.detach().long().cpu()
    if paths is not None and len(paths) != len(labels):
        raise ValueError(f"got {len(paths)} paths for {len(labels)} predictions")
    top_p, top_i = probs.topk(min(top_k, probs.shape[1]), dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for i in range(len(labels)):
            label, pred = int(labels[i]), int(top_i[i, 0])
            topk = "|".join(f"{int(k)}:{float(p):.4f}" for k, p in zip(top_i[i], top_p[i]))
            writer.writerow(
                [
                    i,
                    "" if paths is None else str(paths[i]),
                    label,
                    class_names[label],
                    pred,
                    class_names[pred],
                    f"{float(top_p[i, 0]):.6f}",
                    int(label == pred),
                    topk,
                ]
            )
    return path
