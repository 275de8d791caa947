"""The Serve app's throughput and latency, against the model's in-process forward and a naive server.

    python -m bench.serve_throughput [--seconds 8] [--concurrency 1 4 16 48] [--max-batch-size 32]

All in one run on this machine, with the same model file (the digits default:
ResNet-18 at width 0.25, 32 x 32 input; weights are random, which does not
change the cost) and one CPU thread for the model everywhere:

``--width 1 --image-size 64`` repeats it with a model whose forward pass dominates the
per-request work.

(a) in process: the batched forward pass alone (batch = max_batch_size), and
    decode + preprocess + forward one image at a time;
(b) the Serve app (1 replica, @serve.batch) under N concurrent closed-loop
    clients each sending one PNG per request: images/s and p50/p99 latency;
(c) the same clients against bench/naive_server.py (uvicorn, no batching).

Prints served/in-process images/s, and served vs naive images/s and latency at
each concurrency. The load generator shares the machine's cores with the
servers, so absolute figures are lower bounds; ratios are measured side by side.
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

MODEL = "bench-serve"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def in_process(model_file: Path, images: list[bytes], batch_size: int, seconds: float, device: str = "cpu") -> dict:
    import torch

    from imgcls_core.predict import Predictor
    from imgcls_core.serving import decode_upload

    torch.set_num_threads(1)
    predictor = Predictor.from_file(model_file, device=device)
    batch = torch.stack([predictor.transform(decode_upload(d, max_pixels=10**7)) for d in images[:batch_size]])
    while len(batch) < batch_size:
        batch = torch.cat([batch, batch])[:batch_size]

    def rate(fn, per_call: int) -> float:
        fn()
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            fn()
            calls += 1
        return calls * per_call / (time.perf_counter() - started)

    forward = rate(lambda: predictor.probabilities(batch), batch_size)
    single = rate(lambda: predictor.probabilities(predictor.transform(decode_upload(images[0], max_pixels=10**7))[None]), 1)
    return {"batched_forward_images_per_s": forward, "one_image_end_to_end_images_per_s": single}


async def load(url: str, images: list[bytes], concurrency: int, seconds: float, warmup_s: float = 1.0,
               headers: dict | None = None) -> dict:
    """``concurrency`` closed-loop clients for ``warmup_s + seconds``; the figures count the requests
    that COMPLETED inside the measured window (a request started there but answered after it, as
    happens when latency exceeds the window, is not counted: it would credit the window with work
    done later). Clients still waiting when the window closes are cancelled."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    started_at = time.perf_counter()
    measure_from = started_at + warmup_s
    stop_at = measure_from + seconds

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while (sent := time.perf_counter()) < stop_at:
            data = images[i % len(images)]
            i += concurrency
            try:
                async with session.post(url, data=data, headers={"Content-Type": "image/png", **(headers or {})}) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if measure_from <= done <= stop_at:
                if status == 200:
                    latencies.append(done - sent)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.create_task(client(k, session)) for k in range(concurrency)]
        await asyncio.wait(tasks, timeout=stop_at - time.perf_counter() + 0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "images_per_s": len(latencies) / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "ok": len(latencies), "errors": errors}


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


def sweep(url: str, images: list[bytes], levels: list[int], seconds: float, label: str) -> list[dict]:
    rows = []
    for c in levels:
        row = asyncio.run(load(url, images, c, seconds))
        print(f"  {label:<6} c={c:<3} {row['images_per_s']:8.1f} img/s  p50 {row['p50_ms'] or float('nan'):7.1f} ms"
              f"  p99 {row['p99_ms'] or float('nan'):7.1f} ms  errors {row['errors']}", flush=True)
        rows.append(row)
    return rows


