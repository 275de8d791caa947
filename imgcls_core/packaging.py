"""The MLflow model format of imgcls: a pyfunc over ``model.pt``, loaded with ``weights_only=True``.

No pickled Python object is stored: the model is logged "from code"
(``imgcls_core/mlflow_entry.py``) with ``model.pt`` as its artifact and the
``imgcls_core`` package as its code, so loading never unpickles a module.
The preprocessing (input size, mean/std, crop ratio, class names) is stored in
the model's metadata under ``imgcls`` and in ``model.pt`` itself, so a server
needs nothing else. Two inputs:

- **Encoded images** (what ``mlflow models serve``, ``spark_udf`` and users
  have): raw bytes or base64 strings, as one value, a list, a 1-D array, a
  pandas Series or a DataFrame column (``image``, or the only column). Each is
  decoded, preprocessed as the model was trained and classified; the output
  is a DataFrame with a row per image: ``label``, ``probability``, ``top_k``
  (``[{"label", "probability"}]``, ``params={"top_k": k}``, default 5) and
  ``error`` (why a row that is not a decodable image has no label; the other
  rows are still answered; a missing row, None or NaN, is such a row). An input
  holding any encoded value is encoded images; base64 may be wrapped over lines
  (``base64.encodebytes``, the ``base64`` command). Images are classified
  ``CLASSIFY_CHUNK`` at a time, so memory does not grow with the number of rows.
  A multi-label model adds ``labels`` (every class at
  or over the threshold chosen on val, ``[{"label", "probability"}]``) and
  ``probabilities`` (one per class, in class order).
- **A preprocessed float32 batch** ``N x 3 x S x S`` (any N), as the metadata
  says: the output is ``N x C`` class probabilities (multi-label: per-class sigmoids).
  Integer arrays (raw uint8 pixels) are refused: send those images encoded.

An empty input (``[]``, an empty Series or DataFrame) raises ValueError ("no images").

    info = log_model(run_id, "runs/x/model.pt")
    model = mlflow.pyfunc.load_model(info.model_uri)
    model.predict([open("3.png", "rb").read()], params={"top_k": 3})   # labels
    probs = model.predict(Predictor.from_file(...).preprocess(images).numpy())
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from imgcls_core.engine.checkpoint import load_checkpoint

PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_FILE = PACKAGE_DIR / "mlflow_entry.py"
MODEL_NAME = "model"  # the logged model's name inside its run
LOGGED_FILE_NAME = "model.pt"  # the weights' name among its artifacts: what imgcls_core.registry looks for


IMAGE_COLUMNS = ("image", "images", "content", "bytes")  # a DataFrame's image column, by these names first
DEFAULT_TOP_K = 5
CLASSIFY_CHUNK = 64  # encoded rows decoded and classified per forward pass: bounds memory whatever the row count
MAX_PIXELS = 25_000_000  # per image, from its header before decoding: serve.max_pixels' default


class ImgclsModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: labels for encoded images, or probabilities for a preprocessed float batch."""

    def load_context(self, context) -> None:
        from imgcls_core.predict import Predictor

        self.predictor = Predictor.from_file(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        images = encoded_images(model_input)
        if images is not None:
            top_k = (params or {}).get("top_k")
            top_k = DEFAULT_TOP_K if top_k is None else int(top_k)
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}")
            return classify_encoded(self.predictor, images, top_k)
        return self._probabilities(model_input)

    def _probabilities(self, model_input) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a named tensor signature hands over {"images": array}
            model_input = model_input["images"] if "images" in model_input else next(iter(model_input.values()))
        array = np.asarray(model_input)
        size = self.predictor.pre.image_size
        if array.dtype.kind in "iub":  # raw pixels would be classified as if normalized: wrong answers, no error
            raise ValueError(f"got an array of {array.dtype} {tuple(array.shape)}: raw pixels are not a preprocessed "
                             f"batch; send the images encoded (PNG/JPEG bytes or base64 strings), or a float32 "
                             f"batch (N, 3, {size}, {size}) normalized as the metadata's 'preprocessing' says")
        batch = torch.as_tensor(np.asarray(array, dtype=np.float32))
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a float32 batch of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}")
        return self.predictor.probabilities(batch).numpy()


