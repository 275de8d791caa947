"""A stand-in HTTP server for tests of clients above it (the load generators): a real aiohttp server
on a free loopback port, in a thread, answering POST / with ``handler``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from jobs.common import free_port


@contextmanager
def stub_server(handler) -> Iterator[str]:  # noqa: ANN001 - an aiohttp request handler
    """``handler`` serving ``POST /`` at the URL yielded, until the block ends."""
    from aiohttp import web

    port, ready, stop = free_port(), threading.Event(), threading.Event()

    def serve() -> None:
        async def run():
            app = web.Application()
            app.router.add_post("/", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            await runner.cleanup()
        asyncio.run(run())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    assert ready.wait(10), "the stub server did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop.set()
        server.join(10)


def load_against(delay_s: float, **load_args) -> tuple[dict, float]:
    """``bench.serve_throughput.load`` (4 clients) against a server answering every POST after
    ``delay_s``, both in one event loop; ``(row, seconds taken)``."""
    from aiohttp import web

    from bench.serve_throughput import load

    async def handler(request):
        await request.read()
        await asyncio.sleep(delay_s)
        return web.Response(text="ok")

    async def run():
        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            started = time.perf_counter()
            row = await load(f"http://127.0.0.1:{port}/", [b"x"], concurrency=4, **load_args)
            return row, time.perf_counter() - started
        finally:
            await runner.cleanup()

    return asyncio.run(run())
