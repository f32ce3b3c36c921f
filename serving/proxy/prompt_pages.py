"""The pages of a request's prompt, named as the engine's prefix cache names its KV pages.

Cache-aware routing sends a request where requests with the same prompt prefix went before, and what
counts as "the same prefix" is what an engine can reuse: whole pages, each named by a key chained over
the pages before it (`serving.engine.page_hash`, the function the engine names pages with). Token-id
prompts are paged exactly as the engine pages them, at the node's page size.

Text prompts are not tokenized here, on purpose. The proxy holds no tokenizer or chat template (it may
front several models, and each node may override its template with --chat-template), and tokenizing
every prompt a second time, in the one process in front of every server, would make the proxy the
bottleneck. Routing only compares requests with one another, never with a node's actual cache, so the
pages of a canonical text form do as well: the prompt's text (tools, then each message's role and
content, in order) is cut into pages of `CHARS_PER_TOKEN` x the node's page size characters, named with
the same chained key over their code points. Two prompts share a text-page prefix exactly when they
share that many leading characters, and then tokenize alike up to the word where they part, so the
longest shared text prefix picks the node with the longest reusable token prefix.
"""

from __future__ import annotations

import array
import json
from collections.abc import Sequence
from typing import Any

from serving.engine.page_hash import page_keys

CHARS_PER_TOKEN = 4  # English text through a BPE tokenizer: a text page spans about one KV page
MAX_PAGES = 256  # pages named per request: a 4 MiB prompt must not stall the proxy's event loop


# The routes whose body holds a string, strings, token ids or token-id lists, and the field that does
_PROMPT_FIELDS = {"/v1/completions": "prompt", "/v1/embeddings": "input"}


class PromptPages:
    """A prompt as items to cut into pages: its token ids, or the code points of its canonical text."""

    def __init__(self, items: Sequence[int], tokens: bool):
        self.items = items
        self.tokens = tokens
        self._keys: dict[int, list[int]] = {}

    def keys(self, page_size: int) -> list[int]:
        """The names of its full pages for a node whose KV pages hold `page_size` tokens."""
        size = page_size if self.tokens else page_size * CHARS_PER_TOKEN
        if size not in self._keys:
            self._keys[size] = page_keys(self.items[: MAX_PAGES * size], size)
        return self._keys[size]

    @classmethod
    def of(cls, path: str, body: dict[str, Any]) -> PromptPages:
        """The prompt of a request body to `path`; no items when it has none the proxy can read (the
        node, which validates the body, will say what is wrong)."""
        if path in _PROMPT_FIELDS:  # a completion's prompt, an embedding's input: the same shapes
            prompt = body.get(_PROMPT_FIELDS[path])
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch goes to one node: route it by its first prompt
            if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return cls(prompt, tokens=True)
            return cls.text(prompt if isinstance(prompt, str) else "")
        if path == "/v1/chat/interactive":
            prompt = body.get("prompt")
            return cls.text(prompt if isinstance(prompt, str) else _chat_text(None, prompt))
        if path == "/generate":
            ids = body.get("input_ids")
            if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                return cls(ids, tokens=True)
            prompt = body.get("prompt")
            return cls.text(prompt if isinstance(prompt, str) else "")
        if path == "/v1/responses":  # instructions first, as the system message they become
            items = body.get("input")
            items = [{"role": "user", "content": items}] if isinstance(items, str) else items
            system = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
            return cls.text(_chat_text(body.get("tools"), system + (items if isinstance(items, list) else [])))
        if path == "/v1/messages":  # Anthropic's: the system prompt is a field of its own
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            messages = body.get("messages")
            return cls.text(_chat_text(body.get("tools"), system + (messages if isinstance(messages, list) else [])))
        if path == "/v1/chat/completions":
            return cls.text(_chat_text(body.get("tools"), body.get("messages")))
        return cls.text("")  # nothing a cache could reuse (/v1/encode)

    @classmethod
    def text(cls, text: str) -> PromptPages:
        return cls(array.array("I", text.encode("utf-32-le", errors="surrogatepass")), tokens=False)


def _chat_text(tools: Any, messages: Any) -> str:
    """Tools, then each message's role and content: the order a chat template renders them in."""
    parts = [_as_text(tools)] if tools else []
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            parts.append(f"{_as_text(message.get('role'))}\n{_as_text(message.get('content'))}")
    return "\n".join(parts)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
