"""What the inference service does, without Ray or HTTP: load a registry model, decode uploads, classify.

``serve/`` wraps this in a Ray Serve deployment with a FastAPI ingress; everything
here is plain PyTorch + MLflow, so it is tested without either::

    model = load_served_model("http://127.0.0.1:5000", "digits", alias="champion")
    batch = torch.stack([model.predictor.transform(decode_upload(data, max_pixels=25_000_000))])
    model.classify(batch, top_k=3)  # [[{"label": "3", "index": 3, "probability": 0.98}, ...]]

A request's bad input becomes a :class:`RequestError` carrying the HTTP status
and a short machine-readable error code, so every client mistake is answered
4xx with ``{"error", "detail"}`` and never surfaces as a server error.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import torch

from imgcls_core.config import ServeConfig, precision_backend_error
from imgcls_core.data import CorruptImageError, ImageTooLargeError, decode_image
from imgcls_core.predict import Predictor
from imgcls_core.registry import SOURCE_RUN_TAG, Registry

TEST_METRIC_PREFIX = "test/"  # jobs.promote tags each version with its test metrics under this prefix
ONNX_URI_TAG = "export.onnx.uri"  # jobs.export tags each version with where its checked ONNX export lies
TENSORRT_URI_TAG = "export.tensorrt.uri"  # ... and its checked TensorRT engine folder (on a GPU)
INT8_URI_TAG = "export.int8.uri"  # jobs.compress: the version's int8 ONNX file, when it passed the gate
BF16_GATE_TAG = "export.bf16.acc1_delta"  # jobs.compress --method bf16: bf16's test top-1 passed the gate
EXPORT_TAG_PREFIX = "export."  # every tag above: what a version can be served with
GATE_POINTS = 1.0  # int8 or bf16 test top-1 at most this many points below fp32 to be servable
_SERVE_FIELDS = get_type_hints(ServeConfig)
PRECISIONS = get_args(_SERVE_FIELDS["precision"])  # serve.precision's values
BACKENDS = get_args(_SERVE_FIELDS["backend"])  # serve.backend's values


class RequestError(Exception):
    """A client mistake: answered with ``status`` and ``{"error": error, "detail": detail}``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


