"""Evaluation metrics against hand-computed values and sklearn; report files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from imgcls_core.evaluation import (
    CSV_COLUMNS,
    MetricAccumulator,
    compute_metrics,
    plot_confusion_matrix,
    predict,
    write_predictions,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probabilities`` (rows sum to 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


@pytest.fixture
def toy():
    """6 samples, 3 classes: true [0,0,1,1,2,2], predicted [0,1,1,1,2,0]."""
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.0],
            [0.5, 2.0, 0.0],
            [0.0, 4.0, 1.0],
            [1.0, 2.0, 0.0],
            [0.0, 0.0, 2.0],
            [2.0, 0.0, 1.0],
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return logits, labels, ["zero", "one", "two"]


def test_confusion_accuracy_and_loss_match_hand_computation(toy):
    logits, labels, names = toy
    report = compute_metrics(logits, labels, names)
    assert report.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report.confusion.dtype == np.int64
    assert report.n == 6
    assert report.acc1 == pytest.approx(4 / 6)
    assert report.acc5 == 1.0
    assert report.top_k == 3
    expected_loss = sum(-torch.log_softmax(row, 0)[y].item() for row, y in zip(logits, labels)) / 6
    assert report.loss == pytest.approx(expected_loss, rel=1e-6)


def test_precision_recall_f1_match_hand_values_and_sklearn(toy):
    logits, labels, names = toy
    report = compute_metrics(logits, labels, names)
    assert report.precision == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert report.recall == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert report.f1 == pytest.approx([1 / 2, 0.8, 2 / 3])
    assert report.support == [2, 2, 2]
    p, r, f, s = precision_recall_fscore_support(
        labels, logits.argmax(1), labels=[0, 1, 2], zero_division=0
    )
    assert report.precision == pytest.approx(p.tolist())
    assert report.recall == pytest.approx(r.tolist())
    assert report.f1 == pytest.approx(f.tolist())
    assert report.macro_f1 == pytest.approx(f.mean())


def test_class_never_predicted_or_present_scores_zero_like_sklearn():
    labels = torch.tensor([0, 0, 1, 1])
    logits = (
        F.one_hot(torch.tensor([0, 1, 1, 1]), 4).float() * 5
    )  # classes 2, 3: no support, no predictions
    report = compute_metrics(logits, labels, ["a", "b", "c", "d"])
    p, r, f, _ = precision_recall_fscore_support(
        labels, [0, 1, 1, 1], labels=[0, 1, 2, 3], zero_division=0
    )
    assert report.precision == pytest.approx(p.tolist())
    assert report.recall == pytest.approx(r.tolist())
    assert report.macro_f1 == pytest.approx(f.mean())


def test_top5_counts_labels_ranked_up_to_fifth():
    # 7 classes; each row ranks classes 0 > 1 > ... > 6.
    logits = torch.arange(7, 0, -1, dtype=torch.float32).repeat(4, 1)
    labels = torch.tensor([0, 2, 4, 5])  # ranks 1, 3, 5, 6
    report = compute_metrics(logits, labels, [str(i) for i in range(7)])
    assert report.top_k == 5
    assert report.acc1 == pytest.approx(1 / 4)
    assert report.acc5 == pytest.approx(3 / 4)


def test_ece_is_zero_for_a_perfectly_calibrated_toy():
    # Four predictions at confidence 0.75, three right: accuracy equals confidence in the bin.
    logits = logits_for([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert compute_metrics(logits, labels, ["a", "b"]).ece == pytest.approx(0.0, abs=1e-6)


def test_ece_matches_hand_computation_with_shared_and_separate_bins():
    # 15 bins of width 1/15. Confidence 0.9 (right) and 0.92 (wrong) share bin 13;
    # 0.7 (wrong) is in bin 10.
    logits = logits_for([[0.9, 0.1], [0.92, 0.08], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0])
    report = compute_metrics(logits, labels, ["a", "b"])
    # bin 13: |1 correct - (0.9 + 0.92)| ; bin 10: |0 - 0.7|; divided by N = 3.
    assert report.ece == pytest.approx((abs(1 - 1.82) + 0.7) / 3, abs=1e-6)
    assert report.bin_count[13] == 2
    assert report.bin_count[10] == 1
    assert sum(report.bin_count) == 3
    assert report.bin_accuracy[13] == pytest.approx(0.5)
    assert report.bin_confidence[13] == pytest.approx(0.91)


def test_merging_two_halves_equals_the_whole():
    torch.manual_seed(0)
    logits, labels = torch.randn(200, 10) * 3, torch.randint(0, 10, (200,))
    names = [f"c{i}" for i in range(10)]
    first, second = MetricAccumulator(10), MetricAccumulator(10)
    first.update(logits[:70], labels[:70])
    second.update(logits[70:], labels[70:])
    summed = {
        k: first.state()[k] + second.state()[k] for k in first.state()
    }  # what all_reduce(SUM) does
    whole = compute_metrics(logits, labels, names).to_dict()
    for merged in (MetricAccumulator.from_state(summed), first.merge(second.state())):
        got = merged.report(names).to_dict()
        assert got["confusion"] == whole["confusion"]
        for key in ("n", "acc1", "acc5", "loss", "macro_f1", "ece"):
            assert got[key] == pytest.approx(whole[key], rel=1e-12), key


def test_accumulator_rejects_mismatched_shapes():
    acc = MetricAccumulator(3)
    with pytest.raises(ValueError, match="logits"):
        acc.update(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="confusion"):
        acc.merge(MetricAccumulator(4).state())
    with pytest.raises(ValueError, match="no samples"):
        acc.report(["a", "b", "c"])


def test_report_views_are_flat_json_safe_and_readable(toy):
    logits, labels, names = toy
    report = compute_metrics(logits, labels, names)
    assert report.metrics("val/") == pytest.approx(
        {
            "val/acc1": 4 / 6,
            "val/acc5": 1.0,
            "val/loss": report.loss,
            "val/macro_f1": report.macro_f1,
            "val/ece": report.ece,
        }
    )
    full = json.loads(json.dumps(report.to_dict()))
    assert full["per_class"]["one"]["recall"] == pytest.approx(1.0)
    text = report.summary()
    assert all(name in text for name in names)
    assert "66.67%" in text


def test_predict_returns_cpu_logits_and_labels_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(12, 5))
    torch.manual_seed(0)
    batches = [
        (torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])),
        (torch.randn(2, 3, 2, 2), torch.tensor([4, 0])),
    ]
    preds = predict(model, batches, "cpu")
    assert not model.training
    assert preds.logits.shape == (6, 5)
    assert preds.logits.dtype == torch.float32
    assert preds.labels.tolist() == [0, 1, 2, 3, 4, 0]
    assert preds.labels.dtype == torch.int64
    # Dropout off: predictions are reproducible.
    assert torch.equal(preds.logits, predict(model, batches, "cpu").logits)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_confusion_png_is_written(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    confusion = (
        rng.integers(0, 20, (num_classes, num_classes)) + np.eye(num_classes, dtype=np.int64) * 100
    )
    path = plot_confusion_matrix(
        confusion, [f"class_{i}" for i in range(num_classes)], tmp_path / "sub" / "cm.png"
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] >= 400


def test_predictions_csv_has_one_row_per_sample(tmp_path, toy):
    logits, labels, names = toy
    path = write_predictions(
        tmp_path / "preds.csv", logits, labels, names, paths=[f"img{i}.png" for i in range(6)]
    )
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 6
    first = rows[0]
    assert first["path"] == "img0.png"
    assert first["label_name"] == "zero"
    assert first["pred_name"] == "zero"
    assert [int(r["correct"]) for r in rows] == [1, 0, 1, 1, 1, 0]
    top = [item.split(":") for item in first["topk"].split("|")]
    assert [int(k) for k, _ in top] == [0, 1, 2]
    probs = torch.softmax(logits[0], 0)
    assert float(top[0][1]) == pytest.approx(probs[0].item(), abs=1e-4)
    assert float(first["confidence"]) == pytest.approx(probs[0].item(), abs=1e-6)
    assert math.isclose(sum(float(p) for _, p in top), 1.0, abs_tol=1e-3)


def test_learning_curves_png_and_empty_history(tmp_path):
    import pytest

    from imgcls_core.evaluation import plot_learning_curves

    history = [{"epoch": e, "train/loss": 1 / e, "val/loss": 1.1 / e, "train/acc1": 1 - 0.5 / e,
                "val/acc1": 1 - 0.6 / e, "lr": 0.1 / e} for e in (1, 2, 3)]
    path = plot_learning_curves(history, tmp_path / "curves" / "lc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="history is empty"):
        plot_learning_curves([], tmp_path / "x.png")
