"""What the Serve app costs and delivers, against a naive server and the in-process ceiling.

    python -m bench.serve_throughput [--seconds 8] [--concurrency 1 4 16 48] [--modes proxy direct haproxy]

One run on this machine, one model file (the digits default: ResNet-18 at width 0.25,
32 x 32 input, random weights, which do not change the cost), one torch thread per model
(``--threads``) and one replica (``--replicas``); the naive server and the in-process runs get
as many threads as all the replicas together, so that both sides have the same cores:

(a) in process, end to end: decode + preprocess + batched forward of ``--max-batch-size``
    PNGs in one process (the practical ceiling), the batched forward alone, and one image at a
    time end to end;
(b) bench/naive_server.py: uvicorn + FastAPI, one image per request, forward inline;
(c) the Serve app (``--replicas``, 1 CPU each) in each ``--modes`` ingress, each in a fresh Ray
    instance: ``proxy`` (Serve's default HTTP proxy actor), ``proxy_grpc`` (the proxy with
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC to the replica, user code on its main loop,
    buffered request logs), ``direct`` (the same mode, clients on the replica's own HTTP
    port) and ``haproxy`` (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in front of direct ingress).

The load generator (bench/loadgen.py) is a process of its own for every point. Each point
reports images/s, p50/p99 latency, the mean batch the replica formed, and server CPU-ms per
image: the CPU time (from /proc) of every process of the server over the measured window
(the uvicorn process; or the Ray driver and all its descendants: GCS, raylet, dashboard,
Serve controller, proxy or HAProxy, replicas), divided by the images answered. Clients send
one PNG per request, then ``--images-per-request`` PNGs per request as multipart files.
``--width 1 --image-size 64`` repeats it with a model whose forward pass dominates.
``--serve-set key=value`` sets ``serve`` config keys of the app (e.g. ``batcher=timeout``);
``--export`` gives the served version its checked ONNX export first, as ``jobs.export`` does,
so that ``serve.backend: auto`` (the default) can choose ONNX Runtime when it measures faster.

Like for like: the naive server and the in-process runs use the backend and precision each
mode serves (``precision=bf16``: the PyTorch weights under bf16 autocast; ``backend=onnx``, or
``auto`` where it would choose ONNX Runtime: the model's ONNX export), one naive sweep and one
in-process run per distinct kind, so that no served / naive ratio credits Serve with what bf16
or ONNX Runtime gives. The replica's actual choice (``GET /v1/model``) is recorded; where the
two sides still differ (``auto`` choosing otherwise in the replica, TensorRT, int8) the ratio
names both sides.

Every point's warm-up lasts at least 2 full queue rounds and its window at least 3 (and
``--warmup`` / ``--seconds``): bench.loadgen measures the round in the warm-up itself. A point
whose p50 latency is as long as its window, or with nothing answered inside it, is marked
invalid and left out of the saturation picks. Repeats of the harness (bench.run sets
IMGCLS_BENCH_REPEAT) alternate the order of the naive server and the modes: forward on even
repeats, reversed on odd ones (``--order``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import save
from jobs.common import SERVE_INGRESS_ENV, free_port

MODEL = "bench-serve"


def make_model_file(path: Path, image_size: int = 32, width: float = 0.25, name: str = "resnet18") -> Path:
    import torch

    from imgcls_core.config import ModelConfig
    from imgcls_core.engine.checkpoint import Preprocessing, save_inference_model
    from imgcls_core.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name=name, width=width)
    model = build_model(cfg, 10, image_size)
    pre = Preprocessing(image_size, [0.5] * 3, [0.25] * 3, 1.0, [str(i) for i in range(10)])
    from dataclasses import asdict

    return save_inference_model(path, model.state_dict(), asdict(cfg), pre)


def digit_pngs(n: int = 64) -> list[bytes]:
    """Real digits (scikit-learn), upscaled to 32 x 32 RGB PNGs as the training data is."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    out = []
    for img in images:
        grey = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        buf = io.BytesIO()
        grey.convert("RGB").save(buf, "PNG")
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------- backend and precision

