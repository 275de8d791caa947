"""The imgcls inference service: a Ray Serve deployment with a FastAPI ingress.

It serves ``models:/<name>@<alias>`` (default alias ``champion``) from the MLflow
registry, batches images across requests with ``@serve.batch``, autoscales
replicas, and follows the alias: each replica polls the registry, loads a new
version in a background thread, warms it up and swaps it in with one assignment.
Requests already running finish on the version they started with, and every
response names the version that served it.

    serve run serve/config.yaml                       # or: serve deploy serve/config.yaml
    python -m jobs.submit -- python -m jobs.deploy --config configs/digits_ray.yaml   # as a Ray job

Routes: ``POST /v1/predict`` (multipart files or a raw image body), ``GET /v1/model``,
``GET /v1/stats``, ``GET /healthz``, ``GET /readyz``, OpenAPI docs at ``/docs`` and a page
to try it at ``/`` (serve/page.py).
Every client mistake is a 4xx JSON ``{"error", "detail"}``; overload beyond
``max_queued_requests`` is a 503 with ``Retry-After`` from Serve's proxy.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any
from urllib.parse import quote

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from imgcls_core.config import ConfigError, ServeConfig, load_config
from imgcls_core.registry import Registry
from imgcls_core.serving import (BatchStats, DynamicBatcher, RequestError, ServedModel, decode_upload, export_tags,
                                 load_served_model)
from serve.page import PREDICT_OPENAPI, page

logger = logging.getLogger("ray.serve")

RAW_IMAGE_PREFIX, RAW_OCTETS = "image/", "application/octet-stream"  # a raw body's media types
MAX_FORM_FIELDS = 100  # non-file multipart fields per request
QUERY_PARAMETERS = ("top_k", "explain", "format")  # what /v1/predict takes; anything else is a 400
LOAD_RETRY_BASE_S, LOAD_RETRY_MAX_S = 10.0, 600.0  # back-off of a version that failed to load
# Serve's own settings when jobs.deploy starts it, as serve/config.yaml gives them to `serve run`
PROXY_LOCATION = "HeadOnly"
HTTP_OPTIONS = {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 60}
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def effective_max_ongoing(cfg: ServeConfig) -> int:
    """At least max_batch_size x max_concurrent_batches, or batches can never fill."""
    return max(cfg.max_ongoing_requests, cfg.max_batch_size * cfg.max_concurrent_batches)


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Ray Serve deployment options from the ``serve`` config section."""
    return {
        "max_ongoing_requests": effective_max_ongoing(cfg),
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "autoscaling_config": {
            "min_replicas": cfg.min_replicas,
            "initial_replicas": max(cfg.min_replicas, 1),
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
        },
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                              **({"memory": cfg.memory_mb * 2**20} if cfg.memory_mb else {})},
        # What may change without restarting replicas: which version they serve.
        "user_config": {"alias": cfg.alias, "version": cfg.version, "poll_interval_s": cfg.poll_interval_s},
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }


