"""The `xlserve` command: `xlserve serve api_server [MODEL] [flags]`, with LMDeploy's flags, and
`xlserve serve api_client URL`, a console chat with a running server.

It builds the same app as `serving.app` (from flags instead of the environment) and runs Hypercorn
in-process. SIGINT/SIGTERM start a graceful shutdown: readiness turns false and new requests get 503
while the requests in flight finish (for up to `--shutdown-timeout` seconds, then they are aborted);
then Hypercorn closes and the process exits 0. A second signal stops at once. The server also stops
(exit status 1) when the model fails to compile, rather than staying up without ever becoming ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from serving.http.options import Launch, OptionError, add_arguments, from_arguments
from serving.text.templates import list_templates

if TYPE_CHECKING:  # the server's state pulls in transformers, which `api_client` does without
    from serving.http.state import ServerState


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlserve", description="LLM serving on JAX/XLA with an OpenAI API.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "list-templates",
        help="List the built-in chat templates (for --chat-template).",
        description="List the built-in chat templates, the model families they serve and the words that end "
        "their turns.",
    )
    serve = commands.add_parser("serve", help="Run a server.")
    servers = serve.add_subparsers(dest="server", metavar="SERVER")
    api_server = servers.add_parser(
        "api_server",
        help="Serve a model over the OpenAI-compatible HTTP API.",
        description="Serve a model over the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models), with Swagger UI at / and probes at /health and /v1/ready. "
        "Every flag can also be given to `hypercorn serving.app:app` as an XLSERVE_* environment variable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(api_server)
    api_client = servers.add_parser(
        "api_client",
        help="Chat with a running server in the terminal.",
        description="Chat with a running server on one interactive session (/v1/chat/interactive): the answer "
        "streams as it is written; `end` starts the conversation over, `exit` ends it and quits, Ctrl-C stops "
        "an answer.",
    )
    api_client.add_argument("api_server_url", metavar="URL", help="the server, e.g. http://localhost:23333")
    api_client.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    api_client.add_argument("--session-id", type=int, default=1, help="the interactive session's id")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list-templates":
        print(list_templates())
        return 0
    if args.command == "serve" and args.server == "api_client":
        from serving.client import console

        return console(args.api_server_url, args.api_key, args.session_id)
    if args.command != "serve" or args.server != "api_server":
        parser.print_help()
        return 2
    try:
        launch = from_arguments(args)
    except OptionError as error:
        parser.error(str(error))
    logging.basicConfig(level=launch.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported after the flags are checked: `-h` and flag errors answer without loading JAX.
    from serving.http.factory import create_app, load_engine

    print(f"xlserve: loading {launch.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
    try:
        engine = load_engine(launch)
    except (OSError, ValueError) as error:
        print(f"xlserve: error: cannot load the model: {error}", file=sys.stderr)
        return 1
    app = create_app(engine, launch.settings)
    _exit_now(asyncio.run(serve(app, launch)))


def _exit_now(status: int) -> NoReturn:
    """End the process once the server has stopped, without the interpreter's teardown: unloading torch,
    transformers and JAX module by module took 2 to 4 s, which a shutdown (and an orchestrator's grace
    period) would otherwise wait for after all the work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


async def serve(app: Quart, launch: Launch, shutdown_trigger: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run Hypercorn until a signal (or `shutdown_trigger`, for callers off the main thread) and the
    drain after it, or a failed start; 1 if the engine failed to start, else 0."""
    state: ServerState = app.extensions["xlserve"]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # tells Hypercorn to close its sockets and connections
    draining: list[asyncio.Task] = []

    def shut_down() -> None:
        if draining:  # asked again while draining: stop now
            stop.set()
            return
        draining.append(loop.create_task(_drain_then_stop(state, launch.shutdown_timeout, stop)))

    if shutdown_trigger is None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, shut_down)
    else:
        loop.create_task(_call_after(shutdown_trigger, shut_down))
    config = HypercornConfig()
    host = f"[{launch.host}]" if ":" in launch.host else launch.host
    config.bind = [f"{host}:{launch.port}"]
    config.loglevel = launch.log_level
    # Hypercorn's default accept queue (100) overflowed when a thousand clients connected at once, and
    # the kernel then dropped connections that clients believed open (B2 saw them fail as read errors).
    config.backlog = 2048
    # No Hypercorn access log: the app writes its own (`xlserve.access`, with request ids) at INFO.
    watcher = loop.create_task(_announce(state, f"http://{host}:{launch.port}", stop))
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
    finally:
        watcher.cancel()
        for task in draining:
            task.cancel()
    return 1 if state.load_error is not None else 0


async def _call_after(trigger: Callable[[], Awaitable[None]], action: Callable[[], None]) -> None:
    await trigger()
    action()


async def _drain_then_stop(state: ServerState, timeout: float, stop: asyncio.Event) -> None:
    try:
        await state.drain(timeout)
    finally:
        stop.set()


async def _announce(state: ServerState, url: str, stop: asyncio.Event) -> None:
    """Say when the server is ready (or why it is not, then stop it)."""
    began = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        # Polled rather than waited on a thread: a pending wait would hold up the exit on Ctrl-C.
        while not state.settled.is_set():
            await asyncio.sleep(0.2)
        if state.load_error is not None:
            print(f"xlserve: error: the engine failed to start: {state.load_error}", file=sys.stderr, flush=True)
            stop.set()
            return
        print(
            f"xlserve: {state.settings.model_name} ready after {time.monotonic() - began:.1f}s: "
            f"OpenAI API at {url}/v1, Swagger UI at {url}/",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
