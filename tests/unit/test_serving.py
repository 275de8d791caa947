"""imgcls_core.serving without Ray or HTTP: upload decoding errors, the served model, batch statistics."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls_core.config import ModelConfig
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.models import build_model
from imgcls_core.predict import Predictor
from imgcls_core.serving import BatchStats, RequestError, ServedModel, decode_upload, resolve_device


def png(width: int = 20, height: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data,status,error", [
    (b"", 400, "empty_image"),
    (b"GIF89a not really", 400, "invalid_image"),
    (b"plain text", 400, "invalid_image"),
])
def test_bad_uploads_are_client_errors(data, status, error):
    with pytest.raises(RequestError) as info:
        decode_upload(data, max_pixels=10_000, name="upload.bin")
    assert (info.value.status, info.value.error) == (status, error)
    assert info.value.body() == {"error": error, "detail": info.value.detail}
    assert info.value.detail.startswith("upload.bin: ")


def test_pixel_limit_is_413_and_a_valid_image_decodes():
    with pytest.raises(RequestError) as info:
        decode_upload(png(200, 100), max_pixels=19_999)
    assert info.value.status == 413 and info.value.error == "image_too_large"
    assert "200x100" in info.value.detail
    assert decode_upload(png(200, 100), max_pixels=20_000).shape == (3, 100, 200)


def served_model() -> ServedModel:
    torch.manual_seed(0)
    pre = Preprocessing(16, [0.5] * 3, [0.25] * 3, 1.0, ["cat", "dog", "eel"])
    model = build_model(ModelConfig(name="cnn3", width=0.25), 3, 16)
    return ServedModel(Predictor(model, pre), "animals", "7", "champion", "run1",
                       {"test/acc1": "0.91", "test/n": "120", "imgcls.source_run_id": "run1"})


def test_classify_top_k_is_sorted_and_matches_the_predictor():
    served = served_model()
    batch = torch.stack([served.preprocess(decode_upload(png(), max_pixels=10**6)) for _ in range(3)])
    rows = served.classify(batch, top_k=2)
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)
    probs = served.predictor.probabilities(batch)
    for row, p in zip(rows, probs):
        assert row[0]["probability"] >= row[1]["probability"]
        assert row[0]["index"] == int(p.argmax()) and row[0]["label"] == ["cat", "dog", "eel"][row[0]["index"]]
        assert row[0]["probability"] == pytest.approx(float(p.max()))
    served.warm_up()


def test_info_carries_identity_preprocessing_and_test_metrics():
    info = served_model().info()
    assert (info["name"], info["version"], info["alias"], info["run_id"]) == ("animals", "7", "champion", "run1")
    assert info["classes"] == ["cat", "dog", "eel"] and info["input_size"] == 16
    assert info["test_metrics"] == {"acc1": 0.91, "n": 120.0}


def test_batch_stats_count_sizes_across_threads():
    stats = BatchStats()
    threads = [threading.Thread(target=lambda: [stats.record(s) for s in (1, 4, 4, 32)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["batches"] == 16 and snap["images"] == 4 * 41
    assert snap["histogram"] == {"1": 4, "4": 8, "32": 4} and snap["max_batch_size"] == 32
    assert snap["mean_batch_size"] == pytest.approx(41 / 4)
    assert BatchStats().snapshot()["mean_batch_size"] == 0.0


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="num_gpus"):
            resolve_device("cuda")


def registered_champion(tmp_path):
    """``served_model()``'s weights registered as version 1 of "animals" in a sqlite registry, with
    the champion alias: ``(served, model file, tracking URI, Registry, ModelVersion)``."""
    from imgcls_core.engine.checkpoint import save_inference_model
    from imgcls_core.registry import CHAMPION, Registry, register_model_file

    served = served_model()
    model_file = save_inference_model(tmp_path / "model.pt", served.predictor.model.state_dict(),
                                      {"name": "cnn3", "width": 0.25}, served.predictor.pre)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = register_model_file(uri, "animals", model_file, experiment="unit")
    registry = Registry(uri, "animals")
    registry.set_alias(CHAMPION, version.version)
    return served, model_file, uri, registry, version


def test_onnx_backend_needs_an_export_and_says_how_to_make_one(tmp_path):
    from imgcls_core.serving import load_served_model

    uri = registered_champion(tmp_path)[2]
    auto = load_served_model(uri, "animals")  # serve.backend's default, "auto"
    assert auto.backend == "torch" and "no checked ONNX export" in auto.choice["reason"]
    with pytest.raises(LookupError, match=r"no ONNX export; make one with `python -m jobs.export --model animals"):
        load_served_model(uri, "animals", backend="onnx")
    with pytest.raises(ValueError, match="unknown serving backend 'tflite'"):
        load_served_model(uri, "animals", backend="tflite")


def test_reduced_precisions_need_their_backend_and_their_gate(tmp_path):
    """int8 is the onnx backend's and bf16 the torch backend's (auto means torch for it); bf16
    serves only a version jobs.compress tagged servable, and then keeps fp32 weights for Grad-CAM."""
    from imgcls_core.compress import bf16_unavailable
    from imgcls_core.serving import BF16_GATE_TAG, load_served_model

    served, _, uri, registry, version = registered_champion(tmp_path)
    for backend, precision in (("torch", "int8"), ("onnx", "bf16"), ("auto", "int8")):
        with pytest.raises(ValueError, match=rf"serve.precision: {precision} is served by .* \(it is {backend}\)"):
            load_served_model(uri, "animals", backend=backend, precision=precision)
    with pytest.raises(ValueError, match="unknown serve.precision 'fp8'"):
        load_served_model(uri, "animals", precision="fp8")
    with pytest.raises(LookupError, match=r"not passed the bf16 gate; check it with `python -m jobs.compress "
                                          r"--model animals --version 1 --method bf16`"):
        load_served_model(uri, "animals", precision="bf16")

    registry.tag(version.version, {BF16_GATE_TAG: "-0.2"})
    if bf16_unavailable(torch.device("cpu")) is not None:
        with pytest.raises(RuntimeError, match="no native bf16"):
            load_served_model(uri, "animals", precision="bf16")
        return
    bf16 = load_served_model(uri, "animals", precision="bf16")  # serve.backend's default, auto
    fp32 = load_served_model(uri, "animals", backend="torch")
    assert (bf16.backend, bf16.precision) == ("torch", "bf16") and bf16.info()["precision"] == "bf16"
    batch = torch.stack([served.preprocess(decode_upload(png(20 + i, 12), max_pixels=10**6)) for i in range(4)])
    probs = bf16.predictor.probabilities(batch)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, fp32.predictor.probabilities(batch), atol=0.05)
    assert bf16.can_explain() is None
    (_, overlay), *_ = bf16.explain(batch[:1], 2)
    assert overlay.startswith(b"\x89PNG")


def test_auto_backend_serves_the_faster_of_the_export_and_the_weights_and_still_explains(tmp_path):
    """A version with a checked ONNX export: both are timed on a batch at load, the faster answers,
    the answers match the weights', and Grad-CAM still has the PyTorch weights."""
    from imgcls_core.export import export_model
    from imgcls_core.serving import ONNX_URI_TAG, load_served_model

    served, model_file, uri, registry, version = registered_champion(tmp_path)
    batch = torch.stack([served.preprocess(decode_upload(png(20 + i, 12), max_pixels=10**6)) for i in range(4)])
    export_model(model_file, batch, tmp_path / "export", formats=("onnx",), log=lambda _m: None)
    registry.client.log_artifacts(version.run_id, str(tmp_path / "export"), artifact_path="exports")
    registry.tag(version.version, {ONNX_URI_TAG: f"runs:/{version.run_id}/exports/model.onnx"})

    auto = load_served_model(uri, "animals", batch_size=8)
    choice = auto.choice
    assert choice["batch"] == 8 and choice["torch_ms"] > 0 and choice["onnx_ms"] > 0
    assert auto.backend == choice["chosen"] == min(("torch", "onnx"), key=lambda k: choice[f"{k}_ms"])
    assert auto.info()["backend_choice"] == choice
    eager = load_served_model(uri, "animals", backend="torch")
    assert [r[0]["index"] for r in auto.classify(batch, 3)] == [r[0]["index"] for r in eager.classify(batch, 3)]
    assert auto.can_explain() is None
    (rows, overlay), *_ = auto.explain(batch[:2], 2)
    assert overlay.startswith(b"\x89PNG") and rows[0]["index"] == eager.classify(batch[:1], 1)[0][0]["index"]


