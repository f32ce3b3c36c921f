"""Running the proxy: Hypercorn in this process until SIGINT/SIGTERM (or a trigger, for a caller that
runs it beside other work, as `--dp` does). On the signal Hypercorn stops accepting connections and the
requests in flight get `shutdown_timeout` seconds to finish."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart


async def serve_proxy(
    app: Quart,
    host: str,
    port: int,
    log_level: str = "WARNING",
    shutdown_timeout: float = 30.0,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
) -> int:
    stop = asyncio.Event()
    if shutdown_trigger is None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        trigger = stop.wait
    else:
        trigger = shutdown_trigger
    config = HypercornConfig()
    bound = f"[{host}]" if ":" in host else host
    config.bind = [f"{bound}:{port}"]
    config.loglevel = log_level
    config.backlog = 2048  # as the api_server: a burst of clients must not overflow the accept queue
    config.graceful_timeout = shutdown_timeout
    print(f"xlserve: proxy listening at http://{bound}:{port}, Swagger UI at http://{bound}:{port}/",
          file=sys.stderr, flush=True)
    await hypercorn_serve(app, config, shutdown_trigger=trigger)
    return 0
