"""`xlserve serve api_server MODEL --dp N [--tp M]`: N api_servers on this host, each on its own M devices,
behind one proxy on --server-port. It is the LMDeploy guide's recipe (a torchrun script starting one
api_server per GPU group, each registering with `lmdeploy serve proxy`) as one command.

The devices are counted in a short child process, since initializing JAX here would claim every
accelerator for the proxy's process; asking for more than exist is an error before anything starts.
Each replica then sees only its own devices: CUDA_VISIBLE_DEVICES on GPUs, and on CPU (tests, with
XLA_FLAGS=--xla_force_host_platform_device_count) a host platform of M devices. Replicas are this
command's children, with this command's flags, on 127.0.0.1 ports of their own, registering with the
proxy here (`--proxy-url`) under an admin key made for this run and handed over in their environment,
never on a command line.

SIGTERM or SIGINT goes to the replicas (each leaves the proxy, then drains), then the proxy stops. A
replica that exits on its own stops the whole server with status 1, so an orchestrator restarts it
rather than leaving it serving on fewer replicas than asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from serving.proxy.app import create_proxy_app
from serving.proxy.server import serve_proxy
from serving.proxy.settings import ProxySettings
from serving.proxy.state import ProxyState

if TYPE_CHECKING:  # the options pull in JAX's module (never its devices), which this process does without
    from serving.http.options import Launch

logger = logging.getLogger(__name__)

COUNT_DEVICES = "import jax; print(jax.default_backend(), jax.local_device_count())"
HEALTH_CHECK_INTERVAL_S = 2.0  # replicas are local: notice a failed one quickly
EXIT_GRACE_S = 30.0  # beyond --shutdown-timeout, for a replica to exit before it is killed
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


class ReplicaError(ValueError):
    """The replicas cannot start as asked; the message says why."""


def count_devices(environ: Mapping[str, str]) -> tuple[str, int]:
    """This host's platform and device count, as a replica would see them (without claiming them:
    the child process exits, and does not preallocate accelerator memory)."""
    result = subprocess.run(
        [sys.executable, "-c", COUNT_DEVICES],
        env={**environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    words = result.stdout.split()
    if result.returncode != 0 or len(words) < 2 or not words[-1].isdigit():
        raise ReplicaError(f"cannot count this host's devices: {result.stderr.strip()[-500:]}")
    return words[-2], int(words[-1])


def replica_environments(platform: str, count: int, dp: int, tp: int,
                         environ: Mapping[str, str]) -> list[dict[str, str]]:
    """What each replica's environment sets so that it sees only its own `tp` devices."""
    if dp * tp > count:
        raise ReplicaError(f"--dp {dp} x --tp {tp} needs {dp * tp} devices; this host has {count} ({platform})")
    if platform == "gpu":
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(count)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * tp : (i + 1) * tp])} for i in range(dp)]
    if platform == "cpu":
        flags = _DEVICE_COUNT_FLAG.sub("", environ.get("XLA_FLAGS", "")).strip()
        return [{"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={tp}".strip()} for _ in range(dp)]
    raise ReplicaError(f"--dp does not support {platform} devices yet: start one api_server per device group "
                       "with --proxy-url, as docs/deployment.md shows")


def serve_replicas(launch: Launch, argv: Sequence[str]) -> int:
    """Run `launch.dp` replicas (each started with `argv`, the command's own arguments) behind a proxy."""
    if launch.proxy_url is not None or launch.proxy_api_key is not None:
        raise ReplicaError("--dp replicas register with their own proxy: --proxy-url and --proxy-api-key do not "
                           "apply (add this server to an outer proxy with POST /nodes/add instead)")
    platform, count = count_devices(os.environ)
    environments = replica_environments(platform, count, launch.dp, launch.engine_config.tp, os.environ)
    return asyncio.run(_supervise(launch, list(argv), environments))


async def _supervise(launch: Launch, argv: list[str], environments: list[dict[str, str]]) -> int:
    admin_key = secrets.token_urlsafe(24)
    user_keys = launch.settings.api_keys
    settings = ProxySettings(
        api_keys=user_keys,
        admin_api_keys=(admin_key,),
        node_api_key=user_keys[0] if user_keys else None,
        public_metrics=launch.settings.public_metrics,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )
    app = create_proxy_app(settings)
    proxy_url = f"http://{_local_address(launch.host)}:{launch.port}"
    replicas = []
    for environment in environments:
        command = [sys.executable, "-m", "serving.cli", *argv, "--dp", "1", "--server-name", "127.0.0.1",
                   "--server-port", str(_free_port()), "--proxy-url", proxy_url]
        # A session of its own: a terminal's Ctrl-C reaches the replicas only through here, once (a second
        # signal would make them stop at once instead of draining).
        replicas.append(await asyncio.create_subprocess_exec(
            *command, env={**os.environ, **environment, "XLSERVE_PROXY_API_KEY": admin_key}, start_new_session=True,
        ))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    proxy_stop = asyncio.Event()
    proxy = loop.create_task(serve_proxy(app, launch.host, launch.port, launch.log_level, launch.shutdown_timeout,
                                         shutdown_trigger=proxy_stop.wait))
    announcer = loop.create_task(_announce(app.extensions["xlserve_proxy"], len(replicas), launch))
    exits = [loop.create_task(replica.wait()) for replica in replicas]
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, proxy, *exits], return_when=asyncio.FIRST_COMPLETED)
    failed = not stop.is_set()
    if failed:
        logger.error("a replica or the proxy stopped on its own: stopping the server")
        print("xlserve: error: a replica exited; stopping the other replicas", file=sys.stderr, flush=True)
    announcer.cancel()
    await _stop_replicas(replicas, launch.shutdown_timeout + EXIT_GRACE_S)
    proxy_stop.set()
    stopping.cancel()
    try:
        await proxy
    except OSError as error:  # e.g. the port is taken
        print(f"xlserve: error: the proxy could not serve: {error}", file=sys.stderr, flush=True)
        return 1
    return 1 if failed else 0


async def _stop_replicas(replicas: list[asyncio.subprocess.Process], timeout: float) -> None:
    for replica in replicas:
        if replica.returncode is None:
            replica.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(replica.wait() for replica in replicas))
    except TimeoutError:
        for replica in replicas:
            if replica.returncode is None:
                replica.kill()
        await asyncio.gather(*(replica.wait() for replica in replicas))


async def _announce(state: ProxyState, expected: int, launch: Launch) -> None:
    while sum(node.healthy for node in state.registry) < expected:
        await asyncio.sleep(0.2)
    url = f"http://{launch.host}:{launch.port}"
    print(f"xlserve: {expected} replicas of {launch.settings.model_name} ready: OpenAI API at {url}/v1",
          file=sys.stderr, flush=True)


def _local_address(host: str) -> str:
    """Where a replica on this host reaches a proxy listening on `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
