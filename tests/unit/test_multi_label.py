"""Multi-label classification in the core: label-set data formats, metrics against scikit-learn,
config checks, a local run on real composed digits, its model file, exports and serving answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls_core.config import ConfigError, DataConfig, load_config
from imgcls_core.data import load_dataset
from imgcls_core.evaluation import MultiLabelAccumulator, compute_metrics


# --------------------------------------------------------------------------- metrics


def scored(seed: int = 0, n: int = 600, c: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.3).float()
    return torch.randn(n, c, generator=g) + 2.0 * targets, targets


def test_map_and_f1_agree_with_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    logits, targets = scored()
    report = compute_metrics(logits, targets, list("abcdef"))
    probs, y = logits.sigmoid().numpy(), targets.numpy()
    per_class = [average_precision_score(y[:, i], probs[:, i]) for i in range(6)]
    assert report.ap == pytest.approx(per_class, abs=2e-3)  # 1000 probability bins
    assert report.mAP == pytest.approx(np.mean(per_class), abs=2e-3)
    pred = probs >= report.threshold
    assert report.micro_f1 == pytest.approx(f1_score(y, pred, average="micro"), abs=1e-9)
    assert report.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-9)
    assert report.micro_precision == pytest.approx(precision_score(y, pred, average="micro"), abs=1e-9)
    assert report.micro_recall == pytest.approx(recall_score(y, pred, average="micro"), abs=1e-9)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), targets.double()).item()
    assert report.loss == pytest.approx(loss, rel=1e-9)


def test_a_confident_models_ranking_is_kept_in_its_average_precision():
    """Scores crowd near probability 1: 20 positives at logit 10 and 180 negatives at 8 rank perfectly
    (equal-width probability bins merged them: AP 0.10)."""
    from sklearn.metrics import average_precision_score

    targets = torch.zeros(200, 1)
    targets[:20] = 1
    logits = torch.where(targets.bool(), 10.0, 8.0)
    assert compute_metrics(logits, targets, ["a"]).mAP == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)  # a trained-like model: positives N(6, 3), negatives N(-6, 3)
    targets = (torch.rand(2000, 4, generator=g) < 0.3).float()
    logits = torch.randn(2000, 4, generator=g) * 3 + torch.where(targets.bool(), 6.0, -6.0)
    want = np.mean([average_precision_score(targets[:, i], logits[:, i]) for i in range(4)])
    assert compute_metrics(logits, targets, list("abcd")).mAP == pytest.approx(want, abs=1e-3)


def test_nan_or_infinite_logits_are_refused_not_scored():
    from imgcls_core.evaluation import NonFiniteLogitsError

    logits, targets = scored()
    logits[3, 1] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite for 1 of 600 images"):
        compute_metrics(logits, targets, list("abcdef"))
    with pytest.raises(NonFiniteLogitsError):
        compute_metrics(torch.full((4, 3), float("nan")), torch.tensor([0, 0, 1, 2]), list("abc"))


def test_the_threshold_is_the_best_micro_f1_on_the_set_and_is_kept_when_given():
    from sklearn.metrics import f1_score

    logits, targets = scored(1)
    report = compute_metrics(logits, targets, list("abcdef"))
    probs, y = logits.sigmoid().numpy(), targets.numpy()
    acc = MultiLabelAccumulator(6)  # the candidates: the bin edges (of the logit) from 0.05 to 0.95
    grid = [acc.edge_probability(e) for e in range(acc.edge_of(0.05), acc.edge_of(0.95) + 1)]
    best = max(f1_score(y, probs >= t, average="micro") for t in grid)
    assert report.micro_f1 == pytest.approx(best, abs=1e-9) and 0.05 <= report.threshold <= 0.95
    fixed = compute_metrics(logits, targets, list("abcdef"), threshold=0.5)
    assert fixed.threshold == 0.5
    assert fixed.micro_f1 == pytest.approx(f1_score(y, probs >= 0.5, average="micro"), abs=1e-9)


def test_accumulated_halves_give_the_metrics_of_the_whole():
    logits, targets = scored(2)
    whole = compute_metrics(logits, targets, list("abcdef"))
    first, second = MultiLabelAccumulator(6), MultiLabelAccumulator(6)
    first.update(logits[:250], targets[:250])
    second.update(logits[250:], targets[250:])
    merged = MultiLabelAccumulator.from_state(first.merge(second).state()).report(list("abcdef"))
    merged, whole = merged.to_dict(), whole.to_dict()
    assert merged.pop("loss") == pytest.approx(whole.pop("loss"), rel=1e-12)  # float sums in another order
    assert merged == whole  # counts: exactly


def test_bad_targets_and_shapes_are_refused():
    acc = MultiLabelAccumulator(3)
    with pytest.raises(ValueError, match="0 or 1"):
        acc.update(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="N x 3"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no samples"):
        acc.report(["a", "b", "c"])


# ----------------------------------------------------------------------------- data


def write_folder(root, rows: dict[str, list[str]], *, as_json: bool = False) -> None:
    """Tiny real PNGs at ``root/<key>`` and their label sets in labels.csv (or labels.json)."""
    rng = np.random.default_rng(0)
    for key in rows:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / key)
    if as_json:
        (root / "labels.json").write_text(json.dumps(rows))
    else:
        (root / "labels.csv").write_text("path,labels\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in rows.items()))


ROWS = {"train/a.png": ["cat", "dog"], "train/b.png": ["dog"], "train/c.png": [], "train/d.png": ["cat"],
        "val/e.png": ["dog", "cat"], "test/f.png": ["cat"]}


@pytest.mark.parametrize("as_json", [False, True])
def test_an_image_folder_with_a_labels_file_gives_label_sets(tmp_path, as_json):
    write_folder(tmp_path, ROWS, as_json=as_json)
    splits = load_dataset(DataConfig(format="imagefolder", root=str(tmp_path), multi_label=True,
                                     labels_file="labels.json" if as_json else "labels.csv"))
    assert splits.classes == ["cat", "dog"]
    assert splits.train.labels == [(0, 1), (1,), (), (0,)] and splits.train.multi_label
    assert splits.val.labels == [(0, 1)] and splits.test.labels == [(0,)]
    assert splits.train.class_counts() == [2, 2]
    image, target = splits.train.dataset()[0]
    assert image.shape == (3, 8, 8) and target.tolist() == [1.0, 1.0]
    assert splits.train.dataset()[2][1].tolist() == [0.0, 0.0]  # no labels: all negatives
    assert splits.train.subset([1]).multi_label


@pytest.mark.parametrize("change, message", [
    (lambda root: (root / "train" / "x.png").write_bytes((root / "train" / "a.png").read_bytes()), "no row in"),
    (lambda root: (root / "test" / "f.png").unlink(), "not under the"),
    (lambda root: (root / "labels.csv").write_text("file,tags\n"), "header 'path,labels'"),
    (lambda root: (root / "labels.csv").write_text("path,labels\ntrain/a.png,cat\ntrain/a.png,dog\n"), "twice"),
    (lambda root: (root / "labels.csv").unlink(), "data.labels_file"),
    (lambda root: (root / "labels.csv").write_text(
        "path,labels\n" + "".join(f'{k},"{",".join(v)}"\n' for k, v in ROWS.items())), "separates labels by spaces"),
])
def test_a_labels_file_that_does_not_match_the_images_is_refused_with_the_reason(tmp_path, change, message):
    write_folder(tmp_path, ROWS)
    change(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset(DataConfig(format="imagefolder", root=str(tmp_path), multi_label=True))


def test_a_json_labels_file_naming_one_image_twice_is_refused_and_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    write_folder(tmp_path, ROWS, as_json=True)
    text = (tmp_path / "labels.json").read_text()
    (tmp_path / "labels.json").write_text(text.replace('{"train/a.png"', '{"./train/a.png": ["dog"], "train/a.png"'))
    with pytest.raises(ValueError, match="train/a.png is listed twice"):
        load_dataset(DataConfig(format="imagefolder", root=str(tmp_path), multi_label=True, labels_file="labels.json"))
    write_folder(tmp_path, ROWS)
    (tmp_path / "labels.csv").write_text("\ufeff" + (tmp_path / "labels.csv").read_text(), encoding="utf-8")
    splits = load_dataset(DataConfig(format="imagefolder", root=str(tmp_path), multi_label=True))
    assert splits.classes == ["cat", "dog"] and splits.train.labels[0] == (0, 1)


def test_val_and_test_labels_unknown_to_train_are_refused(tmp_path):
    write_folder(tmp_path, {**ROWS, "test/f.png": ["bird"]})
    with pytest.raises(ValueError, match=r"\['bird'\]"):
        load_dataset(DataConfig(format="imagefolder", root=str(tmp_path), multi_label=True))


def test_multi_label_parquet_shards_round_trip_and_must_be_declared(tmp_path):
    from imgcls_core.data import convert_image_folder

    write_folder(tmp_path / "src", ROWS)
    report = convert_image_folder(tmp_path / "src", tmp_path / "shards", labels_file="labels.csv", num_workers=1)
    assert report.layout == "multi_label" and report.splits["train"].images == 4
    splits = load_dataset(DataConfig(format="parquet", root=str(tmp_path / "shards"), multi_label=True))
    assert sorted(splits.train.labels) == sorted([(0, 1), (1,), (), (0,)])
    with pytest.raises(ValueError, match="data.multi_label=true"):
        load_dataset(DataConfig(format="parquet", root=str(tmp_path / "shards")))
    # as training reads the folder: an image without a row is refused, not left out without a word
    (tmp_path / "src" / "val" / "g.png").write_bytes((tmp_path / "src" / "val" / "e.png").read_bytes())
    with pytest.raises(ValueError, match=r"1 file\(s\) under .*val have no row in .*labels.csv, e.g. \['val/g.png'\]"):
        convert_image_folder(tmp_path / "src", tmp_path / "shards2", labels_file="labels.csv", num_workers=1)


def test_the_composed_digits_hold_two_to_four_real_digits_each(tmp_path):
    from imgcls_core.data.multi_digits import COUNTS

    splits = load_dataset(DataConfig(format="multi_digits", root=str(tmp_path / "md")))
    assert {k: len(v) for k, v in splits.splits().items()} == COUNTS
    assert splits.classes == [str(d) for d in range(10)]
    sizes = [len(label) for label in splits.train.labels]
    assert min(sizes) >= 1 and max(sizes) == 4 and 2.0 < np.mean(sizes) < 3.5
    assert all(n > 100 for n in splits.train.class_counts())
    image = splits.test.load(0)
    assert image.shape == (3, 32, 32) and image.max() > 200  # ink on black


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("augment.mixup_alpha=0.2", "augment.mixup_alpha"),
    ("train.label_smoothing=0.1", "train.label_smoothing"),
    ("data.balance=weighted_loss", "data.balance"),
    ("ray.ingest=ray_data", "ray.ingest=dataloader"),
    ("data.format=digits", "one label per image"),
    ("optim.plateau_metric=acc1", "plateau_metric"),
])
def test_single_label_settings_are_refused_for_multi_label_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/multi_digits.yaml", ["data.multi_label=true", "optim.schedule=plateau", override])


def test_the_sweep_metric_must_be_one_multi_label_runs_report():
    from imgcls_core.config import check_tune_metric

    check_tune_metric(load_config("configs/multi_digits.yaml"))
    with pytest.raises(ConfigError, match="val/mAP"):
        check_tune_metric(load_config("configs/multi_digits.yaml", ["tune.metric=val/acc1"]))
    with pytest.raises(ConfigError, match="multi-label runs only"):
        load_config(None, ["optim.schedule=plateau", "optim.plateau_metric=mAP"])


def test_the_focal_loss_is_torchvisions():
    from torchvision.ops import sigmoid_focal_loss

    from imgcls_core.engine.loop import multi_label_loss

    logits, targets = scored(3, n=32)
    assert multi_label_loss("focal", 1.5)(logits, targets).item() == pytest.approx(
        sigmoid_focal_loss(logits, targets, gamma=1.5, reduction="mean").item())
    assert multi_label_loss("bce", 2.0)(logits, targets).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item())


# ------------------------------------------------------------------- a run, end to end


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from imgcls_core.runner import train_and_evaluate

    tmp = tmp_path_factory.mktemp("multi-run")
    cfg = load_config("configs/multi_digits.yaml", [f"data.root={tmp / 'md'}", "train.epochs=4",
                                                    "train.multi_label_loss=focal", f"train.output_dir={tmp / 'out'}"])
    result = train_and_evaluate(cfg, log=lambda _line: None)
    return {"cfg": cfg, "result": result, "out": tmp / "out"}


def test_a_local_run_is_judged_by_map_and_ships_its_val_threshold(run):
    from imgcls_core.engine.checkpoint import load_checkpoint

    result, out = run["result"], run["out"]
    assert result.val.score_name == "mAP" and result.test.mAP > 0.5  # 4 epochs; chance is about 0.3
    assert all("val/mAP" in row and "train/label_acc" in row and "val/acc1" not in row for row in result.history)
    payload = load_checkpoint(out / "model.pt")
    pre = payload["preprocessing"]
    assert pre["multi_label"] is True and pre["threshold"] == result.val.threshold
    assert result.test.threshold == result.val.threshold  # chosen on val, applied to test
    # a training checkpoint decides at the threshold its own val chose, not at the default 0.5
    saved = [load_checkpoint(f) for f in sorted(out.rglob("checkpoint.pt"))]
    assert saved and all(c["preprocessing"]["threshold"] == c["metrics"]["val/threshold"] for c in saved)
    assert any(c["preprocessing"]["threshold"] != 0.5 for c in saved)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["metric"] == "mAP" and summary["test_mAP"] == pytest.approx(result.test.mAP)
    assert summary["final_weights"]["metric"] == "mAP"
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["multi_label"] and set(metrics["per_class"]) == set(run["result"].test.class_names)
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["index", "path", "labels", "predicted", "exact_match"] and len(header) == 15
    assert (out / "gradcam_misclassified.png").is_file() and not (out / "confusion_matrix.png").exists()


def test_the_predictor_and_pyfunc_answer_label_sets_at_the_models_threshold(run):
    from imgcls_core.data import load_dataset as load
    from imgcls_core.packaging import classify_encoded
    from imgcls_core.predict import Predictor

    predictor = Predictor.from_file(run["out"] / "model.pt")
    test = load(run["cfg"].data).test
    report = predictor.evaluate(test)
    assert report.mAP == pytest.approx(run["result"].test.mAP, abs=1e-9)
    files = [open(p, "rb").read() for p in test.paths[:8]]
    probs = predictor.probabilities(predictor.preprocess(files))
    assert probs.shape == (8, 10) and not torch.allclose(probs.sum(1), torch.ones(8))  # sigmoids, not a softmax
    frame = classify_encoded(predictor, [*files, b"not an image"], top_k=3)
    threshold = predictor.pre.threshold
    for row, p in zip(frame.itertuples(), probs):
        want = sorted(str(c) for c in torch.nonzero(p >= threshold).flatten().tolist())
        assert sorted(x["label"] for x in row.labels) == want
        assert row.probabilities == pytest.approx(p.tolist(), abs=1e-6) and len(row.top_k) == 3
    assert frame["error"].iloc[-1] and frame["labels"].iloc[-1] == []
    single = load(DataConfig(format="digits", root=str(run["out"].parent / "digits"))).test
    with pytest.raises(ValueError, match="multi-label model cannot be evaluated on single-label data"):
        predictor.evaluate(single)


def test_the_onnx_export_keeps_parity_and_the_threshold(run, tmp_path):
    from imgcls_core.export import export_model, onnx_preprocessing
    from imgcls_core.predict import Predictor

    predictor = Predictor.from_file(run["out"] / "model.pt")
    test = load_dataset(run["cfg"].data).test
    batch = predictor.preprocess([open(p, "rb").read() for p in test.paths[:16]])
    files, reports = export_model(run["out"] / "model.pt", batch, tmp_path, formats=("onnx",), log=lambda _l: None)
    assert all(r.passed for r in reports)
    pre = onnx_preprocessing(files["onnx"])
    assert pre.multi_label and pre.threshold == predictor.pre.threshold


def test_a_served_answer_lists_every_label_over_the_threshold_whatever_top_k(run):
    from imgcls_core.predict import Predictor
    from imgcls_core.serving import ServedModel

    model = ServedModel(Predictor.from_file(run["out"] / "model.pt"), "m", "1", "champion")
    test = load_dataset(run["cfg"].data).test
    batch = torch.stack([model.preprocess(test.load(i)) for i in range(6)])
    rows = model.classify(batch, top_k=1)
    assert all(len(row) == 10 for row in rows)  # every class ranked: labels may be more than top_k
    for row in rows:
        answer = model.answer(row, top_k=1)
        assert len(answer["top_k"]) == 1 and answer["threshold"] == model.predictor.pre.threshold
        assert answer["labels"] == [r for r in row if r["probability"] >= answer["threshold"]]
    info = model.info()
    assert info["multi_label"] is True and info["threshold"] == model.predictor.pre.threshold


# --------------------------------------------------------------------------- distillation


def test_a_teacher_of_the_other_kind_is_refused_before_training(tmp_path):
    from imgcls_core.config import ModelConfig
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.engine.checkpoint import save_inference_model
    from imgcls_core.engine.distill import check_teacher_compatible, load_teacher
    from imgcls_core.models import build_model

    classes = [str(i) for i in range(10)]
    multi = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, classes, multi_label=True, threshold=0.4)
    single = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, classes)
    cfg = ModelConfig(name="cnn3", width=0.25)
    teacher = save_inference_model(tmp_path / "teacher.pt", build_model(cfg, 10, 16).state_dict(), vars(cfg), multi)
    with pytest.raises(ValueError, match="is a multi-label model but the student's data is single-label"):
        load_teacher(str(teacher), single)
    with pytest.raises(ValueError, match="is a single-label model but the student's data is multi-label"):
        check_teacher_compatible(single, multi, "models:/t/1")
    assert load_teacher(str(teacher), multi).preprocessing.multi_label  # the same kind is accepted
