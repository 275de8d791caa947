"""The TensorRT backend: a clear refusal without CUDA or Torch-TensorRT (every CPU machine, CI
included), and on a GPU with the tensorrt extra an engine that passes the export's parity gate and
answers like the eager model."""

from __future__ import annotations

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
