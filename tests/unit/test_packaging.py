"""The MLflow pyfunc of imgcls: what it accepts (encoded images with missing rows, wrapped base64,
float batches but not raw pixels), how it answers many rows, and how a model file is logged."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imgcls_core.config import ModelConfig
from imgcls_core.data.preprocessing import Preprocessing
from imgcls_core.engine.checkpoint import save_inference_model
from imgcls_core.models import build_model
from imgcls_core.packaging import CLASSIFY_CHUNK, DEFAULT_TOP_K, ImgclsModel
from imgcls_core.predict import Predictor

SIZE = 16
PRE = Preprocessing(SIZE, [0.2, 0.3, 0.4], [0.3, 0.3, 0.3], 1.0, [str(i) for i in range(10)])


def save_model(path, seed: int = 0):
    """A cnn3 with non-trivial BN statistics, saved as an imgcls model file at ``path``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name="cnn3", width=0.25)
    model = build_model(cfg, len(PRE.classes), SIZE)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, SIZE, SIZE))
    return save_inference_model(path, model.eval().state_dict(), vars(cfg), PRE)


def png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("packaging") / "model.pt")


@pytest.fixture(scope="module")
def pyfunc(model_file):
    model = ImgclsModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(model_file)}))
    return model


def test_many_rows_are_classified_in_bounded_forward_passes_with_the_same_answers(pyfunc):
    images = [png(i) if i % 7 else b"not an image" for i in range(2 * CLASSIFY_CHUNK + 22)]
    batch_sizes = []
    hook = pyfunc.predictor.model.register_forward_pre_hook(lambda _m, args: batch_sizes.append(len(args[0])))
    try:
        frame = pyfunc.predict(None, images)
    finally:
        hook.remove()
    assert max(batch_sizes) <= CLASSIFY_CHUNK and len(batch_sizes) == 3
    assert sum(batch_sizes) == len(images) - len(images[::7])
    good = [i for i in range(len(images)) if i % 7]
    at_once = dict(zip(good, pyfunc.predictor.classify([images[i] for i in good], DEFAULT_TOP_K)))  # one pass
    for i, row in enumerate(frame.itertuples()):
        if i not in at_once:
            assert row.error.startswith(f"row {i}: ") and row.top_k == []
            continue
        assert pd.isna(row.error) and row.label == at_once[i][0]["label"]
        assert [r["probability"] for r in row.top_k] == pytest.approx([r["probability"] for r in at_once[i]],
                                                                      abs=1e-5)


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_missing_row_gets_its_own_error_and_the_others_are_answered(pyfunc, missing):
    good = png(1)
    encoded = base64.b64encode(good).decode()
    inputs = [[good, missing, good], pd.Series([encoded, missing, encoded]),
              pd.DataFrame({"image": [good, missing, good]})]
    for model_input in inputs:
        frame = pyfunc.predict(None, model_input)
        assert list(frame["error"].isna()) == [True, False, True], type(model_input)
        assert frame["error"][1] == "row 1: no image (a missing value)"
        assert frame["label"][0] == frame["label"][2] == pyfunc.predictor.classify([good])[0][0]["label"]
    frame = pyfunc.predict(None, [good, 3])
    assert frame["error"][1] == "row 1: expected image bytes or a base64 string, got int"


@pytest.mark.parametrize("empty", [[], pd.DataFrame({"image": []}), pd.Series([], dtype=object), pd.DataFrame()])
def test_an_empty_input_is_refused_as_no_images(pyfunc, empty):
    with pytest.raises(ValueError, match="^no images: the input is empty"):
        pyfunc.predict(None, empty)


def test_base64_wrapped_over_lines_is_decoded(pyfunc):
    good = png(2, size=48)  # long enough to wrap over several lines
    wrapped = base64.encodebytes(good).decode()
    assert wrapped.count("\n") > 2
    crlf = wrapped.replace("\n", "\r\n")
    frame = pyfunc.predict(None, [good, wrapped, crlf, " " + base64.b64encode(good).decode() + "\n"])
    assert frame["error"].isna().all(), list(frame["error"])
    assert len(set(frame["label"])) == 1
    assert frame["probability"].tolist() == pytest.approx([frame["probability"][0]] * 4, abs=1e-6)


def test_raw_pixels_are_refused_and_a_float_batch_is_answered(pyfunc):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, SIZE, SIZE), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"array of uint8 \(4, 3, 16, 16\): raw pixels .* send the images encoded"):
        pyfunc.predict(None, pixels)
    with pytest.raises(ValueError, match="raw pixels"):
        pyfunc.predict(None, {"images": pixels.astype(np.int64)})
    batch = pyfunc.predictor.preprocess([torch.from_numpy(p) for p in pixels])
    probs = pyfunc.predict(None, batch.numpy())
    assert probs.shape == (4, 10) and np.allclose(probs, pyfunc.predictor.probabilities(batch).numpy(), atol=1e-6)


def test_top_k_below_one_is_refused_and_none_means_the_default(pyfunc):
    good = png(3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"top_k must be at least 1, got {bad}"):
            pyfunc.predict(None, [good], params={"top_k": bad})
    assert len(pyfunc.predict(None, [good], params={"top_k": None})["top_k"][0]) == DEFAULT_TOP_K
    assert len(pyfunc.predict(None, [good], params={"top_k": 2})["top_k"][0]) == 2


def test_a_model_file_of_another_name_is_registered_as_model_pt_and_serves(tmp_path):
    import mlflow

    from imgcls_core.registry import Registry, register_model_file

    best = save_model(tmp_path / "ckpt" / "best.pt", seed=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("unit", artifact_location=(tmp_path / "artifacts").as_uri())
    version = register_model_file(uri, "named", best, experiment="unit")
    assert best.is_file() and sorted(p.name for p in best.parent.iterdir()) == ["best.pt"]  # left as it was

    found = Registry(uri, "named").model_file(version.version, tmp_path / "download")
    assert found.name == "model.pt" and found.read_bytes() == best.read_bytes()
    served = mlflow.pyfunc.load_model(f"models:/named/{version.version}")
    frame = served.predict([png(4)], params={"top_k": 3})
    assert frame["label"][0] == Predictor.from_file(best).classify([png(4)])[0][0]["label"]
