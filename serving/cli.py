"""The `xlserve` command: `xlserve serve api_server [MODEL] [flags]`, with LMDeploy's flags (with `--dp N`,
N of them behind one proxy, `serving.proxy.replicas`), `xlserve serve proxy [flags]`, one address in front
of many api_servers (`serving.proxy`), `xlserve serve api_client URL`, a console chat with a running
server, and `xlserve serve webui URL` (or LMDeploy's `serve gradio URL`), the chat page for a running server.

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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart

from serving.http.options import Launch, OptionError, add_arguments, from_arguments
from serving.http.progress import StartupDisplay
from serving.http.registration import ProxyRegistration, advertised_url
from serving.proxy.options import add_proxy_arguments, proxy_from_arguments
from serving.text.templates import list_templates

WEBUI_PORT = 6006  # LMDeploy's `serve gradio` port

if TYPE_CHECKING:  # the server's state pulls in transformers, which `api_client` does without
    from serving.http.state import ServerState


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Names a flag's default where the parser holds one; a flag whose default lies elsewhere (None here: the
    engine's config, an environment variable) says so in its own help instead of "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


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
        "/v1/completions, /v1/models), with a chat page at /chat, Swagger UI at / and probes at /health and "
        "/v1/ready. "
        "Every flag can also be given to `hypercorn serving.app:app` as an XLSERVE_* environment variable.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_arguments(api_server)
    proxy = servers.add_parser(
        "proxy",
        help="Serve many api_servers behind one address.",
        description="One OpenAI-compatible address in front of many api_servers (LMDeploy's `serve proxy`): they "
        "register with --proxy-url (or POST /nodes/add, or --node-file), and each request goes where "
        "--routing-strategy says. Swagger UI at /, /nodes/* behind --admin-api-keys.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_proxy_arguments(proxy)
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
    for name, help in (("webui", "Serve the chat page for a running API server."),
                       ("gradio", "LMDeploy's name for `serve webui` (no gradio needed).")):
        webui = servers.add_parser(
            name,
            help=help,
            description="Serve the chat page (/chat; / redirects there) for an API server running elsewhere: "
            "the page's API calls are forwarded to it, with the API key typed in the page.",
            formatter_class=DefaultsHelpFormatter,
        )
        webui.add_argument("api_server_url", metavar="API_URL", help="the API server, e.g. http://localhost:23333")
        webui.add_argument("--server-name", default="0.0.0.0", help="Host to listen on.")
        webui.add_argument("--server-port", type=int, default=WEBUI_PORT, help="Port to listen on.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "list-templates":
        print(list_templates())
        return 0
    if args.command == "serve" and args.server == "api_client":
        from serving.client import console

        # Ctrl-C stops an answer even when the console was started with SIGINT ignored (from a background
        # job of a script: Python then installs no handler of its own and the answer could not be stopped).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return console(args.api_server_url, args.api_key, args.session_id)
    if args.command == "serve" and args.server == "proxy":
        return _serve_proxy(parser, args)
    if args.command == "serve" and args.server in ("webui", "gradio"):
        return serve_webui(args.api_server_url, args.server_name, args.server_port)
    if args.command != "serve" or args.server != "api_server":
        parser.print_help()
        return 2
    try:
        launch = from_arguments(args)
    except OptionError as error:
        parser.error(str(error))
    logging.basicConfig(level=launch.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if launch.dp > 1:
        from serving.proxy.replicas import ReplicaError, serve_replicas

        try:
            return serve_replicas(launch, sys.argv[1:] if argv is None else argv)
        except ReplicaError as error:
            parser.error(str(error))
    # Imported after the flags are checked: `-h` and flag errors answer without loading JAX.
    from serving.engine.multihost import resolve_group

    try:
        group = resolve_group(**_group_options(launch))
    except ValueError as error:
        parser.error(str(error))
    if group is not None and not group.is_leader:
        from model.source import resolve_model
        from serving.engine.follower import run_follower

        model_path = resolve_model(launch.model, launch.revision, launch.download_dir) if launch.model else None
        return run_follower(model_path, launch.engine_config, launch.host, launch.port)
    from serving.http.engine_loader import load_engine  # the HTTP stack only once the engine process is on its way

    display = StartupDisplay(sys.stderr)
    print(f"xlserve: loading {launch.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
    try:
        engine = load_engine(launch, on_startup=display)
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: the engine process died loading it
        print(f"xlserve: error: cannot load the model: {error}", file=sys.stderr)
        return 1
    from serving.http.factory import create_app

    app = create_app(engine, launch.settings)
    _exit_now(asyncio.run(serve(app, launch, display=display)))


def _exit_now(status: int) -> NoReturn:
    """End the process once the server has stopped, without the interpreter's teardown: unloading torch,
    transformers and JAX module by module took 2 to 4 s, which a shutdown (and an orchestrator's grace
    period) would otherwise wait for after all the work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _serve_proxy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        launch = proxy_from_arguments(args)
    except OptionError as error:
        parser.error(str(error))
    logging.basicConfig(level=launch.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.proxy.app import create_proxy_app
    from serving.proxy.server import serve_proxy

    try:
        app = create_proxy_app(launch.settings)
    except ValueError as error:  # its node file
        parser.error(str(error))
    return asyncio.run(serve_proxy(app, launch.host, launch.port, launch.log_level, launch.shutdown_timeout))


GROUP_LOST_GRACE_S = 1.0


def _group_options(launch: Launch) -> dict:
    config = launch.engine_config
    return dict(nnodes=config.nnodes, node_rank=config.node_rank, dist_init_addr=config.dist_init_addr,
                timeout=config.dist_timeout, init_timeout=config.dist_init_timeout)


async def serve(app: Quart, launch: Launch, shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                display: StartupDisplay | None = None) -> int:
    """Run Hypercorn until a signal (or `shutdown_trigger`, for callers off the main thread) and the
    drain after it, or a failed start; 1 if the engine failed to start, else 0. `display` shows the
    buckets compiling and the ready line (default: a new one on stderr). With `--proxy-url`, the server
    registers once ready and, on the signal, deregisters before it drains."""
    state: ServerState = app.extensions["xlserve"]
    display = display or StartupDisplay(sys.stderr)
    state.engine.on_startup = display  # the engine has not started: it reports each bucket it compiles
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # tells Hypercorn to close its sockets and connections
    draining: list[asyncio.Task] = []
    registration = None
    if launch.proxy_url is not None:
        node_url = advertised_url(launch.host, launch.port, launch.proxy_url)
        registration = ProxyRegistration(launch.proxy_url, node_url, state.settings.model_name, launch.proxy_api_key)
    registering = (loop.create_task(registration.register_when_ready(lambda: state.engine.ready))
                   if registration else None)

    def shut_down() -> None:
        if draining:  # asked again while draining: stop now
            stop.set()
            return
        if registering is not None:
            registering.cancel()
        leave = registration.deregister if registration else None
        draining.append(loop.create_task(_drain_then_stop(state, launch.shutdown_timeout, stop, leave)))

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
    watcher = loop.create_task(_announce(state, display, f"http://{host}:{launch.port}", stop))
    group_lost = asyncio.Event()
    from serving.engine.multihost import resolve_group

    if resolve_group(**_group_options(launch)) is not None:
        watcher.add_done_callback(lambda _: loop.create_task(_end_with_group(state, stop, group_lost)))
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)
    finally:
        watcher.cancel()
        if registering is not None:
            registering.cancel()
        for task in draining:
            task.cancel()
    if group_lost.is_set():
        from serving.engine.multihost import EXIT_LOST_PEER

        return EXIT_LOST_PEER
    return 1 if state.load_error is not None else 0