def build_http_app(service: ClassifierReplica) -> FastAPI:
    """The FastAPI routes of one replica (built on the replica: FastAPI apps do not pickle)."""
    api = FastAPI(
        title="imgcls",
        description="Image classification with the MLflow registry's champion model. "
                    "POST images to /v1/predict as multipart files or as a raw image body.",
        version="1",
    )

    @api.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # A bug or a failure inside the replica: JSON like every other answer, and the reason in the log.
        logger.exception("imgcls: unexpected error", exc_info=exc)
        return JSONResponse({"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @api.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @api.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page(request.scope.get("root_path", "")))

    @api.post("/v1/predict", summary="Classify images", openapi_extra=PREDICT_OPENAPI,
              description="Multipart files (any field name) or one raw image body "
                          "(Content-Type image/png, image/jpeg, ...). `?top_k=N` classes per image. "
                          "A multi-label model also answers `labels`: every class at or over its `threshold`. "
                          "`?explain=gradcam` adds each image's Grad-CAM overlay (base64 PNG); with "
                          "`&format=png` the answer is the overlay itself (one image).")
    async def predict(request: Request) -> JSONResponse:
        return await service.predict(request)

    @api.get("/v1/model", summary="The model this replica serves, and what it follows")
    async def model_info(request: Request) -> dict[str, Any]:
        return service.model_info(request)

    @api.get("/v1/stats", summary="Batch sizes formed and requests answered, by this replica")
    async def stats(request: Request) -> dict[str, Any]:
        return service.stats_info(request)

    @api.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: a model is loaded")
    async def readyz() -> dict[str, str]:
        return {"status": "ready", "model": service.name, "version": service.model.version}

    return api


class ClassifierReplica:
    """One replica: the loaded model, a batch queue, and a thread that follows the registry alias.

    A plain class, so that Ray pickles it by reference (``Classifier`` below adds the
    Serve ingress around it without copying its code into the deployment)."""

    def __init__(self, settings: dict[str, Any]):
        self.cfg = ServeConfig(**settings["serve"])
        self.tracking_uri: str | None = settings.get("tracking_uri")
        self.name: str = settings["model_name"]
        self._token = settings.get("token") or os.environ.get(self.cfg.token_env) or None
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.alias, self.version, self.poll_interval_s = self.cfg.alias, self.cfg.version, self.cfg.poll_interval_s
        # Loaded by the first reconfigure (which Serve calls before the replica is ready), so that a
        # replica started after user_config pinned a version loads that one, never the app's target.
        self.model: ServedModel | None = None
        self.stats = BatchStats()
        self.counts: dict[str, int] = {}
        self.follow = {"last_check": None, "last_error": None, "swaps": 0, "failed_load": None}
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self._forward_pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrent_batches,
                                                thread_name_prefix="forward")
        if self.cfg.batcher == "dynamic":
            self._batched = DynamicBatcher(self._run_batch, self.cfg.max_batch_size,
                                           self.cfg.max_concurrent_batches).submit
        else:
            self._batched = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                        batch_wait_timeout_s=self.cfg.batch_wait_timeout_s,
                                        max_concurrent_batches=self.cfg.max_concurrent_batches)(self._run_batch)
        self._init_metrics()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()

    # ------------------------------------------------------------------ model lifecycle

    def _load(self, version: str | None = None) -> ServedModel:
        """The version followed now (``version``: that one, already resolved), loaded and warmed up."""
        started = time.perf_counter()
        model = load_served_model(self.tracking_uri, self.name, alias=self.alias, version=version or self.version,
                                  device=self.cfg.device, backend=self.cfg.backend, threads=self.cfg.torch_threads,
                                  precision=self.cfg.precision, batch_size=self.cfg.max_batch_size)
        model.warm_up()
        model.alias = self._served_alias()
        logger.info("imgcls: loaded %s v%s (%s) in %.1f s", self.name, model.version,
                    f"@{self.alias}" if self.version is None else "pinned", time.perf_counter() - started)
        return model

    def _served_alias(self) -> str | None:
        """The alias the served version answers under: the one followed, none when pinned."""
        return self.alias if self.version is None else None

    def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        """Serve calls this with the deployment's user_config when a replica starts (always: the
        method takes ``rank``) and whenever the user_config changes: what is followed changes
        without a restart. The first call loads the model, synchronously (a version that does not
        load fails the replica's start); later ones check in the background."""
        user_config = user_config or {}
        self.alias = user_config.get("alias") or self.cfg.alias
        version = user_config.get("version", self.cfg.version)
        self.version = None if version in (None, "") else str(version)
        self.poll_interval_s = float(user_config.get("poll_interval_s", self.cfg.poll_interval_s))
        if self.model is None:
            self.model = self._load()
            self.version_gauge.set(_version_number(self.model.version))
            threading.Thread(target=self._follow_alias, name="follow-alias", daemon=True).start()
            return
        self.follow["failed_load"] = None  # a new target: no back-off from the old one
        self._wake.set()  # check now, in the background

    def _target(self):
        """The registry's ModelVersion followed now: the pinned one, or the alias's."""
        registry = Registry(self.tracking_uri, self.name)
        if self.version is not None:
            return registry.version(self.version)
        found = registry.alias(self.alias)
        if found is None:
            raise LookupError(f"{self.name!r} has no version with alias {self.alias!r}")
        return found

    def check_for_new_version(self) -> bool:
        """Load and swap in the version the alias points at now, if it is not the one served, or
        the served one again when its exports changed (``jobs.export`` / ``jobs.compress`` tagged
        it after it was loaded: the backend may change); its other tags (test metrics) and the
        alias it answers under are refreshed in place.

        A version that fails to load (a broken artifact, an export it lacks, a GPU it needs) is not
        downloaded again at every poll: it is retried after 10 s, then 20 s, 40 s ... up to 10 min,
        and ``/v1/model`` reports it under ``following.failed_load`` meanwhile; the replica keeps
        serving the version it has."""
        with self._swap_lock:
            now = time.time()
            self.follow["last_check"] = now
            mv = self._target()
            target, served = str(mv.version), self.model
            if target == served.version and export_tags(mv.tags) == export_tags(served.tags):
                self.follow["failed_load"] = None
                if served.tags != dict(mv.tags) or served.alias != self._served_alias():
                    self.model = dataclasses.replace(served, tags=dict(mv.tags), alias=self._served_alias())
                return False
            failed = self.follow.get("failed_load")
            if failed and failed["version"] == target and now < failed["retry_at"]:
                return False  # backing off
            try:
                new = self._load(target)  # the version just resolved (the alias may move meanwhile)
            except Exception as exc:
                attempts = failed["attempts"] + 1 if failed and failed["version"] == target else 1
                delay = min(LOAD_RETRY_MAX_S, LOAD_RETRY_BASE_S * 2 ** (attempts - 1))
                self.follow["failed_load"] = {"version": target, "error": f"{type(exc).__name__}: {exc}",
                                              "attempts": attempts, "retry_in_s": delay, "retry_at": now + delay}
                raise
            self.follow["failed_load"] = None
            old = self.model
            self.model = new  # one assignment: requests that started on `old` finish on it
            self.follow["swaps"] += 1
            self.version_gauge.set(_version_number(new.version))
            logger.info("imgcls: now serving %s v%s (was v%s)", self.name, new.version, old.version)
            return True

    def _next_check_s(self) -> float | None:
        """Seconds until the next registry check: the poll interval, or less when a failed load's
        retry is due sooner (also with polling off); None: only when woken (reconfigure)."""
        waits = [self.poll_interval_s] if self.poll_interval_s > 0 else []
        if failed := self.follow.get("failed_load"):
            waits.append(max(0.05, failed["retry_at"] - time.time()))
        return min(waits) if waits else None

    def _follow_alias(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._next_check_s())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_for_new_version()
                self.follow["last_error"] = None
            except Exception as exc:  # a registry outage must not take serving down  # noqa: BLE001
                self.follow["last_error"] = f"{type(exc).__name__}: {exc}"
                logger.warning("imgcls: could not check the registry: %s", self.follow["last_error"])

    def check_health(self) -> None:
        """Serve's health check: a tiny real inference."""
        self.model.warm_up()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            self._wake.set()

    # ------------------------------------------------------------------ metrics

    def _init_metrics(self) -> None:
        from ray.serve import metrics

        self.latency = metrics.Histogram("imgcls_request_latency_s", description="Request latency by route",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("route", "status"))
        self.batch_size_hist = metrics.Histogram("imgcls_batch_size", description="Images per forward pass",
                                                 boundaries=BATCH_BOUNDARIES)
        self.input_errors = metrics.Counter("imgcls_input_errors", description="Rejected inputs by kind",
                                            tag_keys=("kind",))
        self.images_served = metrics.Counter("imgcls_images", description="Images classified")
        self.version_gauge = metrics.Gauge("imgcls_model_version", description="Registry version being served")

    def _count(self, route: str, status: int, started: float, error: str | None = None) -> None:
        self.latency.observe(time.perf_counter() - started, tags={"route": route, "status": str(status)})
        key = f"{route} {status}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if error is not None:
            self.input_errors.inc(tags={"kind": error})

    # ------------------------------------------------------------------ inference

    async def _run_batch(self, items: list[tuple[torch.Tensor, ServedModel, int, bool]]) -> list[Any]:
        """``(input, version, top_k, explain)`` items collected by the batcher: one forward pass per
        version present (normally one), each item's top-k of it; the items to explain go through
        one Grad-CAM pass of their own and get ``(top_k rows, overlay PNG)``."""
        self.stats.record(len(items))
        self.batch_size_hist.observe(len(items))
        results: list[Any] = [None] * len(items)
        loop = asyncio.get_running_loop()
        groups = {(id(m), e): (m, e) for _, m, _, e in items}
        answered = 0
        for model, explain in groups.values():
            idx = [i for i, (_, m, _, e) in enumerate(items) if m is model and e == explain]
            batch = torch.stack([items[i][0] for i in idx])
            top_k = max(items[i][2] for i in idx)
            try:
                out = await loop.run_in_executor(self._forward_pool, model.explain if explain else model.classify,
                                                 batch, top_k)
            except Exception as exc:  # noqa: BLE001 - this group's requests fail; the others' answers stand
                out = [exc] * len(idx)
            else:
                answered += len(idx)
            for i, row in zip(idx, out):  # ranked to the largest top_k (multi-label: all); _predict cuts
                results[i] = row
        self.images_served.inc(answered)
        return results

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise RequestError(401, "unauthorized", "send 'Authorization: Bearer <token>'",
                               headers={"WWW-Authenticate": 'Bearer realm="imgcls"'})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise RequestError(413, "body_too_large", f"the body is {declared[:20]} bytes; the limit is {limit:,}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, "body_too_large", f"the body is over the limit of {limit:,} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # no one to answer; counted as the client's doing, not a server error
            raise RequestError(499, "client_disconnected", f"the client left after {size:,} bytes") from None
        return b"".join(chunks)

    async def _uploads(self, request: Request) -> list[tuple[str, bytes]]:
        """``(name, bytes)`` of every image in the request, within the size and count limits."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "multipart/form-data" and not (
                content_type.startswith(RAW_IMAGE_PREFIX) or content_type == RAW_OCTETS):  # before reading the body
            raise RequestError(415, "unsupported_media_type",
                               f"Content-Type {content_type!r}: send image files as multipart/form-data "
                               f"(curl -F file=@x.png) or one raw image (Content-Type: image/png, image/jpeg, ...)")
        body = await self._read_body(request)
        if content_type == "multipart/form-data":
            return await self._multipart(request, body)
        if not body:
            raise RequestError(400, "empty_body", "the request has no image")
        return [("body", body)]

    async def _multipart(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        async def stream():
            yield body

        try:  # the parser itself stops at the limits: a body of 100,000 tiny parts is refused at part 33
            form = await MultiPartParser(request.headers, stream(), max_files=self.cfg.max_files,
                                         max_fields=MAX_FORM_FIELDS, max_part_size=self.cfg.max_body_bytes).parse()
        except MultiPartException as exc:
            if str(exc).startswith("Too many files"):
                raise RequestError(413, "too_many_files", f"more than {self.cfg.max_files} files; at most "
                                                          f"{self.cfg.max_files} per request") from None
            if str(exc).startswith("Too many fields"):
                raise RequestError(413, "too_many_fields", f"more than {MAX_FORM_FIELDS} non-file fields") from None
            raise RequestError(400, "malformed_multipart", str(exc)) from None
        files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        try:
            if not files:
                raise RequestError(400, "no_images", "the multipart body has no file part; "
                                                     "send images as files (curl -F file=@x.png)")
            return [(upload.filename or key, await upload.read()) for key, upload in files]
        finally:
            await form.close()

    def _top_k(self, request: Request, model: ServedModel) -> int:
        raw = request.query_params.get("top_k")
        if raw is None:
            return min(self.cfg.top_k, len(model.classes))
        # ASCII digits only: str.isdigit() alone also takes "²", which int() refuses, and int() of
        # thousands of digits raises
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= len(model.classes):
            raise RequestError(400, "invalid_parameter",
                               f"top_k must be an integer from 1 to {len(model.classes)}, got {raw!r}")
        return int(raw)

    def _explain(self, request: Request, model: ServedModel) -> str | None:
        """``?explain=gradcam`` (the overlay as base64 PNG in the JSON) or with ``&format=png`` (the
        overlay itself, for one image); None without ``explain``."""
        explain, fmt = request.query_params.get("explain"), request.query_params.get("format")
        if explain is None:
            if fmt is not None:
                raise RequestError(400, "invalid_parameter", "format goes with explain=gradcam")
            return None
        if explain != "gradcam":
            raise RequestError(400, "invalid_parameter", f"explain must be gradcam, got {explain!r}")
        if fmt not in (None, "json", "png"):
            raise RequestError(400, "invalid_parameter", f"format must be json or png, got {fmt!r}")
        if (why := model.can_explain()) is not None:
            raise RequestError(400, "explain_unavailable", why)
        return fmt or "json"

    def _prepare(self, model: ServedModel, name: str, data: bytes) -> torch.Tensor:
        return model.preprocess(decode_upload(data, max_pixels=self.cfg.max_pixels, name=name))

    async def _predict(self, request: Request) -> dict[str, Any] | Response:
        self._authorize(request)
        unknown = sorted(set(request.query_params) - set(QUERY_PARAMETERS))
        repeated = sorted({k for k in request.query_params if len(request.query_params.getlist(k)) > 1})
        if unknown or repeated:
            what = f"unknown parameter(s) {unknown}" if unknown else f"parameter(s) {repeated} given more than once"
            raise RequestError(400, "invalid_parameter", f"{what}; /v1/predict takes {', '.join(QUERY_PARAMETERS)}")
        model = self.model  # this request is answered by this version, whatever swaps meanwhile
        top_k = self._top_k(request, model)
        explain = self._explain(request, model)
        uploads = await self._uploads(request)
        if explain == "png" and len(uploads) != 1:
            raise RequestError(400, "invalid_parameter",
                               f"format=png answers one image; this request has {len(uploads)} (use format=json)")
        loop = asyncio.get_running_loop()
        inputs = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._prepare, model, name, data)
                                        for name, data in uploads))
        rows = await asyncio.gather(*(self._batched((x, model, top_k, explain is not None)) for x in inputs))
        if failed := next((row for row in rows if isinstance(row, Exception)), None):
            raise failed  # its forward pass failed (the batch's other requests may have their answers)
        identity = {"name": model.name, "version": model.version, "alias": model.alias}
        if explain == "png":
            (top, png), = rows
            return Response(png, media_type="image/png", headers={
                "X-Imgcls-Label": quote(top[0]["label"]), "X-Imgcls-Probability": f"{top[0]['probability']:.6f}",
                "X-Imgcls-Model": f"{model.name}/{model.version}"})
        predictions = []
        for (name, _), row in zip(uploads, rows):
            if explain:
                ranked, png = row
                predictions.append({"file": name, **model.answer(ranked, top_k), "gradcam": {
                    "label": ranked[0]["label"], "png_base64": base64.b64encode(png).decode()}})
            else:
                predictions.append({"file": name, **model.answer(row, top_k)})
        return {"model": identity, "predictions": predictions}

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(self._predict(request), timeout=self.cfg.request_timeout_s)
        except RequestError as exc:
            self._count("predict", exc.status, started, exc.error)
            raise
        except asyncio.TimeoutError:
            self._count("predict", 504, started, "timeout")
            raise RequestError(504, "timeout", f"not answered within {self.cfg.request_timeout_s} s",
                               headers={"Retry-After": str(max(1, round(self.cfg.retry_after_s)))}) from None
        except asyncio.CancelledError:  # Serve cancelled it (the client went away): no answer is sent
            self._count("predict", 499, started, "cancelled")
            raise
        except Exception:
            self._count("predict", 500, started, "internal_error")  # answered by the app's JSON 500 handler
            raise
        self._count("predict", 200, started)
        return result if isinstance(result, Response) else JSONResponse(result)

    # ------------------------------------------------------------------ introspection

    def model_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        following = {"alias": self.alias if self.version is None else None, "pinned_version": self.version,
                     "poll_interval_s": self.poll_interval_s, **self.follow}
        return {**self.model.info(), "following": following}

    def stats_info(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"replica": serve.get_replica_context().replica_id.unique_id, "batches": self.stats.snapshot(),
                "requests": dict(sorted(self.counts.items())), "version": self.model.version}


@serve.deployment(name="Classifier")
@serve.ingress()
class Classifier(ClassifierReplica):
    """The Serve deployment: a ClassifierReplica with its FastAPI routes."""


def _version_number(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return -1.0


SETTINGS_KEYS = ("config", "tracking_uri", "overrides")
DEFAULT_MODEL_NAME = "imgcls"  # as jobs.promote


def resolve_settings(args: dict[str, Any]) -> dict[str, Any]:
    """Builder arguments -> the replicas' settings (a plain dict that pickles).

    ``args`` holds ``config`` (a YAML file), ``tracking_uri``, ``overrides``
    (``["serve.max_batch_size=64", ...]``) and/or any ``serve`` key by its short name.
    """
    short = {f.name for f in fields(ServeConfig)}
    unknown = sorted(set(args) - short - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(f"unknown serve argument(s) {unknown}; expected {list(SETTINGS_KEYS)} "
                          f"or serve keys: {sorted(short)}")
    overrides = list(args.get("overrides") or [])
    overrides += [f"serve.{k}={'null' if v is None else v}" for k, v in args.items() if k in short]
    cfg = load_config(args.get("config"), overrides)
    name = cfg.serve.model_name or cfg.tracking.register_as or DEFAULT_MODEL_NAME
    tracking_uri = args.get("tracking_uri") or cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return {"serve": asdict(cfg.serve), "tracking_uri": tracking_uri, "model_name": name,
            "token": os.environ.get(cfg.serve.token_env) or None}


def application(settings: dict[str, Any]) -> serve.Application:
    """The Serve application for resolved settings (see :func:`resolve_settings`)."""
    return Classifier.options(**deployment_options(ServeConfig(**settings["serve"]))).bind(settings)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder named by serve/config.yaml (``import_path: serve.app:build_app``)."""
    return application(resolve_settings(args))