def run_naive(model_file: Path, images: list[bytes], args) -> list[dict]:
    print("(c) naive FastAPI server (uvicorn, one image per request)", flush=True)
    port = free_port()
    env = {**os.environ, "IMGCLS_NAIVE_MODEL": str(model_file), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs")
        return sweep(f"http://127.0.0.1:{port}/v1/predict", images, args.concurrency, args.seconds, "naive")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 48])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-ongoing", type=int, default=128,
                        help="replica max_ongoing_requests: above the clients, so the proxy never queues")
    parser.add_argument("--model", default="resnet18", help="any imgcls_core model (resnet50 for the GPU figure)")
    parser.add_argument("--width", type=float, default=0.25, help="channel width (1.0 = torchvision's)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPUs per replica; > 0 also runs the in-process forward on the GPU")
    parser.add_argument("--image-size", type=int, default=32, help="network input side (the PNGs are resized to it)")
    parser.add_argument("--name", default="serve_throughput", help="results file name under bench/results")
    parser.add_argument("--skip-naive", action="store_true", help="measure the Serve app only")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-serve-"))
    model_file = make_model_file(tmp / "model.pt", args.image_size, args.width, args.model)
    device = "cuda" if args.num_gpus > 0 else "cpu"
    images = digit_pngs()
    print("(a) in process, 1 thread", flush=True)
    local = in_process(model_file, images, args.max_batch_size, args.seconds, device)
    print(f"  batched forward {local['batched_forward_images_per_s']:.0f} img/s; one image end to end "
          f"{local['one_image_end_to_end_images_per_s']:.0f} img/s", flush=True)

    naive = [{"concurrency": c, "images_per_s": 0.0, "p50_ms": None, "p99_ms": None} for c in args.concurrency]
    if not args.skip_naive:
        naive = run_naive(model_file, images, args)

    print("(b) Serve app, 1 replica, batching", flush=True)

    import ray
    from ray import serve

    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from serve.app import build_app

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version = register_model_file(uri, MODEL, model_file, experiment="bench")
    Registry(uri, MODEL).set_alias(CHAMPION, str(version.version))
    from jobs.common import init_local_ray

    init_local_ray(num_cpus=2, num_gpus=1 if args.num_gpus > 0 else 0, include_dashboard=False,
                   configure_logging=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"tracking_uri": uri, "model_name": MODEL, "num_cpus": 1, "torch_threads": 1,
                         "num_gpus": args.num_gpus,
                         "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000,
                         "max_ongoing_requests": args.max_ongoing, "max_replicas": 1,
                         "max_queued_requests": -1, "poll_interval_s": 0}),
              name="bench", route_prefix="/")
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        served = sweep(f"http://127.0.0.1:{port}/v1/predict", images, args.concurrency, args.seconds, "served")
        import requests

        batches = requests.get(f"http://127.0.0.1:{port}/v1/stats", timeout=10).json()["batches"]
    finally:
        serve.shutdown()
        ray.shutdown()

    best_served = max(r["images_per_s"] for r in served)
    best_naive = max(r["images_per_s"] for r in naive) or float("nan")
    ratios = {
        "served_over_in_process_forward": best_served / local["batched_forward_images_per_s"],
        "served_over_in_process_one_image": best_served / local["one_image_end_to_end_images_per_s"],
        "served_over_naive_at_saturation": best_served / best_naive,
        "by_concurrency": [
            {"concurrency": s["concurrency"],
             "images_per_s_served_over_naive": s["images_per_s"] / n["images_per_s"] if n["images_per_s"] else float("nan"),
             "p50_served_over_naive": (s["p50_ms"] / n["p50_ms"]) if s["p50_ms"] and n["p50_ms"] else float("nan"),
             "p99_served_over_naive": (s["p99_ms"] / n["p99_ms"]) if s["p99_ms"] and n["p99_ms"] else float("nan")}
            for s, n in zip(served, naive)],
    }
    print(f"\nserved at saturation / in-process batched forward: {ratios['served_over_in_process_forward']:.3f}")
    print(f"served at saturation / in-process one image end to end: {ratios['served_over_in_process_one_image']:.2f}")
    print(f"served / naive at saturation: {ratios['served_over_naive_at_saturation']:.2f}")
    for row in ratios["by_concurrency"]:
        print(f"  c={row['concurrency']:<3} img/s x{row['images_per_s_served_over_naive']:.2f}  "
              f"p50 x{row['p50_served_over_naive']:.2f}  p99 x{row['p99_served_over_naive']:.2f}  (served / naive)")
    print(f"batches formed by the replica: mean {batches['mean_batch_size']:.1f}, max {batches['max_batch_size']}")
    result = {"config": vars(args), "in_process": local, "served": served, "naive": naive,
              "batches": batches, "ratios": ratios}
    save(args.name, result)
    return result


if __name__ == "__main__":
    main()
