"""int8 quantization and pruning of a small model trained on the real digits in this module.

Speed is not asserted here (a shared CI machine makes it noise); bench/quantize.py
measures it. Accuracy, sizes, sparsity and the saved files are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imgcls_core import compress
from imgcls_core.config import load_config
from imgcls_core.data import load_dataset

pytestmark = pytest.mark.slow

# Fine-tuning after pruning half the weights must bring top-1 back to within this many
# points of the unpruned model (measured: 0 to 1 point lost on the 359 test digits).
FINETUNE_FLOOR_POINTS = 3.0


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory):
    """A cnn3 (width 0.5) trained for a few epochs: its model file, config, splits, calibration set."""
    from imgcls_core.export import load_eager
    from imgcls_core.runner import train_and_evaluate

    out = tmp_path_factory.mktemp("compress")
    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}", "data.batch_size=64",
                             "model.name=cnn3", "model.width=0.5", "augment.strength=0", "optim.lr=0.1",
                             "train.epochs=4", f"train.output_dir={out / 'run'}"])
    result = train_and_evaluate(cfg, log=lambda _line: None)
    model, pre = load_eager(result.files["model"])
    splits = load_dataset(cfg.data)
    calibration = compress.calibration_batch(splits.train, pre, 128)
    return {"cfg": cfg, "model_file": result.files["model"], "model": model, "pre": pre, "splits": splits,
            "calibration": calibration, "out": out, "acc1": result.test.acc1}


@pytest.fixture(scope="module")
def static_int8(trained):
    files, report = compress.quantize(trained["model"], trained["pre"], trained["calibration"],
                                      trained["splits"].test, trained["out"] / "static", method="static",
                                      threads=1, repeats=2, log=lambda _line: None)
    return files, report


def test_calibration_draws_preprocessed_training_images(trained):
    batch = trained["calibration"]
    size = trained["pre"].image_size
    assert batch.shape == (128, 3, size, size)
    assert batch.dtype == torch.float32
    # Normalized by the model's own mean/std: centred near 0, not raw 0..1 pixels.
    assert -1.0 < batch.mean().item() < 1.0 and batch.min().item() < 0.0


def test_static_int8_is_within_one_point_of_fp32_and_smaller(trained, static_int8):
    files, report = static_int8
    assert trained["acc1"] > 0.9, "the fixture model should be well trained for this check to mean anything"
    assert report.fp32_acc1 == pytest.approx(trained["acc1"], abs=1e-9)  # ONNX fp32 answers like eager
    assert abs(report.acc1_delta_points) <= 1.0, report.summary()
    assert files["int8_onnx"].stat().st_size < files["fp32_onnx"].stat().st_size
    assert report.size_ratio < 0.5  # int8 weights are a quarter of fp32; QDQ scales add a little
    assert report.fp32_images_per_s > 0 and report.int8_images_per_s > 0


def test_int8_file_is_quantized_and_carries_the_preprocessing(trained, static_int8):
    import onnx

    from imgcls_core.export import OnnxModule, onnx_preprocessing

    files, _ = static_int8
    ops = {node.op_type for node in onnx.load(str(files["int8_onnx"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert onnx_preprocessing(files["int8_onnx"]) == trained["pre"]
    logits = OnnxModule(files["int8_onnx"], threads=1)(trained["calibration"][:5])
    assert logits.shape == (5, len(trained["pre"].classes))  # dynamic batch axis survives quantization
    saved = json.loads(files["report"].read_text())
    assert saved["acc1_delta_points"] == pytest.approx(static_int8[1].acc1_delta_points)


def test_dynamic_fallback_runs_and_keeps_accuracy(trained, static_int8):
    files, report = compress.quantize(trained["model"], trained["pre"], trained["calibration"],
                                      trained["splits"].test, trained["out"] / "dynamic", method="dynamic",
                                      fp32_onnx=static_int8[0]["fp32_onnx"], threads=1, repeats=2,
                                      log=lambda _line: None)
    assert report.method == "dynamic" and report.calibration_images == 0
    assert abs(report.acc1_delta_points) <= 2.0, report.summary()
    assert files["int8_onnx"].is_file()


def test_bf16_keeps_top1_within_a_point_and_shares_the_fp32_weights(trained):
    files, report = compress.reduced_precision(trained["model"], trained["pre"], trained["calibration"],
                                               trained["splits"].test, trained["out"] / "bf16", batch_size=32,
                                               threads=1, repeats=2)
    assert report.fp32_acc1 == pytest.approx(trained["acc1"], abs=1e-9)  # the same weights in fp32
    assert abs(report.acc1_delta_points) <= 1.0, report.summary()
    assert report.fp32_images_per_s > 0 and report.bf16_images_per_s > 0
    assert json.loads(files["report"].read_text())["acc1_delta_points"] == pytest.approx(report.acc1_delta_points)
    assert report.metrics()["acc1"] == report.bf16_acc1 and "bf16" in report.summary()

    model = trained["model"]
    wrapped = compress.Bf16Module(model)
    assert wrapped.model is model and next(model.parameters()).dtype == torch.float32
    with torch.inference_mode():
        logits, reference = wrapped(trained["calibration"][:16]), model(trained["calibration"][:16])
    assert logits.dtype == torch.float32  # callers get fp32 logits back
    assert (logits.argmax(1) == reference.argmax(1)).float().mean().item() >= 0.9
    assert 0 < (logits - reference).abs().max().item() < 1.0  # computed in bf16, not fp32


def test_unknown_method_and_bad_calibration_method_are_rejected(trained):
    with pytest.raises(ValueError, match="unknown quantization method"):
        compress.quantize(trained["model"], trained["pre"], trained["calibration"], trained["splits"].test,
                          trained["out"] / "x", method="fp8")
    with pytest.raises(ValueError, match="unknown calibration method"):
        compress.quantize_onnx_static("missing.onnx", trained["calibration"], trained["out"] / "y.onnx",
                                      calibrate="magic")


def test_a_multi_label_model_is_refused_before_anything_is_written(tmp_path):
    from imgcls_core.config import ModelConfig
    from imgcls_core.data import SplitRecords
    from imgcls_core.data.preprocessing import Preprocessing
    from imgcls_core.models import build_model

    classes = [str(i) for i in range(4)]
    pre = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, classes, multi_label=True, threshold=0.4)
    model = build_model(ModelConfig(name="cnn3", width=0.25), len(classes), 16).eval()
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).numpy()
    test = SplitRecords(classes, [(0, 1), (2,), (), (1, 3)], ["a", "b", "c", "d"], arrays=pixels, multi_label=True)
    with pytest.raises(ValueError, match="a multi-label model .* cannot be compressed yet"):
        compress.quantize(model, pre, torch.randn(8, 3, 16, 16), test, tmp_path / "static", log=lambda _line: None)
    with pytest.raises(ValueError, match="a multi-label model .* cannot be compressed yet"):
        compress.reduced_precision(model, pre, torch.randn(8, 3, 16, 16), test, tmp_path / "bf16", repeats=1)
    assert not list(tmp_path.iterdir())  # no ONNX export, no int8 file, no report


def test_a_run_that_fails_the_int8_gate_leaves_the_servable_file_and_logs_its_own(trained, static_int8, tmp_path):
    """Two static runs of one version: the first passes the gate and is tagged servable, the second
    (its int8 file 5 points below fp32) is logged beside it, under a folder of its own, untagged."""
    import dataclasses
    import shutil

    import mlflow

    from imgcls_core.registry import Registry, register_model_file
    from imgcls_core.serving import INT8_URI_TAG
    from jobs.compress import publish

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("unit", artifact_location=(tmp_path / "artifacts").as_uri())
    registry = Registry(uri, "digits")
    version = registry.version(register_model_file(uri, "digits", trained["model_file"], experiment="unit").version)

    def run(files, report) -> dict:
        local = {"method": "static", "model_file": "models:/digits/1", **report.to_dict(),
                 "files": {k: str(v) for k, v in files.items()}}
        return publish(registry, version, "digits", "static", report, files, local, log=lambda _line: None)

    def logged(result: dict, name: str) -> bytes:
        return Path(mlflow.artifacts.download_artifacts(
            f"runs:/{version.run_id}/{result['artifact_path']}/{name}", dst_path=str(tmp_path / "download"),
            tracking_uri=uri)).read_bytes()

    first = tmp_path / "first"  # a copy: the module's fixture files stay as they are
    shutil.copytree(static_int8[0]["int8_onnx"].parent, first)
    files = {k: first / v.name for k, v in static_int8[0].items()}
    passed = run(files, static_int8[1])
    servable_bytes = files["int8_onnx"].read_bytes()

    again, report = compress.quantize(trained["model"], trained["pre"], trained["calibration"][:16],
                                      trained["splits"].test, tmp_path / "second", method="static",
                                      fp32_onnx=files["fp32_onnx"], threads=1, repeats=1, log=lambda _line: None)
    assert again["int8_onnx"].read_bytes() != servable_bytes  # other calibration, other file
    failed = run(again, dataclasses.replace(report, int8_acc1=report.fp32_acc1 - 0.05))

    assert passed["servable"] is True and failed["servable"] is False
    assert passed["artifact_path"].startswith("compress/static/") and failed["artifact_path"].startswith(
        "compress/static/") and passed["artifact_path"] != failed["artifact_path"]
    tags = client.get_model_version("digits", version.version).tags
    assert tags[INT8_URI_TAG] == f"runs:/{version.run_id}/{passed['artifact_path']}/model.int8.onnx"
    assert float(tags["export.int8.acc1_delta"]) == pytest.approx(static_int8[1].acc1_delta_points, abs=1e-4)
    assert float(tags["compress.int8.acc1_delta"]) == pytest.approx(-5.0, abs=1e-4)  # the latest run's figures
    assert logged(passed, "model.int8.onnx") == servable_bytes  # the tagged file is the one that passed
    assert logged(failed, "model.int8.onnx") == again["int8_onnx"].read_bytes()
    for result, local in ((passed, files["report"]), (failed, again["report"])):
        assert json.loads(logged(result, "static_report.json")) == json.loads(local.read_text()) == result


def test_unstructured_pruning_reaches_the_sparsity_and_fine_tuning_recovers(trained):
    files, report = compress.prune(trained["model_file"], trained["cfg"], trained["splits"],
                                   trained["out"] / "unstructured", method="prune-unstructured", amount=0.6,
                                   finetune_epochs=2, finetune_lr=0.01, log=lambda _line: None)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    assert report.acc1_finetuned >= report.acc1_before - FINETUNE_FLOOR_POINTS / 100, report.summary()
    assert report.pruned_gzip_mb < report.dense_gzip_mb  # zeros compress; the raw file does not shrink

    from imgcls_core.predict import Predictor

    predictor = Predictor.from_file(files["model"])  # a normal model file: no masks, original names
    assert compress.sparsity(predictor.model) == pytest.approx(report.sparsity)
    assert predictor.evaluate(trained["splits"].test).acc1 == pytest.approx(report.acc1_finetuned)


def test_structured_pruning_zeroes_whole_output_channels(trained):
    files, report = compress.prune(trained["model_file"], trained["cfg"], trained["splits"],
                                   trained["out"] / "structured", method="prune-structured", amount=0.25, n=2,
                                   finetune_epochs=1, log=lambda _line: None)
    from imgcls_core.export import load_eager

    model, _ = load_eager(files["model"])
    for conv, _ in compress.prunable_weights(model, convs_only=True):
        filters = conv.weight.detach().flatten(1)
        dead = (filters == 0).all(dim=1)
        assert int(dead.sum()) == round(0.25 * conv.out_channels)
        assert (filters[~dead] != 0).any(dim=1).all()  # the other filters were kept
    assert report.channel_sparsity == pytest.approx(0.25, abs=0.02)
    assert report.norm == 2


def test_pruning_arguments_are_checked():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        compress.prune_unstructured(model, 1.5)
    with pytest.raises(ValueError, match="n=1 or 2"):
        compress.prune_structured(model, 0.5, n=3)


@pytest.mark.parametrize("argv, message", [
    (["--method", "static"], "exactly one of"),
    (["--method", "static", "--model", "m", "--model-file", "x.pt"], "exactly one of"),
    (["--method", "static", "--model-file", "x.pt", "--alias", "champion"], "go with --model"),
    (["--method", "static", "--model", "m", "--alias", "a", "--version", "2"], "not both"),
    (["--method", "prune-unstructured", "--model-file", "x.pt", "--amount", "1.5"], "--amount"),
    (["--method", "static", "--model-file", "x.pt", "--calibration-images", "1"], "--calibration-images"),
])
def test_compress_job_rejects_bad_arguments(argv, message, capsys):
    from jobs.compress import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compress_job_rejects_an_unknown_method_and_a_missing_file(tmp_path, capsys):
    from jobs.compress import main

    with pytest.raises(SystemExit) as exc:
        main(["--method", "fp4", "--model-file", "x.pt"])
    assert exc.value.code == 2
    assert main(["--method", "static", "--model-file", str(tmp_path / "none.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
