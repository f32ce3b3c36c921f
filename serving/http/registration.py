"""An api_server's registration with a proxy (`--proxy-url`): LMDeploy's `register_to_proxy`, done once the
server can serve.

LMDeploy's api_server registered as it started, before its listener or its model was ready, so the
proxy sent requests that failed. Here the server waits until its own /v1/ready answers 200 at the URL
it registers (proving what the proxy will reach), then POSTs LMDeploy's body `{url, status: {models,
role}}` to the proxy's /nodes/add, retrying while the proxy is unreachable or answers 5xx (it may start
after its nodes). On SIGTERM the CLI deregisters (/nodes/remove) before it drains, so the proxy stops
sending new requests while those in flight finish here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable

import httpx

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # waits between attempts to register; the last repeats
UNREACHABLE_WARNING_S = 10.0


def advertised_url(host: str, port: int, proxy_url: str) -> str:
    """The URL the proxy reaches this server at: `http://host:port`, where a wildcard host (0.0.0.0,
    ::) becomes this machine's address on the route to the proxy (no packet is sent to find it)."""
    if host in ("", "0.0.0.0", "::"):
        proxy = urllib.parse.urlsplit(proxy_url)
        family = socket.AF_INET6 if ":" in (proxy.hostname or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((proxy.hostname, proxy.port or 80))
            host = probe.getsockname()[0]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # an IPv6 address in brackets


class ProxyRegistration:
    def __init__(self, proxy_url: str, node_url: str, model_name: str, api_key: str | None):
        self.proxy_url = proxy_url.rstrip("/")
        self.node_url = node_url
        self.model_name = model_name
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.registered = False

    async def register_when_ready(self, is_ready: Callable[[], bool]) -> None:
        """Wait for this server's own /v1/ready, then register; gives up only on a 4xx (a wrong key or
        URL will not fix itself), which it reports. `is_ready`: whether the server itself says it is
        ready, to tell a URL that does not reach it from a model still loading."""
        body = {"url": self.node_url, "status": {"models": [self.model_name], "role": "Hybrid"}}
        async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as client:
            ready_since: float | None = None
            warned = False
            while not await _answers_200(client, f"{self.node_url}/v1/ready"):
                if not is_ready():
                    ready_since = None
                elif ready_since is None:
                    ready_since = time.monotonic()
                elif time.monotonic() - ready_since > UNREACHABLE_WARNING_S and not warned:
                    logger.warning("this server is ready but does not answer at %s, the URL it would register with "
                                   "the proxy; set --server-name to an address the proxy can reach", self.node_url)
                    warned = True
                await asyncio.sleep(0.25)
            for attempt in itertools.count():
                try:
                    answer = await client.post(f"{self.proxy_url}/nodes/add", json=body, headers=self.headers)
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                else:
                    if answer.status_code == 200:
                        self.registered = True
                        print(f"xlserve: registered {self.node_url} with the proxy at {self.proxy_url}",
                              file=sys.stderr, flush=True)
                        return
                    problem = f"{answer.status_code}: {answer.text[:300]}"
                    if answer.status_code < 500:
                        logger.error("the proxy at %s refused to register %s: %s", self.proxy_url, self.node_url,
                                     problem)
                        return
                if attempt == 0:
                    logger.warning("cannot register with the proxy at %s yet (%s); retrying", self.proxy_url, problem)
                await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])

    async def deregister(self) -> None:
        """Leave the proxy's rotation (a no-op if never registered); failures are logged, not raised."""
        if not self.registered:
            return
        try:
            async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as client:
                answer = await client.post(f"{self.proxy_url}/nodes/remove", json={"url": self.node_url},
                                           headers=self.headers)
            if answer.status_code not in (200, 404):  # 404: the proxy had dropped it already
                logger.warning("the proxy at %s answered %d to deregistering %s", self.proxy_url,
                               answer.status_code, self.node_url)
        except httpx.HTTPError as error:
            logger.warning("cannot deregister from the proxy at %s: %s", self.proxy_url, error)
        self.registered = False


async def _answers_200(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False
