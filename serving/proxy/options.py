"""`xlserve serve proxy` flags: LMDeploy's (`--server-name`, `--server-port` 8000, `--routing-strategy`,
`--api-keys`, `--serving-strategy`, `--disable-cache-status`) and ours, declared as the api_server's are
(`serving.http.options.Option`), keys also read from their XLSERVE_* variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass

from serving.http.options import LOG_LEVELS, Option, OptionError, add_options, read_secrets
from serving.proxy.settings import DEFAULT_HEALTH_CHECK_INTERVAL_S, DEFAULT_SESSION_KEY, STRATEGIES, ProxySettings

PROXY_OPTIONS: tuple[Option, ...] = (
    Option("--server-name", "cli", "server_name", "Host to listen on.", default="0.0.0.0"),
    Option("--server-port", "cli", "server_port", "Port to listen on.", type=int, default=8000),
    Option(
        "--routing-strategy",
        "cli",
        "routing_strategy",
        "How a node is picked: random (weighted by speed), min_expected_latency (fewest in flight), "
        "min_observed_latency (lowest recent latency), cache_aware (the node that saw the longest prefix of "
        "the prompt, unless it is much busier) or session (a hash ring on --session-key, else `user`). "
        "Default: cache_aware when every node reports prefix caching, else min_expected_latency.",
        choices=STRATEGIES,
    ),
    Option(
        "--session-key",
        "cli",
        "session_key",
        "The request header `session` routing hashes; without it, the `user` field.",
        default=DEFAULT_SESSION_KEY,
    ),
    Option(
        "--api-keys",
        "cli",
        "api_keys",
        "Keys for the OpenAI routes, /metrics and the docs (Authorization: Bearer KEY); none: open. "
        "Or XLSERVE_API_KEYS (comma-separated), out of the process list.",
        kind="list",
        secret=True,
    ),
    Option(
        "--admin-api-keys",
        "cli",
        "admin_api_keys",
        "Keys for /nodes/* (and every other route); user keys never open /nodes/*. With any key configured, "
        "/nodes/* need one of these. Or XLSERVE_ADMIN_API_KEYS; give api_servers one as --proxy-api-key.",
        kind="list",
        secret=True,
    ),
    Option(
        "--node-api-key",
        "cli",
        "node_api_key",
        "The key the proxy sends its nodes (their --api-keys), on relayed requests and its own probes; "
        "unset: requests carry the client's Authorization header. Or XLSERVE_NODE_API_KEY.",
        secret=True,
    ),
    Option(
        "--public-metrics",
        "cli",
        "public_metrics",
        "Serve GET /metrics without a key.",
        kind="switch",
    ),
    Option(
        "--node-file",
        "cli",
        "node_file",
        "A JSON file of nodes ({url: status}, LMDeploy's proxy_config.json shape), read at start and rewritten "
        "on every add and remove. Default: nodes are kept in memory only.",
    ),
    Option(
        "--health-check-interval",
        "cli",
        "health_check_interval",
        "Seconds between health checks (GET /v1/ready on every node at once, each within 5 s): a failing node "
        "leaves rotation, and comes back when it answers again.",
        type=float,
        default=DEFAULT_HEALTH_CHECK_INTERVAL_S,
    ),
    Option(
        "--request-timeout",
        "cli",
        "request_timeout",
        "Seconds a request may take from arrival to its last byte; past it: 504, or an error event in a "
        "stream. Default: no limit (nodes have their own --request-timeout).",
        type=float,
    ),
    Option(
        "--shutdown-timeout",
        "cli",
        "shutdown_timeout",
        "On SIGTERM/SIGINT, seconds the requests in flight get to finish before the proxy exits.",
        type=float,
        default=30.0,
    ),
    Option("--log-level", "cli", "log_level", "Log level.", default="WARNING", choices=LOG_LEVELS),
    Option(
        "--serving-strategy",
        "cli",
        "serving_strategy",
        "LMDeploy's; only Hybrid nodes (prefill and decode on one server) are served.",
        default="Hybrid",
        choices=("Hybrid",),
    ),
    Option(
        "--disable-cache-status",
        "cli",
        "disable_cache_status",
        "Accepted for LMDeploy compatibility: nodes are written to a file only with --node-file.",
        kind="switch",
    ),
)


@dataclass(frozen=True)
class ProxyLaunch:
    settings: ProxySettings
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "WARNING"
    shutdown_timeout: float = 30.0


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, PROXY_OPTIONS)


def proxy_from_arguments(namespace: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ProxyLaunch:
    values = {option.field: getattr(namespace, option.field) for option in PROXY_OPTIONS}
    read_secrets(values, PROXY_OPTIONS, environ)
    if values["shutdown_timeout"] < 0:
        raise OptionError(f"--shutdown-timeout must be >= 0, got {values['shutdown_timeout']}")
    try:
        settings = ProxySettings(
            routing_strategy=values["routing_strategy"],
            session_key=values["session_key"],
            api_keys=tuple(values["api_keys"] or ()),
            admin_api_keys=tuple(values["admin_api_keys"] or ()),
            node_api_key=values["node_api_key"],
            public_metrics=values["public_metrics"],
            node_file=values["node_file"],
            health_check_interval=values["health_check_interval"],
            request_timeout=values["request_timeout"],
        )
    except ValueError as error:  # the message starts with the field's name: show the flag's
        field, _, why = str(error).partition(" ")
        raise OptionError(f"--{field.replace('_', '-')} {why}") from error
    return ProxyLaunch(settings, values["server_name"], values["server_port"], values["log_level"],
                       values["shutdown_timeout"])
