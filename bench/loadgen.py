"""A closed-loop HTTP load generator that runs in its own process, apart from every server.

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/predict --images DIR --concurrency 16 \
        --seconds 8 [--images-per-request 8] [--header "Authorization: Bearer x"] --out result.json

``--concurrency`` clients each send a request, wait for its answer and send the next: one PNG as a
raw body, or ``--images-per-request`` PNGs as multipart files. After ``--warmup`` seconds it prints
``window start`` and, ``--seconds`` later, ``window end`` (flushed), so that the process that started
it can read the servers' CPU time at the window's edges. Only requests completed inside the window
count (a request started there but answered later would credit the window with later work). The
result: requests and images answered per second, p50/p99 latency, errors by status, and the load
generator's own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np


async def run(url: str, images: list[bytes], concurrency: int, seconds: float, warmup_s: float,
              per_request: int, headers: dict[str, str], marks: bool = False) -> dict:
    """The closed loop; ``marks`` prints the window's edges (for the process reading the CPU times)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    started_at = time.perf_counter()
    measure_from, stop_at = started_at + warmup_s, started_at + warmup_s + seconds

    def body(i: int):
        if per_request == 1:
            return images[i % len(images)], {"Content-Type": "image/png"}
        form = aiohttp.FormData()
        for j in range(per_request):
            form.add_field("file", images[(i + j) % len(images)], filename=f"{(i + j) % len(images)}.png",
                           content_type="image/png")
        return form, {}

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        i = k * per_request
        while (sent := time.perf_counter()) < stop_at:
            data, extra = body(i)
            i += concurrency * per_request
            try:
                async with session.post(url, data=data, headers={**extra, **headers}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if measure_from <= done <= stop_at:
                if status == 200:
                    latencies.append(done - sent)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    def mark(text: str) -> None:
        print(text, flush=True)

    if marks:
        loop.call_at(loop.time() + warmup_s, mark, "window start")
        loop.call_at(loop.time() + warmup_s + seconds, mark, "window end")
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.create_task(client(k, session)) for k in range(concurrency)]
        await asyncio.wait(tasks, timeout=stop_at - time.perf_counter() + 0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "images_per_request": per_request,
            "requests_per_s": len(latencies) / seconds, "images_per_s": len(latencies) * per_request / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "ok": len(latencies), "errors": errors, "loadgen_cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of .png files to send")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--out", type=Path, help="write the result JSON here (else to stdout)")
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.png"))]
    if not images:
        sys.exit(f"no .png files in {args.images}")
    headers = dict(h.split(": ", 1) for h in args.header)
    result = asyncio.run(run(args.url, images, args.concurrency, args.seconds, args.warmup,
                             args.images_per_request, headers, marks=True))
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
