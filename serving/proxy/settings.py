"""What the proxy is configured with (`xlserve serve proxy` flags, see `serving.proxy.options`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.http.settings import DEFAULT_MAX_REQUEST_BYTES

STRATEGIES = ("random", "min_expected_latency", "min_observed_latency", "cache_aware", "session")
DEFAULT_SESSION_KEY = "X-Session-ID"
DEFAULT_HEALTH_CHECK_INTERVAL_S = 5.0


@dataclass(frozen=True)
class ProxySettings:
    # None: cache_aware when every candidate node reports prefix caching, else min_expected_latency
    routing_strategy: str | None = None
    session_key: str = DEFAULT_SESSION_KEY  # the header `session` routing hashes (then the `user` field)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # user routes; empty: open
    admin_api_keys: tuple[str, ...] = field(default=(), repr=False)  # /nodes/*; never the user keys
    node_api_key: str | None = field(default=None, repr=False)  # what the proxy sends to its nodes
    public_metrics: bool = False
    node_file: str | None = None  # nodes read at start and rewritten on every change; None: kept in memory
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL_S
    request_timeout: float | None = None  # seconds from arrival to the last byte relayed; None: no limit
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        # Each message starts with the field's name, which the CLI turns into its flag.
        if self.routing_strategy is not None and self.routing_strategy not in STRATEGIES:
            raise ValueError(f"routing_strategy must be one of {', '.join(STRATEGIES)}")
        if not self.session_key.strip():
            raise ValueError("session_key must be a header name")
        if self.health_check_interval <= 0:
            raise ValueError("health_check_interval must be positive")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        for name in ("api_keys", "admin_api_keys"):
            if any(not key or key != key.strip() for key in getattr(self, name)):
                raise ValueError(f"{name} must be non-empty, without surrounding whitespace")
        if set(self.api_keys) & set(self.admin_api_keys):
            raise ValueError("admin_api_keys may not repeat a user key: user keys must never open /nodes/*")