def decode_upload(data: bytes, *, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Decode one uploaded image to uint8 ``3 x H x W``, or raise :class:`RequestError` (400/413)."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise RequestError(413, "image_too_large", f"{name}: {exc}") from None
    except CorruptImageError as exc:
        kind = "empty_image" if not data else "invalid_image"
        raise RequestError(400, kind, f"{name}: {exc}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("serve.device is 'cuda' but this replica sees no CUDA device; "
                           "give replicas serve.num_gpus > 0 or set serve.device=auto")
    return torch.device(device)


@dataclass
class ServedModel:
    """One registry model version, loaded and ready to classify preprocessed batches."""

    predictor: Predictor
    name: str
    version: str
    alias: str | None
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    backend: str = "torch"
    precision: str = "fp32"
    # serve.backend=auto: the PyTorch weights kept for Grad-CAM when ONNX Runtime answers, and why
    # this backend was chosen (both timed on one batch at load)
    explainer: Predictor | None = None
    choice: dict[str, Any] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.pre.classes)

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers: identity, classes, input and the version's test metrics."""
        pre = self.predictor.pre
        metrics = {k[len(TEST_METRIC_PREFIX):]: _number(v) for k, v in self.tags.items()
                   if k.startswith(TEST_METRIC_PREFIX)}
        return {
            "name": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
            "classes": self.classes, "num_classes": len(pre.classes),
            "input_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
            "test_metrics": metrics, "device": str(self.predictor.device), "backend": self.backend,
            "precision": self.precision, **({"backend_choice": self.choice} if self.choice else {}),
            "multi_label": pre.multi_label, **({"threshold": pre.threshold} if pre.multi_label else {}),
        }

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 image -> the float ``3 x S x S`` input this version was trained for."""
        return self.predictor.transform(image)

    @property
    def multi_label(self) -> bool:
        return self.predictor.pre.multi_label

    @torch.inference_mode()
    def classify(self, batch: torch.Tensor, top_k: int) -> list[list[dict[str, Any]]]:
        """Top-k ``{"label", "index", "probability"}`` per row of a preprocessed batch, best first
        (multi-label versions rank every class: :meth:`answer` cuts the top-k)."""
        return self.predictor.classify_batch(batch, top_k)

    def answer(self, ranked: list[dict[str, Any]], top_k: int) -> dict[str, Any]:
        """One image's prediction in a response: its top-k, and for multi-label versions every class
        at or over the threshold (``labels``) and the threshold."""
        if not self.multi_label:
            return {"top_k": ranked[:top_k]}
        return {"top_k": ranked[:top_k], "labels": self.predictor.present(ranked),
                "threshold": self.predictor.pre.threshold}

    def can_explain(self) -> str | None:
        """Why this version cannot explain a prediction with Grad-CAM, or None when it can."""
        weights = self._weights()
        if weights is None:
            return f"explanations need the PyTorch weights; this version is served with serve.backend={self.backend}"
        if not getattr(weights.model, "stage_names", None):
            return f"{type(weights.model).__name__} defines no stages to explain"
        return None

    def _weights(self) -> Predictor | None:
        """The fp32 PyTorch predictor (for Grad-CAM): the one kept beside ONNX Runtime or bf16, or
        the one serving."""
        if self.explainer is not None:
            return self.explainer
        return self.predictor if self.backend == "torch" else None

    def explain(self, batch: torch.Tensor, top_k: int) -> list[tuple[list[dict[str, Any]], bytes]]:
        """Top-k rows as :meth:`classify` gives them, each with a Grad-CAM overlay (PNG bytes) of the
        top class over the preprocessed input (see imgcls_core.explain); one forward pass gives both."""
        from imgcls_core.explain import gradcam_and_logits, overlay_png, unnormalize

        weights = self._weights()
        heat, logits = gradcam_and_logits(weights.model, batch.to(weights.device))
        rows = self.predictor.rank(self.predictor.to_probabilities(logits), top_k)
        shown = unnormalize(batch, self.predictor.pre.mean, self.predictor.pre.std)
        return [(row, overlay_png(image, h)) for row, image, h in zip(rows, shown, heat)]

    def warm_up(self) -> None:
        """One forward pass on a blank image: the first real request then pays no lazy init."""
        size = self.predictor.pre.image_size
        self.classify(self.preprocess(torch.zeros(3, size, size, dtype=torch.uint8))[None], top_k=1)


def export_tags(tags: dict[str, str]) -> dict[str, str]:
    """A version's tags that decide how it is served (its checked exports and gates): when they
    change, a replica serving it loads it again."""
    return {k: v for k, v in tags.items() if k.startswith(EXPORT_TAG_PREFIX)}


def load_served_model(tracking_uri: str | None, name: str, *, alias: str | None = "champion",
                      version: str | None = None, device: str = "cpu", backend: str = "auto",
                      threads: int = 0, precision: str = "fp32", batch_size: int = 32) -> ServedModel:
    """Download and load ``models:/name@alias`` (or version ``version``) from the registry.

    ``backend="onnx"`` runs the version's ONNX export (``jobs.export`` made and checked it)
    with ONNX Runtime instead of the PyTorch weights, ``backend="tensorrt"`` its TensorRT engine
    (on the GPU); preprocessing comes from the export. ``backend="auto"`` runs the ONNX export when
    the version has one and it answers a batch of ``batch_size`` faster than PyTorch here, else the
    PyTorch weights (:func:`_fastest`). ``precision="int8"`` (onnx only) runs the version's int8
    ONNX file, ``precision="bf16"`` (torch only) its PyTorch weights under bf16 autocast; each
    only after jobs.compress tagged it servable (its test top-1 within :data:`GATE_POINTS` of fp32),
    and bf16 only on hardware with native bf16."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown serving backend {backend!r}; choose from {list(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown serve.precision {precision!r}; choose from {list(PRECISIONS)}")
    if error := precision_backend_error(precision, backend):
        raise ValueError(error)
    if precision == "bf16":
        backend = "torch"  # what auto means for bf16
    registry = Registry(tracking_uri, name)
    mv = registry.resolve(alias, version)  # LookupError when there is none; MLflow's error when failing
    explainer = choice = None
    with tempfile.TemporaryDirectory(prefix="imgcls-serve-") as tmp:  # weights end up in memory
        if backend == "onnx":
            predictor = _onnx_predictor(registry, mv, tmp, resolve_device(device), threads, precision)
        elif backend == "tensorrt":
            predictor = _tensorrt_predictor(registry, mv, tmp)
        else:
            predictor = Predictor.from_file(registry.model_file(mv.version, tmp), resolve_device(device))
            if precision == "bf16":
                predictor, explainer = _bf16_predictor(registry, mv, predictor), predictor
            elif backend == "auto":
                backend, predictor, explainer, choice = _fastest(registry, mv, tmp, predictor, threads, batch_size)
    return ServedModel(predictor, name, str(mv.version), alias if version is None else None,
                       mv.tags.get(SOURCE_RUN_TAG) or mv.run_id, dict(mv.tags), backend, precision,
                       explainer, choice)


