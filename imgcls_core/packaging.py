"""The MLflow model format of imgcls: a pyfunc over ``model.pt``, loaded with ``weights_only=True``.

No pickled Python object is stored: the model is logged "from code"
(``imgcls_core/mlflow_entry.py``) with ``model.pt`` as its artifact and the
``imgcls_core`` package as its code, so loading never unpickles a module.
Input is a float32 batch ``N x 3 x S x S`` already preprocessed as the model's
metadata says (any N: nothing is traced or exported with a fixed batch);
output is ``N x C`` class probabilities. The preprocessing (input size,
mean/std, crop ratio, class names) is stored in the model's metadata under
``imgcls`` and in ``model.pt`` itself, so a server needs nothing else.

    info = log_model(run_id, "runs/x/model.pt")
    model = mlflow.pyfunc.load_model(info.model_uri)
    probs = model.predict(Predictor.from_file(...).preprocess(images).numpy())
"""

from __future__ import annotations

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


class ImgclsModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: probabilities for a preprocessed float batch of any size."""

    def load_context(self, context) -> None:
        from imgcls_core.predict import Predictor

        self.predictor = Predictor.from_file(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a named tensor signature hands over {"images": array}
            model_input = model_input["images"] if "images" in model_input else next(iter(model_input.values()))
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        size = self.predictor.pre.image_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a float32 batch of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}")
        return self.predictor.probabilities(batch).numpy()


def model_metadata(model_file: str | Path) -> dict[str, Any]:
    payload = load_checkpoint(model_file)
    return {
        "preprocessing": payload["preprocessing"],
        "model_config": payload.get("model_config") or payload["config"]["model"],
        "metrics": payload.get("metrics", {}),
    }


def signature_for(image_size: int, num_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")]),
    )


def requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in ("torch", "torchvision", "numpy", "pillow", "pyyaml", "mlflow")]


def log_model(run_id: str, model_file: str | Path, *, extra_metadata: dict[str, Any] | None = None):
    """Log ``model_file`` as the run's pyfunc model; returns ModelInfo (registering it is the
    caller's step: Tracker.log_model, imgcls_core.registry).

    Uses the fluent API inside ``start_run(run_id=...)``, which re-opens the
    existing run; the caller's tracking URI must already be set.
    """
    meta = model_metadata(model_file)
    pre = meta["preprocessing"]
    metadata = {"imgcls": {**meta, **(extra_metadata or {})}}
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
