"""A closed-loop HTTP load generator that runs in its own process, apart from every server.

    python -m bench.loadgen --url http://127.0.0.1:8000/v1/predict --images DIR --concurrency 16 \
        --seconds 8 [--images-per-request 8] [--header "Authorization: Bearer x"] --out result.json

``--concurrency`` clients each send a request, wait for its answer and send the next: one PNG as a
raw body, or ``--images-per-request`` PNGs as multipart files. When the warm-up is over it prints
``window start`` and, when the window is over, ``window end`` (flushed), so that the process that
started it can read the servers' CPU time at the window's edges.

Warm-up and window are sized to the queue, not only to the clock. All clients start at once, so
the server's queue first fills: one queue round (every client answered once: clients x images per
request / the server's rate) passes before the loop is at steady state. The warm-up lasts at least
``--warmup`` seconds and until every client has been answered ``--warmup-rounds`` times (2 full
rounds; at most ``--max-warmup`` seconds); the window then lasts at least ``--seconds`` and
``--window-rounds`` rounds (3), a round being the slowest latency of the clients' last answers in
the warm-up (in a closed loop a request's latency is one round: Little's law). A point whose p50
latency is as long as its window, or with no request answered inside the window, is marked
``valid: false`` with the reason: its rate does not describe a steady state, and the benchmarks
leave it out of their picks (bench.serve_throughput.best). With a fixed 1 s warm-up, 48 clients x 8
images against a model answering 17-20 img/s (a round of about 20 s) saw only the queue filling,
and reported 39.6 img/s.

Throughput is the work done inside the window: each answered request counts the share of its time
(sent to answered) that lies inside it, so a request wholly inside counts 1 and one that straddles
an edge counts its part. To learn those parts, the clients keep the load on after the window closes
until every request sent before then is answered (``--drain`` seconds, or 2 rounds, at most; requests
still unanswered then count nothing and are reported as ``unfinished``). Counting only the requests
answered inside the window would quantize the rate by whole rounds: at saturation a batching
server answers the clients in step, a round of ``concurrency`` requests at a time, and an 8 s
window holding about 7.7 rounds of a heavy model counted 7 or 8 of them (-9% or +4%).

The result: requests and images answered per second, p50/p99 latency and errors by status (of the
requests answered inside the window), the warm-up and window actually used (``warmup_s``,
``window_s``, ``round_s``), ``valid`` (and ``invalid_reason``), and the load generator's own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

DRAIN_S = 30.0  # default seconds to wait, after the window, for the requests sent inside it
WARMUP_ROUNDS = 2  # default full queue rounds of warm-up
WINDOW_ROUNDS = 3  # default queue rounds the window spans at least
MAX_WARMUP_S = 300.0  # default: the window starts then even if the warm-up rounds are not done
REQUEST_TIMEOUT_S = 300.0  # one request, end to end


def invalid_reason(p50_ms: float | None, ok: int, window_s: float, warmup_rounds_done: bool = True) -> str | None:
    """Why a closed-loop point's rate does not describe a steady state, or None when it does."""
    if not ok or p50_ms is None:
        return "no request answered inside the window"
    if p50_ms >= 1000 * window_s:
        return f"p50 latency {p50_ms / 1000:.1f} s >= the {window_s:.1f} s window"
    if not warmup_rounds_done:
        return "the warm-up ended (--max-warmup) before every client was answered the warm-up rounds"
    return None


def row_invalid(row: dict, window_s: float | None = None) -> str | None:
    """Why a result row of :func:`run` is invalid, or None. Rows from before the validity check
    carry no ``valid``: they are judged from their p50 and answers against ``window_s`` (their
    fixed window) when it is given."""
    if "valid" in row:
        return None if row["valid"] else row.get("invalid_reason", "invalid")
    length = row.get("window_s", window_s)
    if length is None:
        return None if row.get("ok") else "no request answered inside the window"
    return invalid_reason(row.get("p50_ms"), row.get("ok", 0), length)


def window_length(seconds: float, round_s: float, window_rounds: float) -> float:
    """The measured window: at least ``seconds`` and ``window_rounds`` queue rounds."""
    return max(seconds, window_rounds * round_s)


