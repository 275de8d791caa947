"""A closed-loop HTTP load generator that runs in its own process, apart from every server.

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/predict --images DIR --concurrency 16 \
        --seconds 8 [--images-per-request 8] [--header "Authorization: Bearer x"] --out result.json

``--concurrency`` clients each send a request, wait for its answer and send the next: one PNG as a
raw body, or ``--images-per-request`` PNGs as multipart files. After ``--warmup`` seconds it prints
``window start`` and, ``--seconds`` later, ``window end`` (flushed), so that the process that started
it can read the servers' CPU time at the window's edges.

Throughput is the work done inside the window: each answered request counts the share of its time
(sent to answered) that lies inside it, so a request wholly inside counts 1 and one that straddles
an edge counts its part. To learn those parts, the clients keep the load on after the window closes
until every request sent before then is answered (``--drain`` seconds at most; requests still
unanswered then count nothing and are reported as ``unfinished``). Counting only the requests
answered inside the window would quantize the rate by whole rounds: at saturation a batching
server answers the clients in step, a round of ``concurrency`` requests at a time, and an 8 s
window holding about 7.7 rounds of a heavy model counted 7 or 8 of them (-9% or +4%).

The result: requests and images answered per second, p50/p99 latency and errors by status (of the
requests answered inside the window), and the load generator's own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

DRAIN_S = 30.0  # default seconds to wait, after the window, for the requests sent inside it


async def run(url: str, images: list[bytes], concurrency: int, seconds: float, warmup_s: float,
              per_request: int, headers: dict[str, str], marks: bool = False, drain_s: float = DRAIN_S) -> dict:
    """The closed loop; ``marks`` prints the window's edges (for the process reading the CPU times)."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    share = 0.0  # the window's share of the answered requests
    pending = 0  # requests sent before the window closed and not answered yet
    drained = asyncio.Event()
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
        nonlocal share, pending
        i = k * per_request
        while (sent := time.perf_counter()) < stop_at or pending:  # the load stays on while draining
            counted = sent < stop_at
            pending += counted
            data, extra = body(i)
            i += concurrency * per_request
            try:
                async with session.post(url, data=data, headers={**extra, **headers}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if not counted:
                continue
            pending -= 1
            if status == 200 and (inside := min(done, stop_at) - max(sent, measure_from)) > 0:
                share += inside / (done - sent)
            if measure_from <= done <= stop_at:
                if status == 200:
                    latencies.append(done - sent)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            if not pending:
                drained.set()

    def mark(text: str) -> None:
        print(text, flush=True)

    if marks:
        loop.call_at(loop.time() + warmup_s, mark, "window start")
        loop.call_at(loop.time() + warmup_s + seconds, mark, "window end")
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = [asyncio.create_task(client(k, session)) for k in range(concurrency)]
        await asyncio.wait(tasks, timeout=stop_at - time.perf_counter())
        if pending:  # only requests sent before the window closed are waited for
            drained.clear()
            try:
                await asyncio.wait_for(drained.wait(), drain_s)
            except asyncio.TimeoutError:
                pass
        unfinished = pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "images_per_request": per_request,
            "requests_per_s": share / seconds, "images_per_s": share * per_request / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "ok": len(latencies), "unfinished": unfinished, "errors": errors,
            "loadgen_cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of .png files to send")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--drain", type=float, default=DRAIN_S,
                        help="seconds to wait, after the window, for the requests sent inside it")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--out", type=Path, help="write the result JSON here (else to stdout)")
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.png"))]
    if not images:
        sys.exit(f"no .png files in {args.images}")
    headers = dict(h.split(": ", 1) for h in args.header)
    result = asyncio.run(run(args.url, images, args.concurrency, args.seconds, args.warmup,
                             args.images_per_request, headers, marks=True, drain_s=args.drain))
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