@pytest.mark.parametrize("body, error, detail", [
    (b'{"error": "too_large", "detail": "over 8 MiB"}', "too_large", "over 8 MiB"),
    (b'["a proxy", "said"]', "Bad Gateway", '["a proxy", "said"]'),  # JSON, but not the app's object
    (b'"upstream down"', "Bad Gateway", '"upstream down"'),
    (b"upstream connect error", "Bad Gateway", "upstream connect error"),
])
def test_the_client_reads_any_error_body_into_an_endpoint_error(body, error, detail):
    import requests

    from serve.client import Client, EndpointError

    response = requests.Response()
    response.status_code, response._content, response.reason = 502, body, "Bad Gateway"
    with pytest.raises(EndpointError) as raised:
        Client._check(response)
    assert (raised.value.status, raised.value.error, raised.value.detail) == (502, error, detail)


def test_the_client_prints_a_multi_label_answers_labels():
    from serve.client import format_predictions

    result = {"model": {"name": "m", "version": "2", "alias": "champion"}, "predictions": [
        {"file": "a.png", "top_k": [{"label": "3", "probability": 0.9}],
         "labels": [{"label": "3", "probability": 0.9}, {"label": "golden retriever", "probability": 0.6}],
         "threshold": 0.41},
        {"file": "b.png", "top_k": [{"label": "7", "probability": 0.2}], "labels": [], "threshold": 0.41},
        {"file": "c.png", "top_k": [{"label": "1", "probability": 0.8}]}]}
    assert format_predictions(result).splitlines() == [
        "model m v2 (@champion)",
        "  a.png: 3 0.900; labels 3|golden retriever (threshold 0.410)",
        "  b.png: 7 0.200; labels none (threshold 0.410)",
        "  c.png: 1 0.800"]