async def run(url: str, images: list[bytes], concurrency: int, seconds: float, warmup_s: float,
              per_request: int, headers: dict[str, str], marks: bool = False, drain_s: float = DRAIN_S,
              warmup_rounds: int = 0, window_rounds: float = 0.0, max_warmup_s: float = MAX_WARMUP_S) -> dict:
    """The closed loop; ``marks`` prints the window's edges (for the process reading the CPU times).
    ``warmup_rounds`` / ``window_rounds`` 0: a fixed ``warmup_s`` and a fixed ``seconds`` window."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    share = 0.0  # the window's share of the answered requests
    pending = 0  # requests sent before the window closed and not answered yet
    answered = [0] * concurrency  # answers per client (any status) so far
    last_latency = [0.0] * concurrency  # each client's latest answer's latency (s)
    drained, closed = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    started_at = time.perf_counter()
    # the window's edges, known once the warm-up is over
    window = {"from": math.inf, "to": math.inf, "round_s": None, "rounds_done": True}

    def start_window(forced: bool = False) -> None:
        if window["from"] != math.inf:
            return
        now = time.perf_counter()
        round_s = max(last_latency) if warmup_rounds else 0.0
        length = window_length(seconds, round_s, window_rounds)
        window.update({"from": now, "to": now + length, "round_s": round_s,
                       "rounds_done": not forced or min(answered) >= warmup_rounds})
        if marks:
            print("window start", flush=True)
        loop.call_later(length, end_window)

    def end_window() -> None:
        if marks:
            print("window end", flush=True)
        closed.set()

    def maybe_start() -> None:
        if time.perf_counter() - started_at >= warmup_s and min(answered) >= warmup_rounds:
            start_window()

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
        while (sent := time.perf_counter()) < window["to"] or pending:  # the load stays on while draining
            counted = sent < window["to"]
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
            answered[k] += 1
            last_latency[k] = done - sent
            if window["from"] == math.inf:
                maybe_start()
            if not counted:
                continue
            pending -= 1
            measure_from, stop_at = window["from"], window["to"]
            if status == 200 and (inside := min(done, stop_at) - max(sent, measure_from)) > 0:
                share += inside / (done - sent)
            if measure_from <= done <= stop_at:
                if status == 200:
                    latencies.append(done - sent)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            if not pending and closed.is_set():
                drained.set()

    loop.call_later(warmup_s, maybe_start)
    loop.call_later(max(warmup_s, max_warmup_s), start_window, True)
    cpu0 = time.process_time()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(k, session)) for k in range(concurrency)]
        await closed.wait()
        if pending:  # only requests sent before the window closed are waited for
            drained.clear()
            try:  # a request sent as the window closed takes about a round
                await asyncio.wait_for(drained.wait(), max(drain_s, 2 * (window["round_s"] or 0.0)))
            except asyncio.TimeoutError:
                pass
        unfinished = pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    length = window["to"] - window["from"]
    lat = np.array(latencies) * 1000
    p50 = float(np.percentile(lat, 50)) if len(lat) else None
    why = invalid_reason(p50, len(latencies), length, window["rounds_done"])
    return {"concurrency": concurrency, "images_per_request": per_request,
            "requests_per_s": share / length, "images_per_s": share * per_request / length,
            "p50_ms": p50, "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "ok": len(latencies), "unfinished": unfinished, "errors": errors,
            "warmup_s": window["from"] - started_at, "window_s": length, "round_s": window["round_s"],
            "valid": why is None, **({"invalid_reason": why} if why else {}),
            "loadgen_cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of .png files to send")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="the window's least length (s)")
    parser.add_argument("--warmup", type=float, default=1.0, help="the warm-up's least length (s)")
    parser.add_argument("--warmup-rounds", type=int, default=WARMUP_ROUNDS,
                        help="the warm-up lasts until every client has been answered this many times")
    parser.add_argument("--window-rounds", type=float, default=WINDOW_ROUNDS,
                        help="the window spans at least this many queue rounds (a round: the slowest of "
                             "the clients' last warm-up latencies)")
    parser.add_argument("--max-warmup", type=float, default=MAX_WARMUP_S,
                        help="seconds after which the window starts even if the warm-up rounds are not done "
                             "(the point is then marked invalid)")
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
                             args.images_per_request, headers, marks=True, drain_s=args.drain,
                             warmup_rounds=args.warmup_rounds, window_rounds=args.window_rounds,
                             max_warmup_s=args.max_warmup))
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