def _is_encoded(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview, str))


def _is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA: a row of a column that holds no image."""
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


NO_IMAGES = "no images: the input is empty; send one or more encoded images (bytes or base64 strings)"


def encoded_images(model_input: Any) -> list[Any] | None:
    """The encoded images in ``model_input`` (bytes or base64 strings), or None for a float batch.

    A sequence holding any encoded value (or only missing ones) is encoded images: its other rows
    are kept, and answered with a per-row ``error``. Raises ValueError on an empty input."""
    import pandas as pd

    if _is_encoded(model_input):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) == 0:
            raise ValueError(NO_IMAGES)
        named = [c for c in IMAGE_COLUMNS if c in model_input.columns]
        if not named and len(model_input.columns) != 1:
            raise ValueError(f"a DataFrame of images needs one column, or one named {' or '.join(IMAGE_COLUMNS)}; "
                             f"got columns {list(model_input.columns)}")
        model_input = model_input[named[0] if named else model_input.columns[0]]
    if isinstance(model_input, dict):
        key = next((k for k in IMAGE_COLUMNS if k in model_input), None)
        if key is None and len(model_input) == 1:
            key = next(iter(model_input))
        model_input = model_input.get(key) if key is not None else None
        if model_input is None or _is_encoded(model_input):
            return None if model_input is None else [model_input]
    if isinstance(model_input, (pd.Series, np.ndarray)):
        if model_input.dtype.kind not in "OSU":
            return None  # numbers: the preprocessed batch
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        if not model_input:
            raise ValueError(NO_IMAGES)
        if any(_is_encoded(v) for v in model_input) or all(_is_missing(v) for v in model_input):
            return list(model_input)
    return None


def _image_bytes(value: Any, row: int) -> bytes:
    """Raw image bytes from bytes or a base64 string (standard or URL-safe alphabet, wrapped over
    lines or not); ValueError naming the row for a missing value or one of another type."""
    import base64
    import binascii

    if _is_missing(value):
        raise ValueError(f"row {row}: no image (a missing value)")
    if not _is_encoded(value):
        raise ValueError(f"row {row}: expected image bytes or a base64 string, got {type(value).__name__}")
    if not isinstance(value, str):
        return bytes(value)
    text = "".join(value.split())  # MIME and the base64 command wrap lines at 76 columns
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"row {row}: a string must be a base64-encoded image") from None


def classify_encoded(predictor, images: list[Any], top_k: int, *, chunk: int = CLASSIFY_CHUNK):
    """One row per image: ``label``, ``probability``, ``top_k`` and ``error`` (see the module docstring).

    Rows are decoded and classified ``chunk`` at a time: one forward pass over every row would
    hold all their decoded images and activations at once."""
    import pandas as pd

    from imgcls_core.data import CorruptImageError, decode_image

    multi = predictor.pre.multi_label
    columns = ["label", "probability", "top_k", *(["labels", "probabilities"] if multi else []), "error"]
    rows: list[dict[str, Any]] = [{"label": None, "probability": None, "top_k": [], "error": None,
                                   **({"labels": [], "probabilities": None} if multi else {})} for _ in images]
    for start in range(0, len(images), chunk):
        decoded, where = [], []
        for i in range(start, min(start + chunk, len(images))):
            try:
                decoded.append(decode_image(_image_bytes(images[i], i), max_pixels=MAX_PIXELS, name=f"row {i}"))
                where.append(i)
            except (CorruptImageError, ValueError) as exc:
                rows[i]["error"] = str(exc)
        if decoded:  # decoded uint8 images pass through the predictor's decode as they are
            for i, ranked in zip(where, predictor.classify(decoded, top_k)):
                _answer(rows[i], predictor, ranked, top_k)
    return pd.DataFrame(rows, columns=columns)


def _answer(row: dict[str, Any], predictor, ranked: list[dict], top_k: int) -> None:
    """Fill one row from the image's ranked classes (best first)."""
    top = [{"label": r["label"], "probability": r["probability"]} for r in ranked]
    row.update(label=top[0]["label"], probability=top[0]["probability"], top_k=top[:top_k])
    if predictor.pre.multi_label:
        by_class = {r["label"]: r["probability"] for r in ranked}
        row.update(labels=[{"label": r["label"], "probability": r["probability"]} for r in predictor.present(ranked)],
                   probabilities=[by_class[c] for c in predictor.pre.classes])


