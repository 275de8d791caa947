"""The serving baseline: a plain FastAPI app that classifies one image per request, without batching.

    IMGCLS_NAIVE_MODEL=runs/digits/model.pt python -m uvicorn bench.naive_server:app --port 8100

What a first endpoint usually looks like: the same model file and the same
decode + preprocessing as the Serve app, the forward pass run inline for each
request. It runs the backend and precision the served mode runs, so that a
served / naive ratio credits Serve with nothing the runtime or the dtype gives:
``IMGCLS_NAIVE_PRECISION=bf16`` runs the PyTorch weights under bf16 autocast (as
``serve.precision=bf16`` does), ``IMGCLS_NAIVE_BACKEND=onnx`` with
``IMGCLS_NAIVE_ONNX=<model.onnx>`` runs the model's ONNX export with ONNX Runtime (as
``serve.backend=onnx``, or ``auto`` when it chose ONNX Runtime, does).
bench.serve_throughput measures it next to the Serve app.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from imgcls_core.predict import Predictor
from imgcls_core.serving import RequestError, decode_upload

NAIVE_BACKENDS = ("torch", "onnx")
NAIVE_PRECISIONS = ("fp32", "bf16")


def load_predictor(model_file: str | Path, *, device: str = "cpu", backend: str = "torch", precision: str = "fp32",
                   onnx_file: str | Path | None = None, threads: int = 1) -> Predictor:
    """The model file as the Serve app's replica runs it for ``backend`` / ``precision``
    (imgcls_core.serving.load_served_model: bf16 autocast over the fp32 weights; ONNX Runtime
    on the version's ONNX export with its preprocessing)."""
    if backend not in NAIVE_BACKENDS or precision not in NAIVE_PRECISIONS or (backend, precision) == ("onnx", "bf16"):
        raise ValueError(f"the naive server runs torch fp32/bf16 or onnx fp32, not {backend} {precision}")
    if backend == "onnx":
        from imgcls_core.export import OnnxModule, onnx_preprocessing

        if onnx_file is None:
            raise ValueError("backend onnx needs the model's ONNX export (onnx_file)")
        return Predictor(OnnxModule(onnx_file, threads=threads, device=torch.device(device).type),
                         onnx_preprocessing(onnx_file), "cpu")
    predictor = Predictor.from_file(model_file, device=device)
    if precision == "bf16":
        from imgcls_core.compress import Bf16Module, bf16_unavailable

        if (why := bf16_unavailable(predictor.device)) is not None:
            raise RuntimeError(f"bf16: {why}")
        return Predictor(Bf16Module(predictor.model), predictor.pre, predictor.device)
    return predictor


app = FastAPI(title="naive baseline")
predictor: Predictor | None = None
if "IMGCLS_NAIVE_MODEL" in os.environ:  # started by uvicorn (bench.serve_throughput imports load_predictor alone)
    torch.set_num_threads(int(os.environ.get("IMGCLS_NAIVE_THREADS", "1")))
    predictor = load_predictor(os.environ["IMGCLS_NAIVE_MODEL"], device=os.environ.get("IMGCLS_NAIVE_DEVICE", "cpu"),
                               backend=os.environ.get("IMGCLS_NAIVE_BACKEND", "torch"),
                               precision=os.environ.get("IMGCLS_NAIVE_PRECISION", "fp32"),
                               onnx_file=os.environ.get("IMGCLS_NAIVE_ONNX") or None,
                               threads=int(os.environ.get("IMGCLS_NAIVE_THREADS", "1")))


@app.post("/v1/predict")
async def predict(request: Request) -> JSONResponse:
    try:
        image = decode_upload(await request.body(), max_pixels=25_000_000)
    except RequestError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    probs = predictor.probabilities(predictor.transform(image)[None])[0]
    values, indices = probs.topk(min(5, probs.numel()))
    return JSONResponse({"predictions": [{"top_k": [
        {"label": predictor.pre.classes[i], "index": int(i), "probability": float(p)}
        for p, i in zip(values.tolist(), indices.tolist())]}]})
