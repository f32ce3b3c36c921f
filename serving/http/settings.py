"""What the HTTP layer itself is configured with (the engine has its own `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from configs.demo import DEMO_MODEL_NAME
from serving.text.templates import ChatTemplate

# A 128k-token conversation is well under 1 MiB of JSON; far larger bodies are refused with 413
# before they are read into memory or tokenized.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = DEMO_MODEL_NAME
    model_path: str | None = None  # None: the built-in demo model
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allow_origins: tuple[str, ...] = ()  # empty: no CORS headers (a same-origin client needs none)
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    chat_template: ChatTemplate | None = None  # replaces the tokenizer's own (--chat-template)
    tool_call_parser: str | None = None  # the model's tool call format; None: requests with tools get 400
    reasoning_parser: str | None = None  # splits <think> reasoning into reasoning_content
    max_log_len: int | None = None  # characters of a prompt written to the INFO log; None: all
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
