"""TorchScript and ONNX exports of real imgcls networks, checked against eager PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls_core.config import ModelConfig
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import save_inference_model
from imgcls_core.export import (ExportError, OnnxModule, check_parity, export_model, export_onnx, load_eager,
                                load_torchscript, onnx_preprocessing)
from imgcls_core.models import build_model
from imgcls_core.predict import Predictor

SIZE = 32
PRE = Preprocessing(image_size=SIZE, mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5], crop_ratio=1.0,
                    classes=[str(i) for i in range(10)])


@pytest.fixture(scope="module", params=["cnn3", "resnet18"])
def model_file(request, tmp_path_factory):
    """A randomly initialised network saved as an imgcls model.pt (BN statistics made non-trivial)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=request.param, width=0.25)
    model = build_model(cfg, len(PRE.classes), SIZE)
    model.train()
    with torch.no_grad():  # a few forward passes in train mode give BN real running statistics
        for _ in range(3):
            model(torch.randn(16, 3, SIZE, SIZE))
    path = tmp_path_factory.mktemp(request.param) / "model.pt"
    return save_inference_model(path, model.eval().state_dict(), vars(cfg), PRE)


def batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_both_exports_match_eager_and_record_their_figures(model_file, tmp_path):
    files, reports = export_model(model_file, batch(8), tmp_path, log=lambda _line: None)
    assert set(files) == {"torchscript", "onnx"} and all(p.is_file() for p in files.values())
    for report in reports:
        assert report.passed, report.summary()
        assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0 and report.images == 8
    written = json.loads((tmp_path / "parity.json").read_text())
    assert written["opset"] == 18 and [r["format"] for r in written["reports"]] == ["torchscript", "onnx"]


def test_exports_take_any_batch_size(model_file, tmp_path):
    model, pre = load_eager(model_file)
    files, _ = export_model(model_file, batch(4), tmp_path, log=lambda _line: None)
    onnx_model, script = OnnxModule(files["onnx"]), load_torchscript(files["torchscript"])
    for n in (1, 3, 33):  # none of them the export batch size
        x = batch(n, seed=n)
        with torch.no_grad():
            want = model(x)
            assert torch.allclose(script(x), want, atol=1e-4)
        assert torch.allclose(onnx_model(x), want, atol=1e-4)


def test_onnx_file_carries_the_preprocessing_and_serves_through_predictor(model_file, tmp_path):
    model, pre = load_eager(model_file)
    path = export_onnx(model, pre, batch(2), tmp_path / "m.onnx")
    assert onnx_preprocessing(path) == pre
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    eager = Predictor(model, pre).classify([image], top_k=3)
    onnx = Predictor(OnnxModule(path), onnx_preprocessing(path)).classify([image], top_k=3)
    assert [p["index"] for p in onnx[0]] == [p["index"] for p in eager[0]]
    assert np.allclose([p["probability"] for p in onnx[0]], [p["probability"] for p in eager[0]], atol=1e-5)


def test_a_failed_parity_check_fails_the_export_with_its_figures(model_file, tmp_path, monkeypatch):
    import imgcls_core.export as export

    class Broken(OnnxModule):  # an export that drifts: logits shifted for half the classes
        def forward(self, images):
            out = super().forward(images)
            out[:, :5] += 3.0
            return out

    monkeypatch.setattr(export, "OnnxModule", Broken)
    with pytest.raises(ExportError, match=r"onnx: max \|logit diff\| 3 .*FAILED"):
        export_model(model_file, batch(8), tmp_path, formats=("onnx",), log=lambda _line: None)
    report = json.loads((tmp_path / "parity.json").read_text())["reports"][0]
    assert report["passed"] is False and report["max_abs_diff"] == pytest.approx(3.0, abs=1e-3)


def test_parity_report_fails_on_any_top1_disagreement():
    model = torch.nn.Linear(4, 3).eval()
    flipped = torch.nn.Sequential(model, torch.nn.Flatten())  # same logits...
    x = torch.randn(5, 4)
    assert check_parity("same", model, flipped, x).passed
    report = check_parity("neg", model, lambda t: -model(t), x)  # ...and negated ones
    assert not report.passed and report.top1_agreement < 1.0


def test_bad_requests_are_refused_before_any_export(model_file, tmp_path):
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model_file, batch(4), tmp_path, formats=("tflite",))
    with pytest.raises(ExportError, match=r"N x 3 x 32 x 32"):
        export_model(model_file, torch.randn(4, 3, 16, 16), tmp_path)
    model, pre = load_eager(model_file)
    with pytest.raises(ExportError, match="at least 2"):
        export_onnx(model, pre, batch(1), tmp_path / "one.onnx")
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(model, pre, batch(2), tmp_path / "old.onnx", opset=17)
    assert not list(tmp_path.glob("*.onnx*"))  # nothing half-written left behind


