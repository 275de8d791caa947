"""The Serve app on the shared local Ray instance: a real MLflow registry, real HTTP, real PNG digits.

One module-scoped deployment (bearer token on, alias polled every second) serves
a cnn3 trained on the digits in this module; a second, deliberately tiny one
takes the overload burst.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imgcls_core.config import load_config
from jobs.common import free_port
from tests.fuzz_corpus import build_corpus, run_isolated

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "digits-serve"
TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def train_and_register(digits_root, tmp, uri: str, seed: int, epochs: int) -> tuple[str, str]:
    """Train a cnn3 locally, log it to MLflow and register it: (version, model file)."""
    from imgcls_core.registry import register_model_file
    from imgcls_core.runner import train_and_evaluate

    cfg = load_config(None, ["data.format=digits", f"data.root={digits_root}", "data.batch_size=64",
                             "model.name=cnn3", "optim.lr=0.1", "augment.strength=0", f"train.epochs={epochs}",
                             f"train.seed={seed}", f"train.output_dir={tmp / f'run{seed}'}"])
    result = train_and_evaluate(cfg, log=lambda _line: None)
    version = register_model_file(uri, MODEL, result.files["model"], experiment="serve", run_name=f"seed{seed}",
                                  tags=result.test.metrics("test/"))
    return str(version.version), str(result.files["model"])


@pytest.fixture(scope="module")
def registry(digits_root, tmp_path_factory):
    from imgcls_core.registry import CHAMPION, Registry

    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version, model_file = train_and_register(digits_root, tmp, uri, seed=0, epochs=6)
    Registry(uri, MODEL).set_alias(CHAMPION, version)
    return {"uri": uri, "tmp": tmp, "model_file": model_file}


@pytest.fixture(scope="module")
def serve_url(ray_session, registry):
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25, "poll_interval_s": 1.0}
    import os

    os.environ["IMGCLS_SERVE_TOKEN"] = TOKEN  # read by the builder, handed to the replicas
    try:
        serve.run(build_app({**common, "max_batch_size": 16, "batch_wait_timeout_s": 0.02, "max_files": 40,
                             "max_body_bytes": 2_000_000, "max_pixels": 4_000_000, "max_replicas": 1}),
                  name="imgcls", route_prefix="/")
    finally:
        del os.environ["IMGCLS_SERVE_TOKEN"]
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def png(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **kw)
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def post(url: str, files=None, data=None, headers=None, params=None, timeout=60) -> requests.Response:
    return requests.post(f"{url}/v1/predict", files=files, data=data, headers={**AUTH, **(headers or {})},
                         params=params, timeout=timeout)


def served_top1(url: str, files, *, version: str, alias: str | None = "champion") -> list[int]:
    """Top-1 class index for each file, sent 8 per request from 8 threads (so batches form)."""
    def classify(chunk):
        r = post(url, files=[("file", (f.name, f.read_bytes(), "image/png")) for f in chunk],
                 params={"top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == {"name": MODEL, "version": version, "alias": alias}
        assert [p["file"] for p in body["predictions"]] == [f.name for f in chunk]
        assert all(len(p["top_k"]) == 3 for p in body["predictions"])
        return [p["top_k"][0]["index"] for p in body["predictions"]]

    chunks = [files[i:i + 8] for i in range(0, len(files), 8)]
    with ThreadPoolExecutor(8) as pool:
        return [i for part in pool.map(classify, chunks) for i in part]


def test_served_top1_matches_offline_core_image_for_image(serve_url, registry, digits_root):
    from imgcls_core.predict import Predictor

    files = sorted((digits_root / "test").glob("*/*.png"))
    labels = [int(f.parent.name) for f in files]
    offline = [p[0]["index"] for p in Predictor.from_file(registry["model_file"]).classify(files, top_k=1)]
    served = served_top1(serve_url, files, version="1")
    accuracy = float(np.mean(np.array(served) == np.array(labels)))
    assert accuracy >= 0.97, accuracy
    assert served == offline  # image for image

    raw = requests.post(f"{serve_url}/v1/predict", data=files[0].read_bytes(),
                        headers={**AUTH, "Content-Type": "image/png"}, timeout=30)
    assert raw.status_code == 200 and raw.json()["predictions"][0]["top_k"][0]["index"] == offline[0]

    stats = requests.get(f"{serve_url}/v1/stats", headers=AUTH, timeout=10).json()
    assert stats["batches"]["images"] >= len(files)
    assert stats["batches"]["max_batch_size"] > 1, stats  # batches really formed across requests
    assert stats["batches"]["max_batch_size"] <= 16

    info = requests.get(f"{serve_url}/v1/model", headers=AUTH, timeout=10).json()
    assert info["name"] == MODEL and info["version"] == "1" and info["alias"] == "champion"
    assert info["classes"] == [str(i) for i in range(10)] and info["input_size"] == 32
    assert info["test_metrics"]["acc1"] >= 0.97
    assert requests.get(f"{serve_url}/readyz", timeout=10).json()["version"] == "1"
    assert requests.get(f"{serve_url}/docs", timeout=10).status_code == 200
    assert "/v1/predict" in requests.get(f"{serve_url}/openapi.json", timeout=10).json()["paths"]


def test_the_registered_model_takes_image_bytes_and_agrees_with_the_endpoint(serve_url, registry, digits_root):
    """The registered version as a plain MLflow pyfunc, given encoded images (raw bytes, base64 in a
    DataFrame column): the same top-1 as the Serve app for every test file, labels with
    probabilities, and a row that is not an image gets its error while the others are answered."""
    import base64

    import mlflow
    import pandas as pd

    files = sorted((digits_root / "test").glob("*/*.png"))
    served = served_top1(serve_url, files, version="1")
    mlflow.set_tracking_uri(registry["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    classes = model.metadata.metadata["imgcls"]["preprocessing"]["classes"]
    out = model.predict([f.read_bytes() for f in files], params={"top_k": 3})
    assert list(out.columns) == ["label", "probability", "top_k", "error"] and len(out) == len(files)
    assert [classes.index(label) for label in out["label"]] == served  # image for image
    assert out["error"].isna().all() and all(len(top) == 3 for top in out["top_k"])
    assert all(top[0]["label"] == label and top[0]["probability"] == pytest.approx(p)
               for top, label, p in zip(out["top_k"], out["label"], out["probability"]))

    frame = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files[:5]]
                          + [base64.b64encode(b"not an image").decode()]})
    mixed = model.predict(frame)
    assert [classes.index(label) for label in mixed["label"][:5]] == served[:5]
    assert pd.isna(mixed["label"][5]) and "row 5" in mixed["error"][5]


def test_explain_gradcam_returns_the_overlay_with_the_same_answer(serve_url, registry, digits_root):
    """?explain=gradcam: the prediction as without it, plus a Grad-CAM overlay PNG of the model's
    input size (base64 in the JSON, or the PNG itself with format=png); bad values are 400 JSON."""
    import base64

    files = [sorted((digits_root / "test" / str(d)).glob("*.png"))[0] for d in (3, 8)]
    upload = [("file", (f.name, f.read_bytes(), "image/png")) for f in files]
    plain = post(serve_url, files=upload, params={"top_k": 2})
    explained = post(serve_url, files=upload, params={"top_k": 2, "explain": "gradcam"})
    assert plain.status_code == 200 and explained.status_code == 200, explained.text
    size = requests.get(f"{serve_url}/v1/model", headers=AUTH, timeout=10).json()["input_size"]
    for p, e in zip(plain.json()["predictions"], explained.json()["predictions"]):
        assert [t["index"] for t in e["top_k"]] == [t["index"] for t in p["top_k"]]
        assert e["gradcam"]["label"] == p["top_k"][0]["label"]
        image = Image.open(io.BytesIO(base64.b64decode(e["gradcam"]["png_base64"])))
        assert image.format == "PNG" and image.size == (size, size)

    one = post(serve_url, files=upload[:1], params={"explain": "gradcam", "format": "png"})
    assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    assert one.headers["x-imgcls-label"] == plain.json()["predictions"][0]["top_k"][0]["label"]
    assert Image.open(io.BytesIO(one.content)).size == (size, size)
    for sent, params, detail in ((upload, {"explain": "gradcam", "format": "png"}, "format=png answers one image"),
                                 (upload[:1], {"explain": "shap"}, "explain must be gradcam"),
                                 (upload[:1], {"format": "png"}, "format goes with explain=gradcam"),
                                 (upload[:1], {"explain": "gradcam", "format": "gif"}, "format must be json or png")):
        bad = post(serve_url, files=sent, params=params)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_parameter", (params, bad.text)
        assert detail in bad.json()["detail"]


def test_mlflow_models_serve_answers_a_real_png(registry, digits_root, tmp_path):
    """`mlflow models serve` (--env-manager local) on the registered version: a real PNG, base64 in
    a dataframe_split request, comes back with its label and top_k probabilities."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    digit = sorted((digits_root / "test" / "7").glob("*.png"))[0]
    log = open(tmp_path / "models_serve.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        # MLflow starts its server as `uvicorn` from PATH: the venv's bin first, as an activated venv has it
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
             "MLFLOW_TRACKING_URI": registry["uri"]}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "models_serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(digit.read_bytes()).decode()]]},
                "params": {"top_k": 2}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        (row,) = answer.json()["predictions"]
        assert row["label"] == "7" and row["error"] is None, row
        assert len(row["top_k"]) == 2 and row["top_k"][0] == {"label": "7", "probability": row["probability"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def hostile_cases(digit_png: bytes) -> dict[str, dict]:
    """name -> requests.post kwargs, and whether it is a valid image that must be served (200)."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((48, 40, 3)) * 255).astype(np.uint8)
    photo = Image.fromarray(rgb)
    exif = photo.getexif()
    exif[0x0112] = 6
    frames = [photo.convert("P"), photo.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])

    def with_size(data: bytes, width: int, height: int) -> bytes:
        """A real PNG whose header declares another size (IHDR patched, CRC fixed)."""
        ihdr = bytearray(data[12:29])
        ihdr[4:12] = struct.pack(">II", width, height)
        return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]

    huge, zero = with_size(digit_png, 100_000, 100_000), with_size(digit_png, 0, 0)

    def file(data: bytes, ctype: str = "application/octet-stream", name: str = "x"):
        return {"files": [("file", (name, data, ctype))]}

    def raw(data: bytes, ctype: str):
        return {"data": data, "headers": {"Content-Type": ctype}}

    return {
        "empty body": (raw(b"", "image/png"), 400),
        "empty file part": (file(b""), 400),
        "not an image": (file(b"this is plain text, not pixels" * 10, "text/plain"), 400),
        "truncated png": (file(digit_png[: len(digit_png) // 2], "image/png"), 400),
        "zero-size png": (file(zero, "image/png"), 400),
        "huge dimensions": (file(huge, "image/png"), 413),
        "cmyk jpeg": (file(encode(photo.convert("CMYK"), "JPEG"), "image/jpeg"), 200),
        "16-bit png": (file(png((rng.random((30, 30)) * 65535).astype(np.uint16)), "image/png"), 200),
        "palette png": (file(encode(photo.convert("P"), "PNG"), "image/png"), 200),
        "animated gif": (file(gif.getvalue(), "image/gif"), 200),
        "exif-rotated jpeg": (file(encode(photo, "JPEG", exif=exif.tobytes()), "image/jpeg"), 200),
        "grayscale png": (file(encode(photo.convert("L"), "PNG"), "image/png"), 200),
        "webp": (raw(encode(photo, "WEBP"), "image/webp"), 200),
        "wrong content type": (raw(digit_png, "application/json"), 415),
        "octet-stream with a suffix": (raw(digit_png, "application/octet-streamxyz"), 415),
        "oversize body": (raw(b"\x89PNG" + bytes(2_100_000), "image/png"), 413),
        "malformed multipart": ({"data": b"--zzz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n"
                                         b"\r\nabc",  # never closed, wrong boundary
                                 "headers": {"Content-Type": "multipart/form-data; boundary=yyy"}}, 400),
        "multipart without files": ({"files": {"note": (None, "no image here")}}, 400),
        "form-urlencoded": ({"data": {"image": "3.png"}}, 415),
        "too many files": ({"files": [("file", (f"{i}.png", digit_png, "image/png")) for i in range(41)]}, 413),
        "many tiny parts": ({"files": [("file", (f"{i}", b"x", "image/png")) for i in range(5000)]}, 413),
        "many form fields": ({"files": [*file(digit_png, "image/png")["files"],
                                        *((f"f{i}", (None, "v")) for i in range(150))]}, 413),
        # a few KB, within the pixel cap, 2,000,000:1: answered at the cost of its pixels, not of its shape
        "1 x 2,000,000 png": (file(png(np.full((2_000_000, 1), 128, np.uint8)), "image/png"), 200),
        "2,000,000 x 1 png": (file(png(np.full((1, 2_000_000), 128, np.uint8)), "image/png"), 200),
        "unknown parameter": ({**file(digit_png, "image/png"), "params": {"topk": "3"}}, 400),
        "repeated parameter": ({**file(digit_png, "image/png"), "params": [("top_k", "1"), ("top_k", "2")]}, 400),
        "bad top_k": ({**file(digit_png, "image/png"), "params": {"top_k": "eleven"}}, 400),
        "top_k too large": ({**file(digit_png, "image/png"), "params": {"top_k": "11"}}, 400),
        "top_k of a unicode digit": ({**file(digit_png, "image/png"), "params": {"top_k": "\u00b2"}}, 400),
        "top_k of 5,000 digits": ({**file(digit_png, "image/png"), "params": {"top_k": "9" * 5000}}, 400),
        "missing token": ({**file(digit_png, "image/png"), "headers": {"Authorization": ""}}, 401),
        "wrong token": ({**file(digit_png, "image/png"), "headers": {"Authorization": "Bearer nope"}}, 401),
    }


def test_hostile_inputs_get_4xx_json_and_the_service_stays_healthy(serve_url, digits_root):
    digit = sorted((digits_root / "test").glob("3/*.png"))[0].read_bytes()
    outcomes = {}
    for name, (kwargs, expected) in hostile_cases(digit).items():
        r = post(serve_url, **kwargs)
        outcomes[name] = r.status_code
        assert r.status_code == expected, (name, r.status_code, r.text)
        body = r.json()
        if expected == 200:
            top = body["predictions"][0]["top_k"]
            assert len(top) == 5 and abs(sum(p["probability"] for p in top) - 1) < 0.5, (name, body)
        else:
            assert set(body) == {"error", "detail"} and body["detail"], (name, body)
    assert len(outcomes) >= 15 and all(code < 500 for code in outcomes.values()), outcomes
    assert requests.get(f"{serve_url}/v1/model", timeout=10).status_code == 401
    assert requests.get(f"{serve_url}/nowhere", timeout=10).json()["error"] == "not_found"
    assert requests.get(f"{serve_url}/healthz", timeout=10).status_code == 200
    ok = post(serve_url, files=[("file", ("3.png", digit, "image/png"))])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top_k"][0]["label"] == "3"


class Metric:
    """Stands in for a ray.serve.metrics metric: records its calls' tags."""

    def __init__(self):
        self.calls = []

    def observe(self, value=None, tags=None):
        self.calls.append(tags)

    inc = observe


def stand_in_replica():
    """A ClassifierReplica's request handling without Ray, a registry or a model."""
    from imgcls_core.config import ServeConfig
    from serve.app import ClassifierReplica

    replica = object.__new__(ClassifierReplica)
    replica.cfg, replica.counts, replica.follow = ServeConfig(), {}, {"failed_load": None}
    replica.latency, replica.input_errors = Metric(), Metric()
    return replica


def test_an_unexpected_error_is_a_json_500_counted_in_the_metrics():
    """What no client mistake explains (a bug, a failing device) is answered JSON like everything else,
    counted under status 500 and kind internal_error (the HTTP layer over a stand-in replica)."""
    import asyncio

    from serve.app import build_http_app

    replica = stand_in_replica()

    async def broken(_request):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    replica._predict = broken
    with pytest.raises(RuntimeError):
        asyncio.run(replica.predict(None))
    assert replica.counts == {"predict 500": 1}
    assert replica.input_errors.calls == [{"kind": "internal_error"}]
    handler = build_http_app(replica).exception_handlers[Exception]
    response = asyncio.run(handler(None, RuntimeError("CUDA error: an illegal memory access was encountered")))
    assert response.status_code == 500
    assert json.loads(response.body) == {"error": "internal_error",
                                         "detail": "RuntimeError: CUDA error: an illegal memory access was encountered"}


def test_a_client_that_leaves_mid_upload_or_is_cancelled_is_not_counted_as_a_server_error():
    """A client gone mid-body (starlette's ClientDisconnect) is a 499 client_disconnected, and a request
    Serve cancels a 499 cancelled: neither is an internal_error 500 with a traceback in the log."""
    import asyncio

    from starlette.requests import Request

    from imgcls_core.serving import RequestError

    replica = stand_in_replica()
    messages = [{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    request = Request({"type": "http", "method": "POST", "path": "/v1/predict", "query_string": b"",
                       "headers": [(b"content-length", b"1000"), (b"content-type", b"image/png")]}, receive)
    replica._predict = replica._read_body
    with pytest.raises(RequestError) as left:
        asyncio.run(replica.predict(request))
    assert (left.value.status, left.value.error) == (499, "client_disconnected")

    async def forever(_request):
        await asyncio.Event().wait()

    async def cancel_it():
        replica._predict = forever
        task = asyncio.ensure_future(replica.predict(None))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert replica.counts == {"predict 499": 2}, replica.counts
    assert replica.input_errors.calls == [{"kind": "client_disconnected"}, {"kind": "cancelled"}]


def test_a_failing_forward_pass_fails_only_the_requests_of_its_own_group_in_a_batch():
    """A batch holding plain and explained images runs them as two passes: when the Grad-CAM pass fails
    (say, out of memory), the plain requests batched with it still get their answers."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from imgcls_core.serving import BatchStats

    class Model:
        def classify(self, batch, top_k):
            return [[{"label": "3", "index": 3, "probability": 1.0}]] * len(batch)

        def explain(self, batch, top_k):
            raise RuntimeError("out of memory")

    replica = stand_in_replica()
    replica.stats, replica.batch_size_hist, replica.images_served = BatchStats(), Metric(), Metric()
    replica._forward_pool = ThreadPoolExecutor(1)
    model, image = Model(), torch.zeros(3, 8, 8)
    items = [(image, model, 1, False), (image, model, 1, True), (image, model, 1, False)]
    rows = asyncio.run(replica._run_batch(items))
    assert rows[0] == rows[2] == [{"label": "3", "index": 3, "probability": 1.0}]
    assert isinstance(rows[1], RuntimeError) and "out of memory" in str(rows[1])
    assert replica.stats.snapshot()["batches"] == 1


def test_a_failed_load_is_retried_when_due_whatever_the_poll_interval():
    """The follow thread wakes for a failed load's retry even when polling is off (poll_interval_s: 0)
    or slower than the back-off; without one it waits the poll interval (or for reconfigure)."""
    import time

    replica = stand_in_replica()
    replica.poll_interval_s = 0
    assert replica._next_check_s() is None
    replica.follow["failed_load"] = {"version": "2", "retry_at": time.time() + 10}
    assert 9 < replica._next_check_s() <= 10
    replica.poll_interval_s = 600
    assert 9 < replica._next_check_s() <= 10
    replica.poll_interval_s = 5
    assert replica._next_check_s() == 5
    replica.follow["failed_load"]["retry_at"] = time.time() - 1  # overdue: at once (a short nap, no busy loop)
    assert replica._next_check_s() == 0.05


# A sample of the fuzz corpus (tests/fuzz_corpus.py) over real HTTP: every malformed upload is
# answered 4xx with the JSON error its decode outcome calls for, and the replica that answered is
# the same process before and after (before the safe decoder, one corrupt PNG made torchvision
# segfault and killed the replica; the client got a plain-text 500).
APP_MAX_PIXELS = 4_000_000  # serve_url's max_pixels
CRASHED_TORCHVISION = re.compile(r"/(IDAT:adler32|IDAT\.\d+:crc@|IDAT:zlib-header|IDAT:row-filter)")
EXPECTED = {"CorruptImageError": (400, "invalid_image"), "ImageTooLargeError": (413, "image_too_large")}


def replica_pids() -> list[int]:
    """The live replica processes of the app (Ray's state API on this driver's instance)."""
    import ray
    from ray.util.state import list_actors

    replicas = [("class_name", "=", "ServeReplica:imgcls:Classifier"), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                         filters=replicas)
    return sorted(a.pid for a in actors)


def test_replicas_declare_their_memory_to_ray(serve_url):
    """serve.memory_mb (default 1024) is each replica's "memory" resource, so Ray places replicas where
    they fit; the replica's real resident memory is printed beside it."""
    import ray
    from ray.util.state import list_actors

    from bench.reliability import rss_mb

    replicas = [("class_name", "=", "ServeReplica:imgcls:Classifier"), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                         filters=replicas, detail=True)
    assert actors
    for actor in actors:
        assert actor.required_resources.get("memory") == 1024 * 2**20, actor.required_resources
        print(f"replica pid {actor.pid}: declares 1024 MiB, resident {rss_mb(actor.pid):.0f} MB")


def replica_id(url: str) -> str:
    return requests.get(f"{url}/v1/stats", headers=AUTH, timeout=30).json()["replica"]


@pytest.fixture(scope="module")
def sample():
    """Every PNG fault that crashed torchvision and every 15th other variant, those that do not
    decode, each with the outcome decode_image gives it under the app's pixel limit (found in a
    child process)."""
    corpus = [v for v in build_corpus() if v.data]  # an empty body is another error (empty_body)
    candidates = [v for i, v in enumerate(corpus) if CRASHED_TORCHVISION.search(v.name) or i % 15 == 0]
    outcomes = run_isolated(candidates, max_pixels=APP_MAX_PIXELS)
    return [(v, o.outcome) for v, o in zip(candidates, outcomes) if o.outcome in EXPECTED]


def test_malformed_uploads_get_4xx_json_and_the_replica_stays_up(serve_url, digits_root, sample):
    digit = sorted((digits_root / "test").glob("3/*.png"))[0].read_bytes()
    assert post(serve_url, files=[("file", ("3.png", digit, "image/png"))]).status_code == 200
    pids, replica = replica_pids(), replica_id(serve_url)
    assert len(pids) == 1
    answers = {}
    for variant, outcome in sample:
        r = post(serve_url, files=[("file", (variant.name.replace("/", "_"), variant.data, "image/png"))])
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        answers[variant.name] = (r.status_code, body)
        assert (r.status_code, body["error"] if isinstance(body, dict) else body) == EXPECTED[outcome], (
            variant.name, outcome, r.status_code, body)
        assert variant.name.replace("/", "_") in body["detail"]  # the message names the file
    crashed_before = sum(bool(CRASHED_TORCHVISION.search(name)) for name in answers)
    assert len(answers) >= 150 and crashed_before >= 90
    assert replica_pids() == pids and replica_id(serve_url) == replica  # no replica restarted
    ok = post(serve_url, files=[("file", ("3.png", digit, "image/png"))])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top_k"][0]["label"] == "3"
    codes = Counter(f"{code} {body['error']}" for code, body in answers.values())
    print(f"\n{len(answers)} malformed uploads ({crashed_before} of them PNG faults that crashed "
          f"torchvision) -> {dict(codes)}; replica pid {pids[0]} and id {replica} unchanged")


def test_alias_swap_under_continuous_requests(serve_url, registry, digits_root):
    """champion moved to v2 while 3 clients keep posting: no request fails, and every request
    sent after the first v2 answer came back is answered by v2. (Answers of requests in flight
    at the swap can arrive after it: a batch already running finishes on the version it started
    with, and the client threads record answers in whatever order they get the GIL.)"""
    from imgcls_core.registry import CHAMPION, Registry

    digit = sorted((digits_root / "test").glob("7/*.png"))[0].read_bytes()
    seen, failures, stop = [], [], threading.Event()  # seen: (sent at, answered at, version)

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = post(serve_url, files=[("file", ("7.png", digit, "image/png"))], timeout=30)
                if r.status_code == 200:
                    seen.append((sent, time.monotonic(), r.json()["model"]["version"]))
                else:
                    failures.append((r.status_code, r.text))
            except requests.RequestException as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        version, _ = train_and_register(digits_root, registry["tmp"], registry["uri"], seed=1, epochs=1)
        assert version == "2"
        Registry(registry["uri"], MODEL).set_alias(CHAMPION, version)
        moved = time.monotonic()
        deadline = moved + 60
        while time.monotonic() < deadline and not any(v == "2" for _, _, v in seen[-10:]):
            time.sleep(0.2)
        swapped_after = time.monotonic() - moved
        time.sleep(2)  # keep requesting after the swap too
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    print(f"alias swap: {len(seen)} answered, {len(failures)} failed; v2 served "
          f"{swapped_after:.1f} s after the alias moved (poll interval 1 s)")
    assert not failures, failures[:5]
    first_v2 = min((answered for _, answered, v in seen if v == "2"), default=None)
    assert first_v2 is not None, "v2 never answered"
    assert min(seen)[2] == "1", "the first request was not answered by v1"
    after = [v for sent, _, v in seen if sent > first_v2]
    assert len(after) >= 10 and all(v == "2" for v in after), "a replica went back to the old version"
    info = requests.get(f"{serve_url}/v1/model", headers=AUTH, timeout=10).json()
    assert info["version"] == "2" and info["following"]["swaps"] >= 1


def test_overload_answers_503_with_retry_after_and_recovers(serve_url, registry, digits_root):
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25,
                         "max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 2,
                         "retry_after_s": 2, "request_timeout_s": 20, "max_replicas": 1, "poll_interval_s": 0}),
              name="overload", route_prefix="/overload")
    url = f"{serve_url}/overload"
    digits = [f.read_bytes() for f in sorted((digits_root / "test").glob("*/*.png"))[:32]]
    payload = [("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(digits)]

    def one(_):
        started = time.monotonic()
        r = requests.post(f"{url}/v1/predict", files=payload, timeout=60)
        return r.status_code, r.headers.get("Retry-After"), time.monotonic() - started

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _, _ in results]
    print(f"overload: {codes.count(200)} x 200, {codes.count(503)} x 503 of 24 concurrent 32-image requests; "
          f"slowest answer {max(s for _, _, s in results):.1f} s")
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert all(ra == "2" for c, ra, _ in results if c == 503)
    assert max(s for _, _, s in results) < 20 + 5, results  # nothing hangs past the request timeout
    time.sleep(1)
    again = requests.post(f"{url}/v1/predict", files=payload[:1], timeout=30)
    assert again.status_code == 200, again.text
    serve.delete("overload")


def test_a_request_over_its_time_limit_gets_a_json_504_and_the_replica_stays_up(serve_url, registry, digits_root):
    """serve.request_timeout_s: a request still unanswered then is a 504 JSON with Retry-After, counted;
    the replica keeps answering. Six concurrent 32-image Grad-CAM requests, one image per forward pass,
    against the smallest limit (0.1 s): the later ones wait past it."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25,
                         "request_timeout_s": 0.1, "retry_after_s": 3, "max_batch_size": 1, "max_replicas": 1,
                         "poll_interval_s": 0}), name="timeout", route_prefix="/timeout")
    url = f"{serve_url}/timeout"
    files = [("file", (f.name, f.read_bytes(), "image/png")) for f in sorted((digits_root / "test").glob("*/*.png"))[:32]]

    def one(_):
        return requests.post(f"{url}/v1/predict", files=files, params={"explain": "gradcam"}, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(one, range(6)))
    codes = [r.status_code for r in answers]
    print(f"time limit: {codes}")
    assert set(codes) <= {200, 504} and 504 in codes, codes
    late = next(r for r in answers if r.status_code == 504)
    assert late.json()["error"] == "timeout" and late.headers["Retry-After"] == "3"
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{url}/v1/stats", timeout=10).json()["requests"]["predict 504"] == codes.count(504)
    serve.delete("timeout")


def test_serve_arguments_are_validated():
    from imgcls_core.config import ConfigError
    from serve.app import resolve_settings

    with pytest.raises(ConfigError, match="max_batch_sise"):
        resolve_settings({"model_name": "m", "max_batch_sise": 8})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        resolve_settings({"model_name": "m", "max_batch_size": 0})
    assert resolve_settings({})["model_name"] == "imgcls"  # as jobs.promote registers by default
    assert json.dumps(resolve_settings({"model_name": "m"}))  # plain data for the replicas


def test_jobs_deploy_serves_and_classifies(serve_url, registry, digits_root, capsys):
    from jobs.deploy import main

    port = serve_url.rsplit(":", 1)[1]
    files = [str(f) for f in sorted((digits_root / "test").glob("*/*.png"))[::60][:4]]
    args = ["--set", "serve.num_cpus=0.25", "--set", "serve.max_replicas=1", "--set", "serve.poll_interval_s=0",
            "--set", f"tracking.tracking_uri={registry['uri']}", "--model", MODEL,
            "--name", "deployjob", "--route-prefix", "/deployjob", "--port", port]
    assert main([*args, "--predict", *files]) == 0
    out = capsys.readouterr().out
    assert f"serving {MODEL} v" in out and f"{serve_url}/deployjob/v1/predict" in out
    for f in files:  # one line per image, naming the file and its best class
        assert any(line.strip().startswith(f"{f.rsplit('/', 1)[1]}:") for line in out.splitlines()), out
    assert requests.get(f"{serve_url}/deployjob/readyz", timeout=10).status_code == 200
    assert main([*args, "--delete"]) == 0
    assert main(["--set", "serve.max_batch_size=0"]) == 2  # a bad config never reaches Ray


def test_serve_config_file_is_valid_for_serve_run():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import resolve_settings

    config = yaml.safe_load(open("serve/config.yaml"))
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    settings = resolve_settings(app.args)
    assert settings["model_name"] == "digits" and settings["serve"]["alias"] == "champion"


def test_a_version_registered_at_training_is_found_not_duplicated(registry):
    """`jobs.train --register` registers through log_model; promotion must find that version."""
    from imgcls_core.config import TrackingConfig
    from imgcls_core.registry import Registry
    from imgcls_core.tracking import Tracker

    tracker = Tracker(TrackingConfig(enabled=True, tracking_uri=registry["uri"], experiment="serve"),
                      log=lambda _l: None).start(run_name="registered-at-training")
    assert tracker.log_model(registry["model_file"], register_as="trained-registered") is not None
    tracker.close()
    version, created = Registry(registry["uri"], "trained-registered").register(tracker.run_id, {})
    assert not created and str(version.version) == "1"


def served_and_eager(url: str, registry, digits_root):
    """Every test digit through the app at ``url`` (version 1) and through eager PyTorch: (files, labels,
    eager top-1, served top-1, served accuracy)."""
    from imgcls_core.predict import Predictor

    files = sorted((digits_root / "test").glob("*/*.png"))
    labels = [int(f.parent.name) for f in files]
    eager = [p[0]["index"] for p in Predictor.from_file(registry["model_file"]).classify(files, top_k=1)]
    served = served_top1(url, files, version="1", alias=None)
    return files, labels, eager, served, float(np.mean(np.array(served) == np.array(labels)))


def test_onnx_backend_serves_the_checked_export_with_the_same_answers(serve_url, registry, digits_root, tmp_path):
    """jobs.export logs a checked ONNX file to version 1; serve.backend=onnx runs it with ONNX Runtime
    and answers like the offline PyTorch core, image for image."""
    from ray import serve

    from imgcls_core.registry import Registry
    from jobs.export import main as export_main
    from serve.app import build_app

    config = ["--set", "data.format=digits", "--set", f"data.root={digits_root}",
              "--set", f"tracking.tracking_uri={registry['uri']}", "--set", f"train.output_dir={tmp_path}"]
    assert export_main([*config, "--model", MODEL, "--version", "1", "--check-images", "64"]) == 0
    tags = Registry(registry["uri"], MODEL).client.get_model_version(MODEL, "1").tags
    assert float(tags["export.onnx.max_abs_diff"]) <= 1e-4 and float(tags["export.onnx.top1_agreement"]) == 1.0
    assert float(tags["export.torchscript.max_abs_diff"]) <= 1e-4
    assert tags["export.onnx.uri"].endswith("exports/v1/model.onnx")
    assert (tmp_path / "exports" / MODEL / "v1" / "model.onnx").is_file()  # <output_dir>/exports/<model>/v<N>
    version = Registry(registry["uri"], MODEL).client.get_model_version(MODEL, "1")
    logged = {a.path for a in Registry(registry["uri"], MODEL).client.list_artifacts(version.run_id, "exports/v1")}
    assert {"exports/v1/model.onnx", "exports/v1/parity.json", "exports/v1/export.json"} <= logged, logged

    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25, "version": "1",
                         "backend": "onnx", "max_replicas": 1, "poll_interval_s": 0, "max_batch_size": 16}),
              name="onnx", route_prefix="/onnx")
    url = f"{serve_url}/onnx"
    info = requests.get(f"{url}/v1/model", timeout=10).json()
    assert info["backend"] == "onnx" and info["version"] == "1"
    files, labels, offline, served, accuracy = served_and_eager(url, registry, digits_root)
    print(f"onnx backend: {accuracy:.4f} top-1 on {len(files)} test images; "
          f"{sum(a != b for a, b in zip(served, offline))} differ from eager PyTorch")
    assert accuracy >= 0.97, accuracy
    assert served == offline
    assert requests.post(f"{url}/v1/predict", data=b"not an image", headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 400
    serve.delete("onnx")

    # serve.backend's default, auto: the export and the weights timed on a batch at load, the faster answers
    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25, "version": "1",
                         "max_replicas": 1, "poll_interval_s": 0, "max_batch_size": 16}),
              name="auto", route_prefix="/auto")
    url = f"{serve_url}/auto"
    info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
    choice = info["backend_choice"]
    print(f"backend auto: {choice}")
    assert info["backend"] == choice["chosen"] == min(("torch", "onnx"), key=lambda k: choice[f"{k}_ms"])
    assert choice["batch"] == 16
    _, _, _, served_auto, _ = served_and_eager(url, registry, digits_root)
    assert served_auto == offline
    explained = post(url, files=[("file", ("a.png", files[0].read_bytes(), "image/png"))],
                     params={"explain": "gradcam"})
    assert explained.status_code == 200 and explained.json()["predictions"][0]["gradcam"]["png_base64"]
    serve.delete("auto")


def test_an_int8_file_within_a_point_of_fp32_is_servable_and_serves_the_same_answers(
        serve_url, registry, digits_root, tmp_path, capsys):
    """jobs.compress quantizes version 1, gates it (test top-1 within 1 point of fp32) and tags it
    servable; serve.backend=onnx with serve.precision=int8 runs it and /v1/model says so."""
    from ray import serve

    from imgcls_core.config import ConfigError
    from imgcls_core.registry import Registry
    from jobs.compress import main as compress_main
    from serve.app import build_app

    with pytest.raises(ConfigError, match="serve.backend=onnx"):
        load_config(None, ["serve.precision=int8"])
    assert compress_main(["--set", "data.format=digits", "--set", f"data.root={digits_root}",
                          "--set", f"tracking.tracking_uri={registry['uri']}", "--model", MODEL, "--version", "1",
                          "--method", "static", "--calibration-images", "128", "--repeats", "2", "--threads", "1",
                          "--out", str(tmp_path)]) == 0
    assert "int8 is servable" in capsys.readouterr().out
    tags = Registry(registry["uri"], MODEL).client.get_model_version(MODEL, "1").tags
    assert re.search(r"/compress/static/[^/]+/model\.int8\.onnx$", tags["export.int8.uri"]), tags  # this run's own
    assert float(tags["export.int8.acc1_delta"]) >= -1.0

    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25, "version": "1",
                         "backend": "onnx", "precision": "int8", "max_replicas": 1, "poll_interval_s": 0}),
              name="int8", route_prefix="/int8")
    url = f"{serve_url}/int8"
    try:
        info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
        assert info["backend"] == "onnx" and info["precision"] == "int8"
        files, labels, fp32, served, accuracy = served_and_eager(url, registry, digits_root)
        agree = float(np.mean(np.array(served) == np.array(fp32)))
        print(f"int8 served: {accuracy:.4f} top-1 on {len(files)} test images, {agree:.4f} agree with fp32")
        assert accuracy >= float(np.mean(np.array(fp32) == np.array(labels))) - 0.01 and agree >= 0.98
    finally:
        serve.delete("int8")


class Browser:
    """Debian's headless Chromium driven through chromedriver's W3C WebDriver HTTP API (no client library)."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, tmp):
        import shutil
        import subprocess

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if not (chromium and driver):
            pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
        port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                requests.get(f"{self.base}/status", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        options = {"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                "--window-size=1000,760", f"--user-data-dir={tmp}"]}
        session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.session = f"/session/{session['sessionId']}"

    def call(self, method: str, path: str, body: dict | None = None):
        r = requests.request(method, f"{self.base}{path}", json=body, timeout=60)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        return r.json()["value"]

    def go(self, url: str) -> None:
        self.call("POST", f"{self.session}/url", {"url": url})

    def element(self, css: str) -> str:
        return self.call("POST", f"{self.session}/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def type(self, css: str, text: str) -> None:
        self.call("POST", f"{self.session}/element/{self.element(css)}/value", {"text": text})

    def run(self, script: str):
        return self.call("POST", f"{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("GET", f"{self.session}/screenshot"))

    def close(self) -> None:
        try:
            self.call("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def test_the_page_at_the_root_classifies_a_dropped_in_digit_in_a_real_browser(serve_url, digits_root, tmp_path):
    """The page at / in headless Chromium: the token typed in, a real digit PNG chosen in its file input,
    the label read off the page; the OpenAPI schema documents both upload forms and top_k."""
    digit = sorted((digits_root / "test").glob("7/*.png"))[0]
    schema = requests.get(f"{serve_url}/openapi.json", timeout=10).json()["paths"]["/v1/predict"]["post"]
    assert {"multipart/form-data", "image/png"} <= set(schema["requestBody"]["content"])
    assert {p["name"] for p in schema["parameters"]} >= {"top_k", "explain", "format"}
    page = requests.get(f"{serve_url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text  # no external assets

    browser = Browser(tmp_path / "chromium")
    try:
        browser.go(f"{serve_url}/")
        browser.type("#token", TOKEN)
        browser.type("#files", str(digit))
        deadline, text = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            text = browser.run("return document.querySelector('#results').innerText")
            if "%" in text:
                break
            time.sleep(0.2)
        model = browser.run("return document.querySelector('#model').innerText")
        shot = browser.screenshot()
    finally:
        browser.close()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    print(f"\nthe page shows: {model} | {lines[:4]}")
    (api,) = post(serve_url, files=[("file", (digit.name, digit.read_bytes(), "image/png"))]).json()["predictions"]
    best = api["top_k"][0]  # the page shows what the API answers, whichever version the alias points at now
    assert lines[0] == digit.name and lines[1] == best["label"] == "7", lines  # the file name, then the best label
    assert lines[2] == f"{100 * best['probability']:.1f}%", (lines, best)
    assert model.startswith(f"{MODEL} v") and "10 classes" in model, model
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 5000
    (tmp_path / "page.png").write_bytes(shot)
    import os

    if os.environ.get("IMGCLS_WRITE_DOCS"):  # the screenshot in docs/ comes from this test
        from pathlib import Path

        Path("docs/endpoint_page.png").write_bytes(shot)


def test_client_cli_sends_many_files_in_several_requests(serve_url, digits_root, capsys, monkeypatch):
    from serve.client import main

    files = sorted((digits_root / "test").glob("*/*.png"))[:45]  # more than the app's 40 files per request
    monkeypatch.setenv("IMGCLS_SERVE_TOKEN", TOKEN)
    assert main(["--url", serve_url, "--top-k", "1", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert all(f.name in out for f in files)
    monkeypatch.delenv("IMGCLS_SERVE_TOKEN")
    assert main(["--url", serve_url, str(files[0])]) == 1
    assert "401" in capsys.readouterr().err


# Soak and fault scenarios (bench/reliability.py; longer runs: python -m bench.reliability).
SOAK_SECONDS = 40


def test_soak_at_70_percent_of_capacity_keeps_errors_latency_and_memory_flat(serve_url, digits_root):
    """Open-loop load at 70% of the app's measured capacity: no errors, p99 of the last third within
    3x the first third's or under half a second, pooled or as the median of its 5 s windows (a
    queue that builds up at 70% grows past that within seconds; a brief stall of the 2 shared cores
    gives one window a few hundred ms), replica memory
    growth under 64 MB. At most 2% shed: when the load generator stalls with the shared cores
    it sends the missed requests in one burst, and the queue bound may answer some of them 503
    with Retry-After, as designed (one of 15,378 in one CI run; 87 of 11,364, all in one burst,
    in a run where the test came after other modules' clusters; a queue that builds up at 70% of
    capacity sheds far more); any other failure is an error."""
    from bench.reliability import soak

    images = [f.read_bytes() for f in sorted((digits_root / "test").glob("*/*.png"))[::5]]
    result = soak(f"{serve_url}/v1/predict", "imgcls", images, seconds=SOAK_SECONDS, fraction=0.7, window_s=5,
                  headers=AUTH)
    print("soak:", json.dumps({k: v for k, v in result.items() if k not in ("windows", "replica_rss_mb")}))
    assert result["errors"] == {}, result["errors"]
    assert result["shed_fraction"] <= 0.02, result["shed"]
    assert result["answered"] + result["shed"] == result["sent"] > 0, result
    # 2xx answers that arrived during the soak, per second: the load was served, not only sent.
    assert result["achieved_rate"] >= 0.9 * result["target_rate"], result
    assert result["p99_drift"] is not None, result["windows"]
    # A queue that builds up raises the p99 of every window after it; a stall of the shared cores
    # raises one window's, and so the pooled p99 of its third (592 ms once in CI, while the other
    # windows stayed under 40 ms): the median of the last third's window p99s tells them apart.
    assert (result["p99_drift"] <= 3.0 or result["p99_last_third_ms"] <= 500
            or result["p99_last_third_window_median_ms"] <= 500), result["windows"]
    assert result["max_rss_growth_mb"] is not None and result["max_rss_growth_mb"] <= 64, result["replica_rss_mb"]
    assert requests.get(f"{serve_url}/healthz", timeout=10).status_code == 200


def test_a_version_that_fails_to_load_is_retried_with_backoff_while_the_old_one_serves(serve_url, registry, digits_root):
    """champion moved to a version whose model.pt is broken: the replica keeps serving the version it has,
    /v1/model reports the failed load, and it is not downloaded again at every 1 s poll but after 10 s."""
    from pathlib import Path

    from imgcls_core.registry import CHAMPION, Registry, register_model_file

    reg = Registry(registry["uri"], MODEL)
    before = str(reg.alias(CHAMPION).version)
    broken = register_model_file(registry["uri"], MODEL, registry["model_file"], experiment="serve", run_name="broken")
    location = reg.client.get_model_version_download_uri(MODEL, str(broken.version))  # the artifact folder
    if location.startswith("models:/"):
        location = reg.client.get_logged_model(location.rsplit("/", 1)[-1]).artifact_location
    files = list(Path(location.removeprefix("file://")).rglob("model.pt"))
    assert files
    for f in files:
        f.write_bytes(b"not a checkpoint")
    digit = sorted((digits_root / "test").glob("3/*.png"))[0].read_bytes()

    def info() -> dict:
        return requests.get(f"{serve_url}/v1/model", headers=AUTH, timeout=10).json()

    reg.set_alias(CHAMPION, str(broken.version))
    try:
        deadline = time.monotonic() + 20
        while info()["following"]["failed_load"] is None and time.monotonic() < deadline:
            time.sleep(0.5)
        failed = info()["following"]["failed_load"]
        assert failed and failed["version"] == str(broken.version) and failed["attempts"] == 1, failed
        assert failed["retry_in_s"] == 10 and failed["error"], failed
        time.sleep(4)  # four polls of 1 s: none of them downloads it again
        now = info()
        assert now["following"]["failed_load"]["attempts"] == 1 and now["version"] == before, now["following"]
        r = post(serve_url, files=[("file", ("3.png", digit, "image/png"))])
        assert r.status_code == 200 and r.json()["model"]["version"] == before
    finally:
        reg.set_alias(CHAMPION, before)
    deadline = time.monotonic() + 20
    while info()["following"]["failed_load"] is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert info()["following"]["failed_load"] is None and info()["version"] == before


def test_killed_replica_under_load_is_replaced_and_few_requests_fail(serve_url, registry, digits_root):
    """One of 2 replicas killed under 15 requests/s: under 10% of requests fail, Serve runs 2
    replicas again within 60 s, and every request after that is answered."""
    from ray import serve

    from bench.reliability import kill_replica_under_load
    from serve.app import build_app

    serve.run(build_app({"tracking_uri": registry["uri"], "model_name": MODEL, "num_cpus": 0.25,
                         "min_replicas": 2, "max_replicas": 2, "poll_interval_s": 0, "max_batch_size": 8}),
              name="kill", route_prefix="/kill")
    images = [f.read_bytes() for f in sorted((digits_root / "test").glob("*/*.png"))[::5]]
    try:
        result = kill_replica_under_load(f"{serve_url}/kill/v1/predict", "kill", images, rate=15.0,
                                         max_recover_s=60.0)
        print("replica kill:", json.dumps(result))
        assert result["failed_fraction"] <= 0.10, result
        assert result["time_to_recover_s"] <= 60, result
        assert result["sent_after_recovery"] > 0 and result["failed_after_recovery"] == 0, result
        assert result["running_replicas_after"] == 2
    finally:
        serve.delete("kill")
