"""The serving baseline: a plain FastAPI app that classifies one image per request, without batching.

    IMGCLS_NAIVE_MODEL=runs/digits/model.pt python -m uvicorn bench.naive_server:app --port 8100

What a first endpoint usually looks like: the same model file and the same
decode + preprocessing as the Serve app, the forward pass run inline for each
request. bench.serve_throughput measures it next to the Serve app.
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from imgcls_core.predict import Predictor
from imgcls_core.serving import RequestError, decode_upload

torch.set_num_threads(int(os.environ.get("IMGCLS_NAIVE_THREADS", "1")))
predictor = Predictor.from_file(os.environ["IMGCLS_NAIVE_MODEL"], device=os.environ.get("IMGCLS_NAIVE_DEVICE", "cpu"))
app = FastAPI(title="naive baseline")


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
