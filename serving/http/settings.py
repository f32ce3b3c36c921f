"""What the HTTP layer itself is configured with (the engine has its own `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.demo import DEMO_MODEL_NAME
from serving.request import InvalidRequestError
from serving.text.templates import ChatTemplate

# A 128k-token conversation is well under 1 MiB of JSON; far larger bodies are refused with 413
# before they are read into memory or tokenized.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Choices that may wait for an admission slot before new requests get 503.
DEFAULT_MAX_QUEUE_LEN = 1024
# Seconds an engine with requests waiting on it may go without a loop turn before it counts as stuck.
# A step takes milliseconds to a few seconds (a long prompt's prefill on a slow device), so two
# minutes of silence is a hang (a deadlock, a wedged device), not a slow step.
DEFAULT_ENGINE_STALL_TIMEOUT = 120.0
# Seconds a request may wait for its first token (admission queue, engine queue, prefill): past that the
# server is too overloaded or too stuck to serve it, and another replica is the better bet.
DEFAULT_FIRST_TOKEN_TIMEOUT = 300.0


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = DEMO_MODEL_NAME
    model_path: str | None = None  # MODEL as given (a folder or a hub id): /v1/models' root; None: the demo
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no authentication; never logged
    public_metrics: bool = False  # GET /metrics without an API key
    allow_origins: tuple[str, ...] = ()  # empty: no CORS headers (a same-origin client needs none)
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    chat_template: ChatTemplate | None = None  # replaces the tokenizer's own (--chat-template)
    tool_call_parser: str | None = None  # the model's tool call format; None: requests with tools get 400
    reasoning_parser: str | None = None  # splits <think> reasoning into reasoning_content
    # max_tokens past the room the prompt leaves: 400 (OpenAI) rather than run to the session length (LMDeploy)
    strict_context_length: bool = False
    max_log_len: int | None = None  # characters of a prompt written to the INFO log; None: all
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_concurrent_requests: int | None = None  # choices generating at once; None: see state.default_max_running
    max_queue_len: int = DEFAULT_MAX_QUEUE_LEN  # choices waiting for a slot before 503
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    first_token_timeout: float = DEFAULT_FIRST_TOKEN_TIMEOUT  # seconds from arrival to the first token; 0: none
    engine_stall_timeout: float = DEFAULT_ENGINE_STALL_TIMEOUT  # seconds without engine progress; 0: no watch
    profile_dir: str | None = None  # where POST /stop_profile writes traces; None: no profiling routes
    # The CLI runs the engine in a child process (serving.engine.process), so HTTP work never holds
    # the engine's GIL; off: on a thread of the server process, as `create_app` callers do
    engine_process: bool = True
    webui: bool = True  # the chat page at /chat (--no-webui: off)
    chat_at_root: bool = False  # GET / redirects to /chat, and Swagger UI moves to /docs

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                # The value is left out of the message: it may be an API key.
                raise InvalidRequestError(f"{name} {why}", param=name)

        # Browsers refuse `*` with credentials, and quart-cors would fail every request over it.
        check(not ("*" in self.allow_origins and self.allow_credentials), "allow_origins",
              "may not be * when credentials are allowed; list the origins instead")
        check(all(key and key == key.strip() for key in self.api_keys), "api_keys",
              "must be non-empty, without surrounding whitespace")
        check(self.max_request_bytes >= 1, "max_request_bytes", "must be at least 1")
        check(self.max_concurrent_requests is None or self.max_concurrent_requests >= 1, "max_concurrent_requests",
              "must be at least 1")
        check(self.max_queue_len >= 0, "max_queue_len", "must be >= 0")
        check(self.request_timeout is None or self.request_timeout > 0, "request_timeout", "must be positive")
        check(self.first_token_timeout >= 0, "first_token_timeout", "must be >= 0")
        check(self.engine_stall_timeout >= 0, "engine_stall_timeout", "must be >= 0")