def _fastest(registry: Registry, mv, tmp: str, weights: Predictor, threads: int,
             batch_size: int) -> tuple[str, Predictor, Predictor | None, dict[str, Any]]:
    """serve.backend=auto: ``(backend, predictor, PyTorch predictor kept for Grad-CAM, why)``.

    A version with a checked ONNX export (``jobs.export`` tags it after its parity check) is timed
    both ways on one blank batch of ``batch_size`` (best of 3 after a warm-up) on this replica's
    device and threads (:func:`time_backends`); the faster answers. Without an export the PyTorch
    weights answer."""
    if not mv.tags.get(ONNX_URI_TAG):
        return "torch", weights, None, {"chosen": "torch", "reason": "the version has no checked ONNX export "
                                        f"(python -m jobs.export --model {registry.name} --version {mv.version})"}
    onnx = _onnx_predictor(registry, mv, tmp, weights.device, threads)
    timed = time_backends({"torch": weights, "onnx": onnx}, batch_size)
    chosen = "onnx" if timed["onnx"] < timed["torch"] else "torch"
    choice = {"chosen": chosen, "batch": batch_size, **{f"{k}_ms": round(v, 3) for k, v in timed.items()},
              "reason": f"{chosen} answered a batch of {batch_size} faster"}
    return (chosen, onnx, weights, choice) if chosen == "onnx" else (chosen, weights, None, choice)


def time_backends(predictors: dict[str, Predictor], batch_size: int) -> dict[str, float]:
    """Milliseconds each predictor takes for one blank batch of ``batch_size``: best of 3 after a
    warm-up (how serve.backend=auto chooses; bench.serve_throughput makes the same choice)."""
    import time

    size = next(iter(predictors.values())).pre.image_size
    batch = torch.zeros(batch_size, 3, size, size)
    timed = {}
    for name, predictor in predictors.items():
        predictor.probabilities(batch)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            predictor.probabilities(batch)
            times.append((time.perf_counter() - started) * 1000)
        timed[name] = min(times)
    return timed


def _onnx_predictor(registry: Registry, mv, tmp: str, device: torch.device, threads: int,
                    precision: str = "fp32") -> Predictor:
    from imgcls_core.export import OnnxModule, onnx_preprocessing

    if precision == "int8":
        path = _download_tagged(registry, mv, INT8_URI_TAG, tmp, (
            f"no servable int8 file; make one with `python -m jobs.compress --model {registry.name} --version "
            f"{mv.version} --method static` (it is servable when its test top-1 is within {GATE_POINTS:g} "
            f"point of fp32) or serve serve.precision=fp32"))
    else:
        path = _download_tagged(registry, mv, ONNX_URI_TAG, tmp, (
            f"no ONNX export; make one with `python -m jobs.export --model {registry.name} --version {mv.version}` "
            f"or serve it with serve.backend=torch"))
    # The session reads the whole file now, so the temporary folder can go.
    return Predictor(OnnxModule(path, threads=threads, device=device.type), onnx_preprocessing(path), "cpu")