def test_a_file_that_is_not_an_imgcls_export_is_named(tmp_path):
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ExportError, match="not an imgcls export"):
        onnx_preprocessing(tmp_path / "other.onnx")


def test_jobs_export_from_a_model_file_and_its_argument_errors(model_file, tmp_path, digits_root, capsys):
    from jobs.export import main

    config = ["--set", "data.format=digits", "--set", f"data.root={digits_root}"]
    out = tmp_path / "out"
    assert main([*config, "--model-file", str(model_file), "--out", str(out), "--check-images", "16"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["parity"]["onnx"]["images"] == 16 and summary["parity"]["onnx"]["passed"]
    assert summary["size_mb"]["onnx"] > 0 and "registry" not in summary
    capsys.readouterr()
    assert main([*config, "--model-file", str(model_file), "--formats", "onnx,tflite"]) == 2
    assert "tflite" in capsys.readouterr().err
    assert main([*config, "--model-file", str(model_file), "--opset", "12"]) == 2
    assert "18..23" in capsys.readouterr().err
    assert main([*config, "--model-file", str(tmp_path / "missing.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript's deprecation notice
def test_the_torchscript_file_carries_the_preprocessing_with_a_multi_label_threshold(tmp_path):
    from imgcls_core.export import TORCHSCRIPT_EXTRA_FILE, torchscript_preprocessing

    pre = Preprocessing(SIZE, [0.2, 0.3, 0.4], [0.3, 0.25, 0.2], 0.875, list("abcdef"), multi_label=True,
                        threshold=0.37)
    cfg = ModelConfig(name="cnn3", width=0.25)
    model_file = save_inference_model(tmp_path / "model.pt", build_model(cfg, 6, SIZE).eval().state_dict(),
                                      vars(cfg), pre)
    files, _ = export_model(model_file, batch(4), tmp_path / "out", formats=("torchscript",), log=lambda _l: None)
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    torch.jit.load(str(files["torchscript"]), _extra_files=extra)  # what a LibTorch user reads back
    assert json.loads(extra["imgcls.preprocessing.json"]) == pre.to_dict()
    assert torchscript_preprocessing(files["torchscript"]) == pre
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(tmp_path / "plain.pt"))
    with pytest.raises(ExportError, match="not an imgcls export"):
        torchscript_preprocessing(tmp_path / "plain.pt")


def saved_model(path, width: float, seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(name="cnn3", width=width)
    return save_inference_model(path, build_model(cfg, len(PRE.classes), SIZE).eval().state_dict(), vars(cfg), PRE)


def test_jobs_export_of_two_models_keeps_their_folders_and_uploads_only_this_runs_files(tmp_path, digits_root):
    """Two registered models, each at v1: each export has its own default folder, and a version's run
    gets that export's files, parity.json and export.json, never a stray file of the folder."""
    import mlflow

    from imgcls_core.config import load_config
    from imgcls_core.registry import register_model_file
    from jobs.export import export_job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("unit", artifact_location=(tmp_path / "artifacts").as_uri())
    big = register_model_file(uri, "digits", saved_model(tmp_path / "a" / "model.pt", 0.5, 0), experiment="unit")
    small = register_model_file(uri, "digits-small", saved_model(tmp_path / "b" / "model.pt", 0.25, 1),
                                experiment="unit")
    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}", f"tracking.tracking_uri={uri}",
                             f"train.output_dir={tmp_path / 'runs'}"])

    def export(name: str, formats: tuple[str, ...]) -> dict:
        return export_job(cfg, model_name=name, alias=None, version="1", model_file=None, formats=formats,
                          opset=18, tolerance=1e-4, check_images=8, out=None, log=lambda _line: None)

    def logged(version) -> set[str]:
        return {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(version.run_id, "exports/v1")}

    first = export("digits", ("torchscript", "onnx"))
    folder = Path(first["files"]["onnx"]).parent
    assert folder == tmp_path / "runs" / "exports" / "digits" / "v1"
    second = export("digits-small", ("onnx",))
    assert Path(second["files"]["onnx"]).parent == tmp_path / "runs" / "exports" / "digits-small" / "v1"
    assert logged(small) == {"model.onnx", "parity.json", "export.json"}  # not digits' TorchScript file
    assert logged(big) == {"model.torchscript.pt", "model.onnx", "parity.json", "export.json"}

    (folder / "model.onnx.failed-parity").write_bytes(b"an earlier export that failed its check")
    export("digits", ("onnx",))
    assert "model.onnx.failed-parity" not in logged(big)
