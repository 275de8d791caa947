"""Soak and replica-kill scenarios for the Serve app, shared by bench and the tests.

    python -m bench.reliability [--soak-seconds 300] [--fraction 0.7] [--replicas 2]

Standalone, it starts a local Ray instance and a Serve app of the same
ResNet-18 (1/4 width) bench.serve_throughput uses, then

1. measures the app's capacity (closed loop, 8 clients, images/s), and soaks
   it at ``--fraction`` of that rate (open loop: requests are sent on a fixed
   schedule whether or not earlier ones have been answered) for
   ``--soak-seconds``: errors, p99 per window and its drift (p99 of the last
   third over the first third), and each replica's resident memory growth;
2. kills one of ``--replicas`` replicas under the same open-loop load and
   reports the failed-request fraction and the time until Serve runs the full
   replica count again and answers every request.

tests/integration/test_serve.py runs both, shorter, against the test app and
asserts the thresholds stated there. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import save


# --------------------------------------------------------------------------- load

SHED = "503"  # the overload answer: 503 with Retry-After (the client is told when to come back)
NO_RETRY_AFTER = "503 without Retry-After"  # a 503 that is not the overload answer: an error


async def _open_loop(url: str, images: list[bytes], rate: float, seconds: float, headers: dict,
                     timeout_s: float, stop=None) -> list[tuple[float, float, str]]:
    """POST one image every 1/rate s for ``seconds`` (or until ``stop()``): (sent at s, latency s, status)."""
    import aiohttp

    records: list[tuple[float, float, str]] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(i: int, at: float) -> None:
            sent = time.perf_counter()
            try:
                async with session.post(url, data=images[i % len(images)],
                                        headers={"Content-Type": "image/png", **headers}) as r:
                    await r.read()
                    status = str(r.status)
                    if r.status == 503 and "Retry-After" not in r.headers:
                        status = NO_RETRY_AFTER
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            records.append((at, time.perf_counter() - sent, status))

        tasks, i = [], 0
        while (at := i / rate) < seconds and not (stop and stop()):
            delay = started + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at)))
            i += 1
        await asyncio.gather(*tasks)
    return sorted(records)


def open_loop(url: str, images: list[bytes], rate: float, seconds: float, headers: dict | None = None,
              timeout_s: float = 30.0, stop=None) -> list[tuple[float, float, str]]:
    return asyncio.run(_open_loop(url, images, rate, seconds, headers or {}, timeout_s, stop))


def capacity(url: str, images: list[bytes], headers: dict | None = None, concurrency: int = 8,
             seconds: float = 5.0) -> float:
    """Saturated throughput (images/s, one image a request) with ``concurrency`` closed-loop clients."""
    from bench.serve_throughput import load

    row = asyncio.run(load(url, images, concurrency, seconds, headers=headers))
    if row["errors"]:
        raise RuntimeError(f"errors while measuring capacity: {row['errors']}")
    return row["images_per_s"]


def p99_ms(latencies: list[float]) -> float | None:
    return float(np.percentile(np.array(latencies) * 1000, 99)) if latencies else None


# --------------------------------------------------------------------------- replicas


def replica_actors(app: str, deployment: str = "Classifier") -> list:
    """The app's live replica actors (Ray's state API, so the dashboard must run), of this driver's
    Ray instance (not whichever /tmp/ray/ray_current_cluster names)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, raise_on_missing_output=False,
                       filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])


def replica_pids(app: str, deployment: str = "Classifier") -> list[int]:
    return sorted(a.pid for a in replica_actors(app, deployment))


