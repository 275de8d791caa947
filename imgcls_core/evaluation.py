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
    labels: torch.Tensor  # N int64 (multi-label: N x C float32 multi-hot), cpu


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
        target = torch.as_tensor(target).cpu()
        labels.append(target.float() if target.ndim == 2 else target.long())
    if not logits:
        raise ValueError("predict: the loader yielded no batches; is the split empty?")
    return Predictions(torch.cat(logits), torch.cat(labels))


def without_skipped(preds: Predictions, dataset: Any) -> tuple[Predictions, list[int] | None]:
    """The predictions of the records that decoded, and their indices (None: all of them).

    A :class:`~imgcls_core.data.records.RecordDataset` gives a corrupt record's place to the next
    record that decodes, so that batches keep their planned size; an evaluation in record order
    would count that record twice and credit the corrupt file with its label."""
    mask = getattr(dataset, "skipped_mask", None)
    if mask is None or not bool(mask.any()) or len(mask) != len(preds.logits):
        return preds, None
    keep = ~mask
    return Predictions(preds.logits[keep], preds.labels[keep]), keep.nonzero().flatten().tolist()


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

    score_name = "acc1"  # what a run is judged by (config.score_name)

    @property
    def score(self) -> float:
        return self.acc1

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
        _check_finite(logits)
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
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], n_bins: int = 15,
    threshold: float | None = None,
) -> EvalReport | MultiLabelReport:
    """Metrics of a whole prediction set (the same code path as the accumulated one). Multi-hot
    ``labels`` (N x C) give a :class:`MultiLabelReport` (``threshold``: None chooses it on this set)."""
    if labels.ndim == 2:
        multi = MultiLabelAccumulator(len(class_names))
        multi.update(logits, labels)
        return multi.report(class_names, threshold)
    acc = MetricAccumulator(len(class_names), n_bins)
    acc.update(logits, labels)
    return acc.report(class_names)


def accumulator(num_classes: int, multi_label: bool) -> MetricAccumulator | MultiLabelAccumulator:
    return MultiLabelAccumulator(num_classes) if multi_label else MetricAccumulator(num_classes)


# --------------------------------------------------------------------------- multi-label


