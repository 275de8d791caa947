"""The TensorRT backend: a clear refusal without CUDA or Torch-TensorRT (every CPU machine, CI
included), and on a GPU with the tensorrt extra an engine that passes the export's parity gate and
answers like the eager model."""

from __future__ import annotations

import json

import pytest
import torch

from imgcls_core.config import ModelConfig
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import save_inference_model
from imgcls_core.export import ExportError, export_model
from imgcls_core.models import build_model
from imgcls_core.trt_export import unavailable

WHY = unavailable()


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name="cnn3", width=0.5)
    model = build_model(cfg, 10, 32)
    pre = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(10)])
    return save_inference_model(tmp_path / "model.pt", model.state_dict(), {"name": "cnn3", "width": 0.5}, pre, {})


@pytest.mark.skipif(WHY is None, reason="this machine can build TensorRT engines")
def test_without_cuda_or_torch_tensorrt_the_export_and_the_backend_say_why(model_file, tmp_path):
    from imgcls_core.serving import _tensorrt_predictor

    assert "CUDA" in WHY or "tensorrt" in WHY
    with pytest.raises(ExportError, match="tensorrt: "):
        export_model(model_file, torch.randn(4, 3, 32, 32), tmp_path / "out", formats=("onnx", "tensorrt"))
    assert not (tmp_path / "out").exists()  # refused before any export was written
    with pytest.raises(RuntimeError, match="serve.backend=tensorrt: "):
        _tensorrt_predictor(None, None, str(tmp_path))


def test_the_tensorrt_backend_and_format_are_known_to_config_and_export():
    from imgcls_core.config import load_config
    from imgcls_core.export import DEFAULT_FORMATS, FORMATS

    assert load_config(None, ["serve.backend=tensorrt"]).serve.backend == "tensorrt"
    assert "tensorrt" in FORMATS and "tensorrt" not in DEFAULT_FORMATS  # opt-in: it needs a GPU


@pytest.mark.skipif(WHY is not None, reason=f"needs TensorRT: {WHY}")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_an_engine_passes_the_parity_gate_and_answers_like_eager(model_file, tmp_path, precision):
    from imgcls_core.predict import Predictor
    from imgcls_core.trt_export import TensorRTModule, tensorrt_preprocessing

    torch.manual_seed(1)
    batch = torch.randn(48, 3, 32, 32)
    files, reports = export_model(model_file, batch, tmp_path, formats=("tensorrt",), trt_precision=precision,
                                  log=print)
    (report,) = reports
    assert report.passed and report.images == 48, report.summary()
    engine = TensorRTModule(files["tensorrt"])
    assert tensorrt_preprocessing(files["tensorrt"]).classes == [str(i) for i in range(10)]
    eager = Predictor.from_file(model_file)
    served = Predictor(engine, engine.pre, "cuda")
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)  # 100 > the engine's max_batch of 64: run in chunks
    want = eager.probabilities(eager.preprocess(list(images))).argmax(1)
    got = served.probabilities(served.preprocess(list(images))).argmax(1)
    assert (got == want).float().mean().item() >= 0.99


def test_a_repeated_tensorrt_parity_failure_replaces_the_earlier_failed_engine(model_file, tmp_path, monkeypatch):
    """Without a GPU, TensorRT is stood in for by an engine folder whose module drifts from eager: each
    failure sets its engine aside as model.trt.failed-parity (a folder), replacing the one before."""
    import imgcls_core.trt_export as trt_export

    attempts = []

    def build_engine(model, pre, batch, folder, precision="fp16", **_options):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / trt_export.PROGRAM_FILE).write_text(f"engine of attempt {len(attempts)}")
        (folder / trt_export.META_FILE).write_text(json.dumps(pre.to_dict()))
        return folder

    class Drifting(torch.nn.Module):  # answers every image with the same logits: not the eager model's
        def __init__(self, folder):
            super().__init__()

        def forward(self, images):
            return torch.full((images.shape[0], 10), 5.0)

    monkeypatch.setattr(trt_export, "unavailable", lambda: None)
    monkeypatch.setattr(trt_export, "export_tensorrt", build_engine)
    monkeypatch.setattr(trt_export, "TensorRTModule", Drifting)
    for attempt in (1, 2):
        attempts.append(attempt)
        with pytest.raises(ExportError, match=r"tensorrt: .*FAILED"):
            export_model(model_file, torch.randn(4, 3, 32, 32), tmp_path / "out", formats=("tensorrt",),
                         log=lambda _line: None)
    aside = tmp_path / "out" / "model.trt.failed-parity"
    assert not (tmp_path / "out" / "model.trt").exists()  # nothing failed is left under the checked name
    assert (aside / trt_export.PROGRAM_FILE).read_text() == "engine of attempt 2"