def serve_webui(api_url: str, host: str, port: int) -> int:
    """`xlserve serve webui URL`: the chat page for the API server at `api_url`, until Ctrl-C or SIGTERM."""
    from serving.http.webui_remote import create_webui_app, normalize_api_url

    app = create_webui_app(api_url)
    config = HypercornConfig()
    bound = f"[{host}]" if ":" in host else host
    config.bind = [f"{bound}:{port}"]
    print(f"xlserve: chat page for {normalize_api_url(api_url)} at http://{bound}:{port}/chat", file=sys.stderr,
          flush=True)
    asyncio.run(hypercorn_serve(app, config))  # Hypercorn stops on SIGINT and SIGTERM
    return 0


async def _call_after(trigger: Callable[[], Awaitable[None]], action: Callable[[], None]) -> None:
    await trigger()
    action()


async def _drain_then_stop(state: ServerState, timeout: float, stop: asyncio.Event,
                           leave: Callable[[], Awaitable[None]] | None = None) -> None:
    try:
        if leave is not None:  # out of the proxy's rotation first: it sends nothing new while we drain
            await leave()
        await state.drain(timeout)
    finally:
        stop.set()


async def _end_with_group(state: ServerState, stop: asyncio.Event, lost: asyncio.Event) -> None:
    """Rank 0 of several hosts: once its engine has died (a follower was lost), stop serving and exit
    non-zero, so the group is restarted together instead of answering 503 forever."""
    with contextlib.suppress(asyncio.CancelledError):
        while not stop.is_set() and (not state.started or state.healthy):
            await asyncio.sleep(0.2)
        if not stop.is_set():
            print("xlserve: error: the group lost a host; stopping", file=sys.stderr, flush=True)
            lost.set()
            await asyncio.sleep(GROUP_LOST_GRACE_S)  # probes see the 503 before the port closes
            stop.set()


async def _announce(state: ServerState, display: StartupDisplay, url: str, stop: asyncio.Event) -> None:
    """Say when the server is ready (or why it is not, then stop it)."""
    with contextlib.suppress(asyncio.CancelledError):
        # Polled rather than waited on a thread: a pending wait would hold up the exit on Ctrl-C.
        while not state.settled.is_set():
            await asyncio.sleep(0.2)
        if state.load_error is not None:
            print(f"xlserve: error: the engine failed to start: {state.load_error}", file=sys.stderr, flush=True)
            stop.set()
            return
        summary = await asyncio.to_thread(display.summary, state, url)  # an engine process is asked its stats
        print(summary, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