TORCH_FP32 = "torch fp32"  # what the naive server and the in-process runs used before they followed the mode


def mode_settings(spec: str, serve_set: list[str]) -> dict[str, str]:
    """The serve keys a mode spec (``haproxy:backend=torch,precision=bf16``) runs with."""
    _, _, extra = spec.partition(":")
    return dict(item.partition("=")[::2] for item in [*serve_set, *filter(None, extra.split(","))])


def served_kind(settings: dict[str, str], export: bool) -> str:
    """``"<backend> <precision>"`` a mode's replica runs, as far as it is known before it starts:
    ``auto fp32`` when serve.backend=auto has an ONNX export to choose from (the replica times both)."""
    precision, backend = settings.get("precision", "fp32"), settings.get("backend", "auto")
    if precision == "bf16":
        return "torch bf16"  # what auto means for bf16 (imgcls_core.serving.load_served_model)
    if precision == "int8":
        return "onnx int8"
    if backend == "auto":
        return "auto fp32" if export else TORCH_FP32
    return f"{backend} {precision}"


def naive_kind(served: str, auto_choice: str | None) -> str:
    """The kind the naive server and the in-process runs use for a mode serving ``served``:
    the same where they can run it (torch fp32/bf16, onnx fp32; ``auto``: the parent's own
    choice, made as the replica makes it), else torch fp32 (and the ratio then names both)."""
    if served == "auto fp32":
        return f"{auto_choice or 'torch'} fp32"
    return served if served in ("torch fp32", "torch bf16", "onnx fp32") else TORCH_FP32


def choose_auto(model_file: Path, onnx_file: Path, device: str, threads: int, batch_size: int) -> dict:
    """serve.backend=auto's choice made as the replica makes it (imgcls_core.serving._fastest):
    PyTorch and ONNX Runtime timed on one blank batch of ``batch_size`` with the replica's threads,
    best of 3 after a warm-up; the faster wins."""
    import torch

    from bench.naive_server import load_predictor
    from imgcls_core.serving import time_backends

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictors = {"torch": load_predictor(model_file, device=device),
                      "onnx": load_predictor(model_file, device=device, backend="onnx", onnx_file=onnx_file,
                                             threads=threads)}
        timed = time_backends(predictors, batch_size)
    finally:
        torch.set_num_threads(before)
    return {"chosen": "onnx" if timed["onnx"] < timed["torch"] else "torch",
            **{f"{k}_ms": round(v, 3) for k, v in timed.items()}}


def export_onnx_file(model_file: Path, images: list[bytes], out_dir: Path) -> Path:
    """The model file's checked ONNX export (imgcls_core.export.export_model, as jobs.export makes
    it), checked on the benchmark's images."""
    import torch

    from imgcls_core.export import export_model
    from imgcls_core.predict import Predictor
    from imgcls_core.serving import decode_upload

    predictor = Predictor.from_file(model_file)
    batch = torch.stack([predictor.transform(decode_upload(d, max_pixels=10**7)) for d in images[:32]])
    files, _ = export_model(model_file, batch, out_dir, formats=("onnx",), log=lambda _m: None)
    return Path(files["onnx"])