def rss_mb(pid: int) -> float | None:
    """Resident memory of a local process in MB (Linux /proc), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def running_replicas(app: str, deployment: str = "Classifier") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


# --------------------------------------------------------------------------- scenarios


def soak(url: str, app: str, images: list[bytes], *, seconds: float, fraction: float = 0.7,
         window_s: float = 5.0, headers: dict | None = None, capacity_rps: float | None = None,
         log=print) -> dict:
    """The app at ``fraction`` of its capacity for ``seconds``: errors, p99 drift, replica memory growth."""
    cap = capacity_rps or capacity(url, images, headers)
    rate = fraction * cap
    log(f"soak: capacity {cap:.1f} img/s; {rate:.1f} req/s ({fraction:.0%}) for {seconds:.0f} s")
    pids = replica_pids(app)
    memory: dict[int, list[float]] = {pid: [] for pid in pids}
    done = threading.Event()

    def sample() -> None:  # one RSS reading per window, from before the first request to after the last
        while True:
            for pid in pids:
                if (mb := rss_mb(pid)) is not None:
                    memory[pid].append(mb)
            if done.wait(window_s):
                break
        for pid in pids:
            if (mb := rss_mb(pid)) is not None:
                memory[pid].append(mb)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    records = open_loop(url, images, rate, seconds, headers)
    done.set()
    sampler.join()

    result = {"capacity_images_per_s": cap, "fraction": fraction, "target_rate": rate,
              **summarize_soak(records, seconds, window_s, memory)}

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    log(f"soak: {result['sent']} requests, {result['answered']} answered ({result['achieved_rate']:.1f}/s), "
        f"{sum(result['errors'].values())} errors, {result['shed']} shed (503 + Retry-After), "
        f"p99 {ms(result['p99_first_third_ms'])} -> "
        f"{ms(result['p99_last_third_ms'])} ms (drift x{result['p99_drift'] or float('nan'):.2f}), replica RSS growth "
        f"{result['max_rss_growth_mb'] if result['max_rss_growth_mb'] is not None else float('nan'):+.1f} MB")
    return result


def answered(status: str) -> bool:
    """A 2xx response (status is the HTTP code as text, or the client exception's name)."""
    return status.isdigit() and 200 <= int(status) < 300


def shed(status: str) -> bool:
    """Load shedding by design: a 503 with Retry-After, which a client retries after the wait."""
    return status == SHED


def summarize_soak(records: list[tuple[float, float, str]], seconds: float, window_s: float,
                   memory: dict[int, list[float]] | None = None) -> dict:
    """The soak's figures from open_loop's ``(sent at s, latency s, status)`` records.

    ``achieved_rate`` is the rate of 2xx answers that arrived within the soak's ``seconds``
    (sent at + latency), so requests that failed, or that a falling-behind service answered
    only after the load stopped, do not count; ``sent / seconds`` is only the rate offered.
    ``shed`` counts the overload answers (503 with Retry-After: an open-loop client bursts to
    catch up after the shared cores stall, and the queue bound turns the excess away, as
    designed); ``errors`` counts every other non-2xx answer or client failure by status.
    """
    memory = memory or {}
    ok = [(at, lat) for at, lat, s in records if answered(s)]
    errors: dict[str, int] = {}
    n_shed = 0
    for _, _, status in records:
        if shed(status):
            n_shed += 1
        elif not answered(status):
            errors[status] = errors.get(status, 0) + 1
    windows = []
    for k in range(max(1, int(seconds // window_s))):
        lat = [lat for at, lat in ok if k * window_s <= at < (k + 1) * window_s]
        windows.append({"from_s": k * window_s, "answered": len(lat), "p99_ms": p99_ms(lat)})
    third = max(1, len(windows) // 3)
    last_windows = [w["p99_ms"] for w in windows[-third:] if w["p99_ms"] is not None]
    first = [lat for at, lat in ok if at < third * window_s]
    last = [lat for at, lat in ok if at >= seconds - third * window_s]
    growth = {str(pid): (v[-1] - v[0]) if len(v) >= 2 else None for pid, v in memory.items()}
    return {
        "seconds": seconds, "sent": len(records), "answered": len(ok),
        "achieved_rate": sum(at + lat <= seconds for at, lat in ok) / seconds,
        "errors": errors, "error_fraction": sum(errors.values()) / max(1, len(records)),
        "shed": n_shed, "shed_fraction": n_shed / max(1, len(records)),
        "p50_ms": float(np.percentile([r[1] * 1000 for r in records], 50)) if records else None,
        "p99_ms": p99_ms([lat for _, lat in ok]),
        "p99_first_third_ms": p99_ms(first), "p99_last_third_ms": p99_ms(last),
        "p99_drift": (p99_ms(last) / p99_ms(first)) if first and last else None,
        # a queue that builds up raises every later window's p99; a stall of the shared cores one
        # window's (and so the pooled p99 of its third): the median of the windows tells them apart
        "p99_last_third_window_median_ms": float(np.median(last_windows)) if last_windows else None,
        "windows": windows,
        "replica_rss_mb": {str(pid): v for pid, v in memory.items()},
        "replica_rss_growth_mb": growth,
        "max_rss_growth_mb": max((g for g in growth.values() if g is not None), default=None),
    }


def kill_replica_under_load(url: str, app: str, images: list[bytes], *, rate: float, kill_at_s: float = 3.0,
                            max_recover_s: float = 90.0, settle_s: float = 3.0, headers: dict | None = None,
                            log=print) -> dict:
    """SIGKILL-equivalent (ray.kill) of one replica while requests arrive at ``rate``/s.

    Reports the failed fraction of all requests, the failures' time span, and the
    recovery time: from the kill until Serve runs the full replica count again.
    """
    import ray

    want = running_replicas(app)
    if want < 2:
        raise ValueError(f"app {app!r} runs {want} replica(s); the scenario needs at least 2")
    state: dict = {}

    def kill_then_watch() -> None:
        try:
            time.sleep(kill_at_s)
            victim = replica_actors(app)[0]
            ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace or "serve"), no_restart=True)
            state["killed"] = time.perf_counter() - state["t0"]
            log(f"replica kill: killed {victim.name} (pid {victim.pid}) at {state['killed']:.1f} s")
            deadline = time.monotonic() + max_recover_s
            while time.monotonic() < deadline:
                time.sleep(0.25)
                pids = replica_pids(app)
                if victim.pid not in pids and len(pids) >= want and running_replicas(app) >= want:
                    state["recovered"] = time.perf_counter() - state["t0"]
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            state["error"] = exc

    # Requests arrive until settle_s after recovery (or max_recover_s after the kill at most).
    watcher = threading.Thread(target=kill_then_watch, daemon=True)
    state["t0"] = time.perf_counter()
    watcher.start()

    def settled() -> bool:
        return "recovered" in state and time.perf_counter() - state["t0"] > state["recovered"] + settle_s

    records = open_loop(url, images, rate, kill_at_s + max_recover_s + settle_s, headers, stop=settled)
    watcher.join(timeout=5)
    if "error" in state:
        raise RuntimeError(f"replica kill scenario failed: {state['error']!r}") from state["error"]
    if "recovered" not in state:
        raise TimeoutError(f"app {app!r} was not back to {want} replicas {max_recover_s} s after the kill")
    killed, recovered = state["killed"], state["recovered"]
    failed = [(at, s) for at, _, s in records if s != "200"]
    after = [s for at, _, s in records if at > recovered]
    result = {
        "replicas": want, "rate": rate, "sent": len(records), "failed": len(failed),
        "failed_fraction": len(failed) / max(1, len(records)),
        "failure_statuses": sorted({s for _, s in failed}),
        "failures_from_s": (min(at for at, _ in failed) - killed) if failed else None,
        "failures_until_s": (max(at for at, _ in failed) - killed) if failed else None,
        "time_to_recover_s": recovered - killed,
        "sent_after_recovery": len(after), "failed_after_recovery": sum(s != "200" for s in after),
        "running_replicas_after": running_replicas(app),
    }
    log(f"replica kill: {result['failed']} of {result['sent']} requests failed ({result['failed_fraction']:.1%}, "
        f"{result['failure_statuses']}); full replica count again {result['time_to_recover_s']:.1f} s after the kill")
    return result


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--fraction", type=float, default=0.7, help="of the measured capacity, during the soak")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per p99 / memory window")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the app (the kill needs >= 2)")
    parser.add_argument("--kill-fraction", type=float, default=0.5, help="load during the kill, of capacity")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--name", default="reliability", help="results file name under bench/results")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.serve_throughput import MODEL, digit_pngs, make_model_file, wait_ready
    from jobs.common import free_port
    from imgcls_core.registry import CHAMPION, Registry, register_model_file
    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="imgcls-bench-reliability-"))
    model_file = make_model_file(tmp / "model.pt", args.image_size, args.width)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version = register_model_file(uri, MODEL, model_file, experiment="bench")
    Registry(uri, MODEL).set_alias(CHAMPION, str(version.version))
    from jobs.common import init_local_ray

    init_local_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(), configure_logging=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"tracking_uri": uri, "model_name": MODEL, "num_cpus": 0.5, "torch_threads": 1,
                         "min_replicas": args.replicas, "max_replicas": args.replicas, "poll_interval_s": 0}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/predict"
    images = digit_pngs()
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        soaked = soak(url, "bench", images, seconds=args.soak_seconds, fraction=args.fraction, window_s=args.window)
        killed = kill_replica_under_load(url, "bench", images,
                                         rate=args.kill_fraction * soaked["capacity_images_per_s"])
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"config": vars(args), "soak": soaked, "replica_kill": killed}
    save(args.name, result)
    return result


if __name__ == "__main__":
    main()