@dataclass
class MultiLabelReport:
    """Metrics of a multi-label evaluation: ranking (average precision, threshold-free) and
    decisions at ``threshold`` (a class is predicted when its sigmoid probability is >= it)."""

    class_names: list[str]
    n: int
    loss: float  # mean binary cross-entropy per class, nats
    mAP: float  # mean of per-class AP over the classes that occur in the split
    ap: list[float]  # per class; 0 for classes that do not occur
    threshold: float
    micro_f1: float
    macro_f1: float  # mean over the classes that occur
    micro_precision: float
    micro_recall: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]  # images carrying each class

    score_name = "mAP"

    @property
    def score(self) -> float:
        return self.mAP

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        values = {"mAP": self.mAP, "loss": self.loss, "micro_f1": self.micro_f1, "macro_f1": self.macro_f1,
                  "micro_precision": self.micro_precision, "micro_recall": self.micro_recall,
                  "threshold": self.threshold}
        return {f"{prefix}{k}": float(v) for k, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        per_class = {name: {"ap": a, "precision": p, "recall": r, "f1": f, "support": s} for name, a, p, r, f, s
                     in zip(self.class_names, self.ap, self.precision, self.recall, self.f1, self.support)}
        return {"n": self.n, "multi_label": True, "loss": self.loss, "mAP": self.mAP, "threshold": self.threshold,
                "micro_f1": self.micro_f1, "macro_f1": self.macro_f1, "micro_precision": self.micro_precision,
                "micro_recall": self.micro_recall, "class_names": list(self.class_names), "per_class": per_class}

    def summary(self) -> str:
        width = max([len("class"), *(len(c) for c in self.class_names)])
        lines = [f"n={self.n}  loss={self.loss:.4f}  mAP={self.mAP:.4f}  at threshold {self.threshold:.3f}: "
                 f"micro_f1={self.micro_f1:.4f}  macro_f1={self.macro_f1:.4f}", "",
                 f"{'class':<{width}}      AP  precision  recall      f1  support"]
        for name, a, p, r, f, s in zip(self.class_names, self.ap, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{name:<{width}}  {a:6.4f}  {p:9.4f}  {r:6.4f}  {f:6.4f}  {s:7d}")
        return "\n".join(lines)


def _check_finite(logits: torch.Tensor) -> None:
    """A model whose outputs are NaN or infinite has no score: scoring NaN as class 0 (argmax does)
    or as probability 0 would rank it, choose its weights and promote it."""
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteLogitsError(f"the model's logits are NaN or infinite for {int(bad.sum())} of "
                                   f"{logits.shape[0]} images; it cannot be scored (a diverged or overflowing "
                                   f"model: lower the learning rate, or evaluate without fp16)")


class NonFiniteLogitsError(ValueError):
    """Evaluation met NaN or infinite logits."""


MULTI_STATE_KEYS = ("loss_sum", "count", "positive", "negative")


class MultiLabelAccumulator:
    """Summable multi-label counts: per class, histograms of the logits of the images that carry
    the class (``positive``) and of those that do not (``negative``), in ``n_bins`` equal bins of
    the logit over [-LOGIT_RANGE, LOGIT_RANGE] (bin b holds [-R + b w, -R + (b + 1) w), w = 2R /
    n_bins; logits beyond the range go to the end bins). All-reduced (SUM) across ranks as they are.

    Average precision is computed from the histograms with every bin one threshold: it equals
    scikit-learn's ``average_precision_score`` when no two different logits of a class share a bin
    (ties in a bin count as one threshold). Bins of the logit, not of the probability, keep a
    confident model's ranking: its scores crowd near probability 1, where equal probability bins
    would merge them (a perfect ranking of logits 8 and 10 scored AP 0.10 in 1000 such bins). A bin
    is 0.005 wide: 0.00125 of probability around 0.5. Decisions at a threshold t count the logits
    >= logit(t), so thresholds are taken on bin edges (0.5 is one)."""

    LOGIT_RANGE = 15.0  # probability 3e-7 .. 1 - 3e-7

    def __init__(self, num_classes: int, n_bins: int = 6000):
        if num_classes < 1 or n_bins < 2:
            raise ValueError(f"num_classes must be >= 1 and n_bins >= 2, got {num_classes} and {n_bins}")
        self.num_classes, self.n_bins = num_classes, n_bins
        self._state = {"loss_sum": torch.zeros((), dtype=torch.float64),
                       "count": torch.zeros((), dtype=torch.int64),
                       "positive": torch.zeros(num_classes, n_bins, dtype=torch.int64),
                       "negative": torch.zeros(num_classes, n_bins, dtype=torch.int64)}

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: ``logits`` N x C, ``targets`` N x C of 0/1 (multi-hot)."""
        logits, targets = logits.detach().double().cpu(), targets.detach().double().cpu()
        c, b, r = self.num_classes, self.n_bins, self.LOGIT_RANGE
        if logits.ndim != 2 or logits.shape[1] != c or targets.shape != logits.shape:
            raise ValueError(f"expected logits and multi-hot targets both N x {c}, "
                             f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
        if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
            raise ValueError("multi-label targets must be 0 or 1")
        _check_finite(logits)
        st = self._state
        st["loss_sum"] += F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / c
        st["count"] += logits.shape[0]
        bins = ((logits.clamp(-r, r) + r) * (b / (2 * r))).floor().long().clamp_(0, b - 1)
        bins += torch.arange(c)[None, :] * b
        pos = targets.bool()
        st["positive"] += torch.bincount(bins[pos], minlength=c * b).view(c, b)
        st["negative"] += torch.bincount(bins[~pos], minlength=c * b).view(c, b)

    def edge_probability(self, edge: int) -> float:
        """The probability at bin ``edge``'s lower edge: the threshold "bins >= edge" decides at."""
        r = self.LOGIT_RANGE
        return 1.0 / (1.0 + math.exp(-(-r + edge * 2 * r / self.n_bins)))

    def edge_of(self, threshold: float) -> int:
        """The bin edge of a probability threshold (its logit's, rounded up to an edge)."""
        r, b = self.LOGIT_RANGE, self.n_bins
        z = math.log(threshold / (1.0 - threshold))
        return max(0, min(b - 1, math.ceil((z + r) * b / (2 * r) - 1e-6)))

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._state.items()}

    def merge(self, other: dict[str, torch.Tensor] | MultiLabelAccumulator) -> MultiLabelAccumulator:
        other_state = other.state() if isinstance(other, MultiLabelAccumulator) else other
        if set(other_state) != set(MULTI_STATE_KEYS):
            raise ValueError(f"state must have keys {sorted(MULTI_STATE_KEYS)}, got {sorted(other_state)}")
        for key in MULTI_STATE_KEYS:
            value = torch.as_tensor(other_state[key]).cpu()
            if tuple(value.shape) != tuple(self._state[key].shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self._state[key].shape)}")
            self._state[key] += value.to(self._state[key].dtype)
        return self

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> MultiLabelAccumulator:
        c, b = state["positive"].shape
        return cls(num_classes=c, n_bins=b).merge(state)

    def _at(self, edge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per class and candidate edge e: (true positives, false positives) of "probability >= e /
        n_bins", and the positives. ``edge`` holds bin indices; the result is C x len(edge)."""
        pos, neg = self._state["positive"].double(), self._state["negative"].double()
        # at or above bin e: reversed cumulative sums
        tp_from = pos.flip(1).cumsum(1).flip(1)
        fp_from = neg.flip(1).cumsum(1).flip(1)
        return tp_from[:, edge], fp_from[:, edge], pos.sum(1, keepdim=True)

    def report(self, class_names: Sequence[str], threshold: float | None = None) -> MultiLabelReport:
        """The metrics; ``threshold`` None chooses the bin edge in [0.05, 0.95] with the best micro F1
        on these counts (as done on the validation split), a value uses that one (e.g. on test)."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("no samples were evaluated; is the split empty?")
        b = self.n_bins
        # average precision: each bin (highest first) is one threshold
        tp, fp, positives = self._at(torch.arange(b))
        precision_curve = _safe_div(tp, tp + fp)
        recall_curve = _safe_div(tp, positives.expand_as(tp))
        step = recall_curve - torch.cat([recall_curve[:, 1:], torch.zeros(self.num_classes, 1,
                                                                            dtype=torch.float64)], 1)
        ap = (step * precision_curve).sum(1)
        present = positives[:, 0] > 0
        m_ap = ap[present].mean().item() if bool(present.any()) else 0.0
        if threshold is None:
            edges = torch.arange(self.edge_of(0.05), self.edge_of(0.95) + 1)
            tps, fps, _ = self._at(edges)
            micro = _safe_div(2 * tps.sum(0), 2 * tps.sum(0) + fps.sum(0) + (positives.sum() - tps.sum(0)))
            edge = int(edges[int(torch.argmax(micro))])  # the lowest of equal bests
            threshold = self.edge_probability(edge)
        else:
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"threshold must be in (0, 1), got {threshold}")
            edge = self.edge_of(threshold)
        tp, fp, positives = (t[:, 0] for t in self._at(torch.tensor([edge])))
        fn = positives - tp
        precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, positives)
        f1 = _safe_div(2 * precision * recall, precision + recall)
        micro_p = _safe_div(tp.sum(), tp.sum() + fp.sum()).item()
        micro_r = _safe_div(tp.sum(), tp.sum() + fn.sum()).item()
        return MultiLabelReport(
            class_names=list(class_names), n=n, loss=self._state["loss_sum"].item() / n, mAP=m_ap,
            ap=(ap * present).tolist(), threshold=float(threshold),
            micro_f1=2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r > 0 else 0.0,
            macro_f1=f1[present].mean().item() if bool(present.any()) else 0.0,
            micro_precision=micro_p, micro_recall=micro_r, precision=precision.tolist(), recall=recall.tolist(),
            f1=f1.tolist(), support=[int(s) for s in positives.tolist()])


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
    """Loss and top-1 (multi-label: val mAP) per epoch, train vs val (and val_ema when present), plus the LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_learning_curves: the history is empty")
    epochs = [int(m["epoch"]) for m in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    score = "mAP" if "val/mAP" in history[0] else "acc1"  # multi-label runs: val mAP
    for ax, metric in zip(axes[:2], ("loss", score)):
        for split in ("train", "val", "val_ema"):
            key = f"{split}/{metric}"
            if all(key in m for m in history):
                ax.plot(epochs, [m[key] for m in history], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title({"acc1": "top-1", "mAP": "mAP"}.get(metric, metric))
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


def write_multi_label_predictions(path: str | Path, logits: torch.Tensor, targets: torch.Tensor,
                                  class_names: Sequence[str], threshold: float,
                                  paths: Sequence[str | Path] | None = None) -> Path:
    """One CSV row per sample: true and predicted label sets (``a|b``), exact match, every probability."""
    probs = logits.detach().float().cpu().sigmoid()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "path", "labels", "predicted", "exact_match", *(f"p_{c}" for c in class_names)])
        for i in range(len(probs)):
            true = [class_names[c] for c in torch.nonzero(targets[i] > 0.5).flatten().tolist()]
            pred = [class_names[c] for c in torch.nonzero(probs[i] >= threshold).flatten().tolist()]
            writer.writerow([i, "" if paths is None else str(paths[i]), "|".join(true), "|".join(pred),
                             int(true == pred), *(f"{float(p):.4f}" for p in probs[i])])
    return path


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