def model_metadata(model_file: str | Path) -> dict[str, Any]:
    payload = load_checkpoint(model_file)
    return {
        "preprocessing": payload["preprocessing"],
        "model_config": payload.get("model_config") or payload["config"]["model"],
        "metrics": payload.get("metrics", {}),
    }


def signature_for(image_size: int, num_classes: int):
    """The ``top_k`` parameter only: an input schema would make MLflow refuse one of the two inputs
    (a tensor spec refuses image bytes, a column spec a float batch), so both are described in the
    model's metadata (``imgcls.inputs``) and checked in ``predict``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]))


def inputs_metadata(image_size: int, num_classes: int, multi_label: bool = False) -> dict[str, str]:
    columns = "label, probability, top_k, labels, probabilities, error" if multi_label else \
        "label, probability, top_k, error"
    return {
        "encoded": "image bytes or base64 strings (a list, a 1-D array, a Series, or a DataFrame column named "
                   f"image or the only column) -> DataFrame: {columns}; params: top_k",
        "preprocessed": f"float32 array (N, 3, {image_size}, {image_size}), normalized as 'preprocessing' "
                        f"says -> float32 array (N, {num_classes}) of class probabilities"
                        + (" (per-class sigmoids)" if multi_label else ""),
    }


def requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "numpy", "pillow", "pyyaml", "mlflow")]


def log_model(run_id: str, model_file: str | Path, *, extra_metadata: dict[str, Any] | None = None):
    """Log ``model_file`` as the run's pyfunc model; returns ModelInfo (registering it is the
    caller's step: Tracker.log_model, imgcls_core.registry).

    The file is logged as ``model.pt`` whatever its own name (``best.pt``, a checkpoint file):
    that is the name the registry's readers look for (:meth:`imgcls_core.registry.Registry.model_file`).

    Uses the fluent API inside ``start_run(run_id=...)``, which re-opens the
    existing run; the caller's tracking URI must already be set.
    """
    meta = model_metadata(model_file)
    pre = meta["preprocessing"]
    metadata = {"imgcls": {**meta, "inputs": inputs_metadata(pre["image_size"], len(pre["classes"]),
                                                             pre.get("multi_label", False)),
                           **(extra_metadata or {})}}
    with tempfile.TemporaryDirectory(prefix="imgcls-log-model-") as tmp:
        return _log_pyfunc(run_id, _as_model_pt(Path(model_file), Path(tmp)), pre, metadata)


def _as_model_pt(model_file: Path, tmp: Path) -> Path:
    """``model_file`` itself when it is named ``model.pt``, else a link (or copy) of it named so in ``tmp``."""
    if model_file.name == LOGGED_FILE_NAME:
        return model_file
    named = tmp / LOGGED_FILE_NAME
    try:
        os.link(model_file, named)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(model_file, named)
    return named


def _log_pyfunc(run_id: str, model_file: Path, pre: dict[str, Any], metadata: dict[str, Any]):
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The explicit signature below describes the input: no example is needed to infer one.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(ENTRY_FILE),
            artifacts={"model": str(model_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature_for(pre["image_size"], len(pre["classes"])),
            pip_requirements=requirements(),
            metadata=metadata,
        )