def _bf16_predictor(registry: Registry, mv, weights: Predictor) -> Predictor:
    """``weights`` under bf16 autocast (sharing their parameters), once the version passed the gate."""
    from imgcls_core.compress import Bf16Module, bf16_unavailable

    if BF16_GATE_TAG not in mv.tags:
        raise LookupError(f"{registry.name} v{mv.version} has not passed the bf16 gate; check it with `python -m "
                          f"jobs.compress --model {registry.name} --version {mv.version} --method bf16` (servable "
                          f"when its test top-1 is within {GATE_POINTS:g} point of fp32) or serve serve.precision=fp32")
    if (why := bf16_unavailable(weights.device)) is not None:
        raise RuntimeError(f"serve.precision=bf16: {why}")
    return Predictor(Bf16Module(weights.model), weights.pre, weights.device)


def _tensorrt_predictor(registry: Registry, mv, tmp: str) -> Predictor:
    from imgcls_core.trt_export import TensorRTModule, unavailable

    if (why := unavailable()) is not None:
        raise RuntimeError(f"serve.backend=tensorrt: {why}; give replicas serve.num_gpus > 0 on a GPU node "
                           f"or serve another backend")
    folder = _download_tagged(registry, mv, TENSORRT_URI_TAG, tmp, (
        f"no TensorRT export; make one on a GPU of the kind that serves it with `python -m jobs.export --model "
        f"{registry.name} --version {mv.version} --formats tensorrt`"))
    module = TensorRTModule(folder)  # the engine is deserialized into GPU memory now; the folder can go
    return Predictor(module, module.pre, "cuda")


def _download_tagged(registry: Registry, mv, tag: str, tmp: str, missing: str) -> str:
    """The artifact the version's ``tag`` names, downloaded into ``tmp``; LookupError("<name> v<N> has
    <missing>") when the version has no such tag."""
    import mlflow.artifacts

    uri = mv.tags.get(tag)
    if not uri:
        raise LookupError(f"{registry.name} v{mv.version} has {missing}")
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=registry.tracking_uri)


class DynamicBatcher:
    """Batches requests as Triton's dynamic batcher does: whenever a forward slot is free, the
    next batch is everything queued at that moment (up to ``max_batch_size``), without waiting.

    Under light load an image runs at once, alone; under heavy load the queue grows while the
    model is busy, so batches grow with the load and no request waits for a timer. (Ray Serve's
    ``@serve.batch`` instead seals a batch a fixed ``batch_wait_timeout_s`` after its first item,
    whatever the model is doing.) Items submitted in the same turn of the event loop (the images
    of one request) join the same batch. ``run`` maps a list of items to a list of results, one each;
    an exception fails every item of that batch. Use from one event loop.
    """

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int,
                 max_concurrent_batches: int = 1):
        if max_batch_size < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch_size and max_concurrent_batches must be >= 1")
        self._run, self.max_batch_size = run, max_batch_size
        self._free = max_concurrent_batches
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._scheduled = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((item, future))
        if not self._scheduled:  # at the end of this loop turn: the images of one request go together
            self._scheduled = True
            loop.call_soon(self._start)
        return await future

    def _start(self) -> None:
        self._scheduled = False
        while self._free and self._queue:
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.done():  # its request was cancelled (client gone, timeout)
                    batch.append((item, future))
            if batch:
                self._free -= 1
                asyncio.ensure_future(self._batch(batch))

    async def _batch(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._free += 1
            self._start()


class BatchStats:
    """Sizes of the batches a replica actually ran (thread-safe), for metrics and ``/v1/stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()

    def record(self, size: int) -> None:
        with self._lock:
            self._sizes[size] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
        batches = sum(sizes.values())
        images = sum(size * count for size, count in sizes.items())
        return {"batches": batches, "images": images, "mean_batch_size": images / batches if batches else 0.0,
                "max_batch_size": max(sizes, default=0), "histogram": {str(k): v for k, v in sizes.items()}}


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value