def in_process(model_file: Path, images: list[bytes], batch_size: int, seconds: float, device: str = "cpu",
               threads: int = 1, kind: str = TORCH_FP32, onnx_file: Path | None = None,
               full: bool = True) -> dict:
    """Rates of the model run in this process as ``kind`` (``"<backend> <precision>"``);
    ``full``: also the preprocessing options' CPU cost (the same for every kind)."""
    import torch

    from bench.naive_server import load_predictor
    from imgcls_core.serving import decode_upload

    torch.set_num_threads(threads)
    backend, precision = kind.split()
    predictor = load_predictor(model_file, device=device, backend=backend, precision=precision, onnx_file=onnx_file,
                               threads=threads)
    batch = torch.stack([predictor.transform(decode_upload(d, max_pixels=10**7)) for d in images[:batch_size]])
    while len(batch) < batch_size:
        batch = torch.cat([batch, batch])[:batch_size]

    def rate(fn, per_call: int) -> tuple[float, float]:
        """(images/s, CPU-ms per image) of calling ``fn`` for ``seconds``."""
        fn()
        calls, started, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            fn()
            calls += 1
        images = calls * per_call
        return images / (time.perf_counter() - started), 1000 * (time.process_time() - cpu0) / images

    pngs = (images * (batch_size // len(images) + 1))[:batch_size]

    def end_to_end():  # what a replica does for a batch of uploads, in one thread
        x = torch.stack([predictor.transform(decode_upload(d, max_pixels=10**7)) for d in pngs])
        return predictor.rank(predictor.probabilities(x), 5)

    forward, _ = rate(lambda: predictor.probabilities(batch), batch_size)
    e2e, e2e_cpu = rate(end_to_end, batch_size)
    single, _ = rate(lambda: predictor.probabilities(
        predictor.transform(decode_upload(images[0], max_pixels=10**7))[None]), 1)
    out = {"kind": kind, "batched_forward_images_per_s": forward, "end_to_end_images_per_s": e2e,
           "end_to_end_cpu_ms_per_image": e2e_cpu, "one_image_end_to_end_images_per_s": single}
    if not full:
        return out

    # Normalising a stacked uint8 batch once instead of each image (an option evaluated, not taken):
    # the same tensor, the CPU cost of the two ways at this input size.
    from torchvision.transforms import v2

    decoded = [decode_upload(d, max_pixels=10**7) for d in pngs]
    geometry, normalise = v2.Compose(predictor.transform.transforms[:-3]), v2.Compose(predictor.transform.transforms[-3:])
    assert torch.allclose(torch.stack([predictor.transform(i) for i in decoded]),
                          normalise(torch.stack([geometry(i) for i in decoded])), atol=1e-5)
    _, per_image_cpu = rate(lambda: torch.stack([predictor.transform(i) for i in decoded]), batch_size)
    _, once_cpu = rate(lambda: normalise(torch.stack([geometry(i) for i in decoded])), batch_size)
    return {**out, "preprocess_cpu_ms_per_image": per_image_cpu,
            "preprocess_uint8_batch_normalised_once_cpu_ms_per_image": once_cpu}


async def load(url: str, images: list[bytes], concurrency: int, seconds: float, warmup_s: float = 1.0,
               headers: dict | None = None, **options) -> dict:
    """bench.loadgen's closed loop in this process (one PNG per request; ``options`` such as
    ``drain_s``, ``warmup_rounds`` and ``window_rounds`` go to bench.loadgen.run): the rate counts
    each answered request's share of time inside the measured window (bench.loadgen says why).
    By default the warm-up lasts 2 queue rounds and the window 3 at least, as in the sweeps."""
    from bench.loadgen import WARMUP_ROUNDS, WINDOW_ROUNDS, run

    options = {"warmup_rounds": WARMUP_ROUNDS, "window_rounds": WINDOW_ROUNDS, **options}
    return await run(url, images, concurrency, seconds, warmup_s, 1, headers or {}, **options)


def wait_ready(url: str, timeout_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


# --------------------------------------------------------------------------- CPU accounting


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's CPU times


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is the state
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_s(roots: list[int], exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of every live process under ``roots`` (themselves included), minus the
    subtrees of ``exclude``."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid in exclude or pid in out:
            continue
        out[pid] = stats[pid][1]
        todo += children.get(pid, [])
    return out


def measure_point(url: str, image_dir: Path, concurrency: int, per_request: int, seconds: float,
                  server_roots: list[int], stats_url: str | None = None, *, warmup_s: float = 1.0,
                  warmup_rounds: int = 2, window_rounds: float = 3.0, max_warmup_s: float = 300.0) -> dict:
    """One closed-loop point with bench.loadgen in its own process; adds server CPU-ms per image
    and (from the replica's /v1/stats) the mean batch formed over the window. The warm-up lasts
    ``warmup_s`` and ``warmup_rounds`` full queue rounds, the window ``seconds`` and
    ``window_rounds`` rounds, at least (bench.loadgen measures the round in the warm-up)."""
    import json

    import requests

    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--images", str(image_dir), "--concurrency",
           str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup_s), "--warmup-rounds",
           str(warmup_rounds), "--window-rounds", str(window_rounds), "--max-warmup", str(max_warmup_s),
           "--images-per-request", str(per_request), "--out", str(out)]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    cpu: dict[str, dict[int, float]] = {}
    batches: dict[str, dict] = {}
    for line in gen.stdout:
        edge = line.strip().removeprefix("window ")
        if edge in ("start", "end"):
            cpu[edge] = tree_cpu_s(server_roots, {gen.pid})
            if stats_url:
                batches[edge] = requests.get(stats_url, timeout=10).json()["batches"]["histogram"]
    if gen.wait() != 0:
        raise RuntimeError(f"the load generator failed: {' '.join(cmd)}")
    row = json.loads(out.read_text())
    out.unlink()
    used = sum(v - cpu["start"].get(pid, 0.0) for pid, v in cpu["end"].items())
    row["server_cpu_s"] = used
    images = row["images_per_s"] * row["window_s"]
    row["server_cpu_ms_per_image"] = 1000 * used / images if images else None
    if batches:
        delta = {int(k): v - batches["start"].get(k, 0) for k, v in batches["end"].items()}
        formed = sum(delta.values())
        row["mean_batch"] = sum(k * v for k, v in delta.items()) / formed if formed else 0.0
    return row


def _print(label: str, row: dict) -> None:
    batch = f"  batch {row['mean_batch']:5.1f}" if "mean_batch" in row else ""
    invalid = "" if row.get("valid", True) else f"  INVALID: {row.get('invalid_reason')}"
    window = f"  warm-up {row['warmup_s']:4.1f} s window {row['window_s']:4.1f} s" if "window_s" in row else ""
    print(f"  {label:<26} c={row['concurrency']:<3} x{row['images_per_request']:<2} {row['images_per_s']:7.1f} img/s"
          f"  p50 {row['p50_ms'] or float('nan'):7.1f} ms  p99 {row['p99_ms'] or float('nan'):7.1f} ms"
          f"  server {row['server_cpu_ms_per_image'] or float('nan'):5.2f} CPU-ms/img{batch}  errors {row['errors']}"
          f"{window}{invalid}", flush=True)


def sweep(url: str, image_dir: Path, args, roots: list[int], label: str, per_request: list[int],
          stats_url: str | None = None) -> list[dict]:
    rows = []
    for k in per_request:
        for c in args.concurrency:
            row = measure_point(url, image_dir, c, k, args.seconds, roots, stats_url, warmup_s=args.warmup,
                                warmup_rounds=args.warmup_rounds, window_rounds=args.window_rounds,
                                max_warmup_s=args.max_warmup)
            _print(label, row)
            rows.append(row)
    return rows


def run_naive(model_file: Path, image_dir: Path, args, kind: str = TORCH_FP32, onnx_file: Path | None = None) -> list[dict]:
    """The naive server's sweep, running the model as ``kind`` (``"<backend> <precision>"``)."""
    print(f"(b) naive FastAPI server (uvicorn, one image per request), {kind}", flush=True)
    backend, precision = kind.split()
    port = free_port()
    env = {**os.environ, "IMGCLS_NAIVE_MODEL": str(model_file), "OMP_NUM_THREADS": "1",
           "IMGCLS_NAIVE_THREADS": str(args.threads * args.replicas),
           "IMGCLS_NAIVE_DEVICE": "cuda" if args.num_gpus > 0 else "cpu",
           "IMGCLS_NAIVE_BACKEND": backend, "IMGCLS_NAIVE_PRECISION": precision,
           "IMGCLS_NAIVE_ONNX": str(onnx_file) if onnx_file else ""}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs")
        return sweep(f"http://127.0.0.1:{port}/v1/predict", image_dir, args, [proc.pid], f"naive {kind}", [1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- the Serve app

OFF = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
MODES = {  # environment of the Ray instance (read where Ray and the Serve controller start)
    "proxy": OFF,  # Serve's default: a Python proxy actor, requests to replicas as actor calls
    # the throughput-optimized mode's individual flags on the default proxy path: user code and the
    # router on the replica's main loop, buffered request logs, no logging to stderr
    "proxy_flags": {**OFF, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0"},
    # the whole mode, clients still on the proxy (which then reaches replicas over gRPC)
    "proxy_grpc": {**OFF, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "direct": {**OFF, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},  # clients on a replica's own port
    "haproxy": SERVE_INGRESS_ENV,  # imgcls's choice
    # HAProxy without its per-request metrics log lines (parsed in Python by the proxy actor)
    "haproxy_nometrics": {**SERVE_INGRESS_ENV, "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"},
}


def find_direct_port(first: int, count: int = 100) -> int:
    """The replica's direct-ingress HTTP port: the first port from ``first`` that answers /healthz."""
    import requests

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for port in range(first, first + count):
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                    return port
            except requests.RequestException:
                continue
        time.sleep(1)
    raise TimeoutError(f"no replica answered on ports {first}..{first + count - 1}")


def serve_settings(args, uri: str) -> dict:
    settings = {"tracking_uri": uri, "model_name": MODEL, "num_cpus": 1, "torch_threads": args.threads,
                "num_gpus": args.num_gpus, "max_batch_size": args.max_batch_size,
                "max_ongoing_requests": args.max_ongoing, "min_replicas": args.replicas,
                "max_replicas": args.replicas,
                "max_queued_requests": -1, "poll_interval_s": 0, "memory_mb": 0}
    for item in args.serve_set:
        key, _, value = item.partition("=")
        settings[key] = value
    return settings


def served_child(args) -> None:
    """Runs in a fresh process whose environment selects the mode: Ray, the app, every point."""
    import json

    import ray
    from ray import serve

    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from jobs.common import init_local_ray
    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-served-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version = register_model_file(uri, MODEL, Path(args.model_file), experiment="bench")
    Registry(uri, MODEL).set_alias(CHAMPION, str(version.version))
    if args.export or "backend=onnx" in args.serve_set:  # the version's checked ONNX export, as jobs.export makes it
        from imgcls_core.config import load_config
        from imgcls_core.export import DEFAULT_OPSET, DEFAULT_TOLERANCE
        from jobs.export import export_job

        export_job(load_config(None, [f"tracking.tracking_uri={uri}"]), model_name=MODEL, alias=CHAMPION,
                   version=None, model_file=None, formats=("onnx",), opset=DEFAULT_OPSET, tolerance=DEFAULT_TOLERANCE,
                   check_images=32,
                   out=str(tmp / "export"))
    if "precision=bf16" in args.serve_set:
        # jobs.compress --method bf16 gates a version on its test top-1 (tests/integration/test_compress_job.py);
        # this model is untrained and only its speed is measured here, so it is tagged as if it had passed.
        from imgcls_core.serving import BF16_GATE_TAG

        Registry(uri, MODEL).tag(str(version.version), {BF16_GATE_TAG: "0"})
    init_local_ray(num_cpus=max(2, args.replicas), num_gpus=1 if args.num_gpus > 0 else 0, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=free_port(), configure_logging=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_settings(args, uri)), name="bench", route_prefix="/")
    try:
        base = f"http://127.0.0.1:{port}"
        if args.served == "direct":
            base = f"http://127.0.0.1:{find_direct_port(int(os.environ['RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT']))}"
        wait_ready(f"{base}/readyz")
        import requests

        # the backend and precision the replica runs (serve.backend=auto: what it chose, and why)
        info = requests.get(f"{base}/v1/model", timeout=30).json()
        model = {k: info.get(k) for k in ("backend", "precision", "backend_choice", "device")}
        rows = sweep(f"{base}/v1/predict", Path(args.images_dir), args, [os.getpid()], args.label,
                     [1, args.images_per_request],
                     # one replica's batch histogram: with several, consecutive reads may reach different ones
                     stats_url=f"{base}/v1/stats" if args.replicas == 1 else None)
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(args.out).write_text(json.dumps({"rows": rows, "model": model}))


def run_served(spec: str, model_file: Path, image_dir: Path, args) -> tuple[list[dict], dict]:
    """``spec``: a mode, optionally with serve keys for this run alone: ``haproxy:batcher=timeout,backend=onnx``.
    Its points, and the backend and precision its replica ran (``GET /v1/model``)."""
    import json

    mode, _, extra = spec.partition(":")
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r} in {spec!r}; choose from {list(MODES)}")
    settings = [*args.serve_set, *filter(None, extra.split(","))]
    print(f"(c) Serve app, {spec}, {args.replicas} replica(s) x {args.threads} thread(s)", flush=True)
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    first = min(free_port(), 65000)  # replicas' direct-ingress ports: a range of its own
    env = {**os.environ, **MODES[mode], "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + 200)}
    cmd = [sys.executable, "-m", "bench.serve_throughput", "--served", mode, "--model-file", str(model_file),
           "--images-dir", str(image_dir), "--out", str(out), "--seconds", str(args.seconds),
           "--warmup", str(args.warmup), "--warmup-rounds", str(args.warmup_rounds),
           "--window-rounds", str(args.window_rounds), "--max-warmup", str(args.max_warmup),
           "--concurrency", *map(str, args.concurrency), "--images-per-request", str(args.images_per_request),
           "--max-batch-size", str(args.max_batch_size), "--max-ongoing", str(args.max_ongoing),
           "--threads", str(args.threads), "--replicas", str(args.replicas),
           *(["--export"] if args.export else []),
           "--num-gpus", str(args.num_gpus), "--label", spec, *[f"--serve-set={s}" for s in settings]]
    subprocess.run(cmd, env=env, check=True)
    done = json.loads(out.read_text())
    out.unlink()
    return done["rows"], done["model"]


# --------------------------------------------------------------------------- the run


def best(rows: list[dict], per_request: int = 1, window_s: float | None = None) -> dict | None:
    """The valid point of ``per_request`` images per request with the most images/s (None when there
    is none): a point whose p50 is as long as its window, or that answered nothing inside it, saw no
    steady state and is left out (bench.loadgen.row_invalid; ``window_s`` for rows that predate it)."""
    from bench.loadgen import row_invalid

    valid = [r for r in rows if r["images_per_request"] == per_request and row_invalid(r, window_s) is None]
    return max(valid, key=lambda r: r["images_per_s"], default=None)


def repeat_order(order: str, env: dict | None = None) -> bool:
    """Whether this run takes the naive server and the modes in reverse: ``--order reverse``, or
    ``auto`` on an odd repeat of the harness (IMGCLS_BENCH_REPEAT, 0-based, set by bench.run)."""
    if order != "auto":
        return order == "reverse"
    return int((env if env is not None else os.environ).get("IMGCLS_BENCH_REPEAT", "0")) % 2 == 1


def mode_ratios(rows: list[dict], per_request: int, served: str, naive_side: str, local: dict,
                naive: list[dict] | None) -> dict:
    """One mode's ratios at saturation (valid points only), each side's backend and precision named."""
    one, many = best(rows, 1), best(rows, per_request)
    r = {"served_kind": served, "naive_kind": naive_side, "in_process_kind": local.get("kind", TORCH_FP32),
         "served_img_s_at_saturation": one["images_per_s"] if one else None,
         "server_cpu_ms_per_image_at_saturation": one["server_cpu_ms_per_image"] if one else None,
         f"x{per_request}_over_in_process_end_to_end":
             many["images_per_s"] / local["end_to_end_images_per_s"] if many else None,
         "served_over_in_process_forward": one["images_per_s"] / local["batched_forward_images_per_s"] if one else None}
    if naive is not None:
        n = best(naive)
        r["served_over_naive_at_saturation"] = one["images_per_s"] / n["images_per_s"] if one and n else None
        by_c = {x["concurrency"]: x for x in naive if best([x]) is not None}
        r["by_concurrency"] = [
            {"concurrency": s["concurrency"],
             "images_per_s_served_over_naive": s["images_per_s"] / by_c[s["concurrency"]]["images_per_s"],
             "p99_served_over_naive": (s["p99_ms"] / by_c[s["concurrency"]]["p99_ms"])
             if s["p99_ms"] and by_c[s["concurrency"]]["p99_ms"] else float("nan")}
            for s in rows if s["images_per_request"] == 1 and best([s]) is not None
            and by_c.get(s["concurrency"], {}).get("images_per_s")]
    return r


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="measured seconds per point, at least (the window spans --window-rounds queue rounds too)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds per point, at least (it lasts --warmup-rounds queue rounds too)")
    parser.add_argument("--warmup-rounds", type=int, default=2,
                        help="full queue rounds of warm-up per point (every client answered this many times)")
    parser.add_argument("--window-rounds", type=float, default=3.0, help="queue rounds the window spans, at least")
    parser.add_argument("--max-warmup", type=float, default=300.0,
                        help="seconds after which a point's window starts anyway (the point is then invalid)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 48])
    parser.add_argument("--images-per-request", type=int, default=8, help="the multipart points' images per request")
    parser.add_argument("--modes", nargs="+", default=["proxy", "haproxy"], metavar="MODE[:KEY=VALUE,...]",
                        help=f"ingress modes ({', '.join(MODES)}), each optionally with serve keys of its own")
    parser.add_argument("--order", choices=("auto", "forward", "reverse"), default="auto",
                        help="order of the naive server and the modes: auto reverses it on odd repeats of bench.run")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch (or ONNX Runtime) threads per replica")
    parser.add_argument("--replicas", type=int, default=1,
                        help="Serve replicas (1 CPU each); the naive server and the in-process runs get "
                             "threads x replicas threads")
    parser.add_argument("--max-ongoing", type=int, default=128,
                        help="replica max_ongoing_requests: above the clients, so the proxy never queues")
    parser.add_argument("--model", default="resnet18", help="any imgcls_core model (resnet50 for the GPU figure)")
    parser.add_argument("--width", type=float, default=0.25, help="channel width (1.0 = torchvision's)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per replica; > 0 also runs the in-process forward on the GPU")
    parser.add_argument("--image-size", type=int, default=32, help="network input side (the PNGs are resized to it)")
    parser.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a serve config key of the app, repeatable")
    parser.add_argument("--name", default="serve_throughput", help="results file name under bench/results")
    parser.add_argument("--skip-naive", action="store_true", help="measure the Serve app only")
    parser.add_argument("--export", action="store_true",
                        help="give the served version its checked ONNX export first (jobs.export), so that "
                             "serve.backend=auto (the default) can choose ONNX Runtime")
    # internal: one mode's measurements, in a child process with that mode's environment
    for hidden in ("--served", "--model-file", "--images-dir", "--out", "--label"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.served:
        return served_child(args)
    if args.replicas * args.num_gpus > 1:  # the local instance declares one GPU
        parser.error(f"--replicas {args.replicas} x --num-gpus {args.num_gpus} is more than the one GPU used")
    for spec in args.modes:
        if spec.partition(":")[0] not in MODES:
            parser.error(f"unknown mode {spec!r}; choose from {list(MODES)}")

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-serve-"))
    model_file = make_model_file(tmp / "model.pt", args.image_size, args.width, args.model)
    device = "cuda" if args.num_gpus > 0 else "cpu"
    images = digit_pngs()
    image_dir = tmp / "png"
    image_dir.mkdir()
    for i, data in enumerate(images):
        (image_dir / f"{i:03d}.png").write_bytes(data)

    # Which backend and precision each mode serves, and what the naive server and the in-process runs
    # use beside it: the same where they can run it.
    served_kinds = {spec: served_kind(mode_settings(spec, args.serve_set), args.export) for spec in args.modes}
    onnx_file = auto = None
    if {"auto fp32", "onnx fp32"} & set(served_kinds.values()):
        onnx_file = export_onnx_file(model_file, images, tmp / "onnx")
    if "auto fp32" in served_kinds.values():
        auto = choose_auto(model_file, onnx_file, device, args.threads, args.max_batch_size)
        print(f"serve.backend=auto, chosen here as a replica chooses: {auto}", flush=True)
    naive_kinds = {spec: naive_kind(kind, auto and auto["chosen"]) for spec, kind in served_kinds.items()}
    kinds = list(dict.fromkeys(naive_kinds.values()))

    threads = args.threads * args.replicas
    print(f"(a) in process, {threads} thread(s)", flush=True)
    local = in_process(model_file, images, args.max_batch_size, args.seconds, device, threads)
    local_by_kind = {TORCH_FP32: local}
    for kind in kinds:
        if kind not in local_by_kind:
            local_by_kind[kind] = in_process(model_file, images, args.max_batch_size, args.seconds, device, threads,
                                             kind=kind, onnx_file=onnx_file, full=False)
    for kind, x in local_by_kind.items():
        print(f"  {kind}: end to end (decode + preprocess + batched forward) {x['end_to_end_images_per_s']:.0f} img/s, "
              f"{x['end_to_end_cpu_ms_per_image']:.2f} CPU-ms/img; batched forward alone "
              f"{x['batched_forward_images_per_s']:.0f} img/s; one image at a time end to end "
              f"{x['one_image_end_to_end_images_per_s']:.0f} img/s", flush=True)
    print(f"  preprocessing {local['preprocess_cpu_ms_per_image']:.3f} CPU-ms/img normalised per image, "
          f"{local['preprocess_uint8_batch_normalised_once_cpu_ms_per_image']:.3f} as a uint8 batch normalised once",
          flush=True)

    # The naive server (one sweep per kind the modes need) and the modes, in this repeat's order.
    jobs = [*[("naive", kind) for kind in ([] if args.skip_naive else kinds)], *[("served", spec) for spec in args.modes]]
    if repeat_order(args.order):
        jobs.reverse()
    print(f"order: {', '.join(f'{what} {which}' for what, which in jobs)}", flush=True)
    naive_by_kind: dict[str, list[dict]] = {}
    served: dict[str, list[dict]] = {}
    served_model: dict[str, dict] = {}
    for what, which in jobs:
        if what == "naive":
            naive_by_kind[which] = run_naive(model_file, image_dir, args, which, onnx_file)
        else:
            served[which], served_model[which] = run_served(which, model_file, image_dir, args)
    served = {spec: served[spec] for spec in args.modes}  # the modes' order, whatever the run's

    k = args.images_per_request
    ratios: dict = {"by_mode": {}}
    for spec, rows in served.items():
        model = served_model[spec]
        actual = f"{model['backend']} {model['precision']}" if model.get("backend") else served_kinds[spec]
        nk = naive_kinds[spec]
        r = mode_ratios(rows, k, actual, nk, local_by_kind[nk], None if args.skip_naive else naive_by_kind[nk])
        ratios["by_mode"][spec] = r
        one = best(rows, 1)
        like = "like for like" if actual == nk else f"NOT like for like: served {actual}, naive/in-process {nk}"
        print(f"\n{spec} ({like}): served "
              + (f"{one['images_per_s']:.0f} img/s at saturation, {one['server_cpu_ms_per_image']:.2f} server CPU-ms/img"
                 if one else "no valid x1 point")
              + (f", x{r['served_over_naive_at_saturation']:.2f} the naive server"
                 if r.get("served_over_naive_at_saturation") else "")
              + (f"; {k} images per request: x{r[f'x{k}_over_in_process_end_to_end']:.2f} in-process end to end"
                 if r[f"x{k}_over_in_process_end_to_end"] else f"; no valid x{k} point"))
    for kind, rows in naive_by_kind.items():
        if n := best(rows):
            print(f"naive {kind}: {n['images_per_s']:.0f} img/s at saturation, {n['server_cpu_ms_per_image']:.2f} CPU-ms/img")
    result = {"config": vars(args), "order": [f"{what} {which}" for what, which in jobs], "in_process": local,
              "in_process_by_kind": local_by_kind, "auto_backend_choice": auto,
              "naive": naive_by_kind.get(TORCH_FP32, []), "naive_by_kind": naive_by_kind,
              "served": served, "served_model": served_model, "ratios": ratios}
    save(args.name, result)
    return result


if __name__ == "__main__":
    main()
