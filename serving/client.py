"""A Python client of the server, with LMDeploy's `APIClient` methods and signatures, and the console chat
behind `xlserve serve api_client URL`.

Code written for LMDeploy's client runs with only its import changed:

    from serving.client import APIClient
    api_client = APIClient("http://localhost:23333")
    for item in api_client.chat_interactive_v1(prompt="hi", session_id=1, interactive_mode=True):
        print(item)

Every generating call is a generator of dicts: the whole answer once, or with `stream=True` one dict per
chunk (an OpenAI stream's `data:` events, or `/v1/chat/interactive`'s NDJSON lines). As with LMDeploy's
client, an error answer is yielded too, as the dict the server sent (`{"error": {message, type, param,
code}}`, OpenAI's envelope); `APIClient(..., raise_errors=True)` raises it as `APIClientError` instead,
so that a failed call cannot pass for an answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

# Generation can take minutes; only connecting is bounded.
TIMEOUT = httpx.Timeout(None, connect=30.0)
COMPLETION_TOKENS_DEFAULT = 16  # completions_v1's, as LMDeploy's


class APIClientError(Exception):
    """The server answered with an error (`status`, and OpenAI's `message`, `type`, `param`, `code`)."""

    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(f"{status}: {error.get('message', error)}")
        self.status = status
        self.message: str = error.get("message", "")
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: str | None = error.get("code")


def _body(arguments: dict[str, Any]) -> dict[str, Any]:
    """A method's arguments as a request body: `**kwargs` merged in, unset (None) fields left out."""
    fields = {name: value for name, value in arguments.items() if name not in ("self", "kwargs")}
    fields.update(arguments.get("kwargs", {}))
    return {name: value for name, value in fields.items() if value is not None}


class APIClient:
    """A client of one server (`api_server_url` such as `http://localhost:23333`), with an optional API key;
    `raise_errors` raises error answers as `APIClientError` rather than yielding them (LMDeploy's way)."""

    def __init__(self, api_server_url: str, api_key: str | None = None, raise_errors: bool = False):
        self.api_server_url = api_server_url.rstrip("/")
        self.raise_errors = raise_errors
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.api_server_url, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> APIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def available_models(self) -> list[str] | None:
        """The ids of the served models (GET /v1/models); None after an error answer (as LMDeploy's), unless
        `raise_errors`."""
        response = self._http.get("/v1/models")
        if self._error(response) is not None:
            return None
        return [card["id"] for card in response.json()["data"]]

    def encode(
        self, input: str | list[str], do_preprocess: bool = False, add_bos: bool = True
    ) -> tuple[list[int] | list[list[int]] | None, int | list[int] | None]:
        """POST /v1/encode: `(input_ids, length)` of a text, or lists of both for a list of texts; `do_preprocess`
        renders each text as a user message through the chat template first. `(None, None)` after an
        error answer unless `raise_errors`."""
        response = self._http.post("/v1/encode", json={"input": input, "do_preprocess": do_preprocess,
                                                       "add_bos": add_bos})  # fmt: skip
        if self._error(response) is not None:
            return None, None
        answer = response.json()
        return answer["input_ids"], answer["length"]

    def chat_completions_v1(
        self,
        model: str,
        messages: str | list[dict[str, Any]],
        temperature: float = 0.7,
        top_p: float = 1.0,
        logprobs: bool = False,
        top_logprobs: int = 0,
        n: int = 1,
        max_completion_tokens: int | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        user: str | None = None,
        repetition_penalty: float = 1.0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        top_k: int = 40,
        min_new_tokens: int | None = None,
        min_p: float = 0.0,
        logit_bias: dict[str, float] | None = None,
        stream_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """POST /v1/chat/completions (a string `messages` is one user message). Everything is sent as given:
        the server applies `repetition_penalty`, `top_k`, `min_p`, `min_new_tokens`, `presence_penalty`,
        `frequency_penalty`, `logit_bias` and `logprobs`/`top_logprobs` (as in the README's field list)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        yield from self._post("/v1/chat/completions", _body(locals()), stream, sse=True)

    def completions_v1(
        self,
        model: str,
        prompt: str | list[Any],
        suffix: str | None = None,
        temperature: float = 0.7,
        n: int = 1,
        max_completion_tokens: int | None = COMPLETION_TOKENS_DEFAULT,
        max_tokens: int | None = COMPLETION_TOKENS_DEFAULT,
        stream: bool = False,
        stop: str | list[str] | None = None,
        top_p: float = 1.0,
        top_k: int = 40,
        user: str | None = None,
        repetition_penalty: float = 1.0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stream_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """POST /v1/completions. Both token limits default to 16: the one given otherwise wins."""
        if max_completion_tokens == COMPLETION_TOKENS_DEFAULT:
            max_completion_tokens = max_tokens  # the server would read max_completion_tokens first
        yield from self._post("/v1/completions", _body(locals()), stream, sse=True)

    def chat_interactive_v1(
        self,
        prompt: str | list[dict[str, Any]],
        image_url: str | list[str] | None = None,
        session_id: int = -1,
        interactive_mode: bool = False,
        stream: bool = False,
        stop: str | list[str] | None = None,
        request_output_len: int | None = None,
        top_p: float = 0.8,
        top_k: int = 40,
        temperature: float = 0.8,
        repetition_penalty: float = 1.0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> Iterator[dict[str, Any]]:
        """POST /v1/chat/interactive: `{text, tokens, input_tokens, history_tokens, finish_reason}`
        (per NDJSON line when streaming). `cancel=True` goes in `kwargs`, as with LMDeploy."""
        yield from self._post("/v1/chat/interactive", _body(locals()), stream, sse=False)

    def chat(
        self,
        prompt: str | list[dict[str, Any]],
        session_id: int,
        image_url: str | list[str] | None = None,
        request_output_len: int = 512,
        stream: bool = False,
        top_p: float = 0.8,
        top_k: int = 40,
        temperature: float = 0.8,
        repetition_penalty: float = 1.0,
        ignore_eos: bool = False,
    ) -> Iterator[tuple[str, int, str | None]]:
        """A turn of an interactive session, as `(text, tokens, finish_reason)` tuples; an error answer (unless
        `raise_errors`) as `(its message, 0, "error")`."""
        for item in self.chat_interactive_v1(
            prompt, image_url=image_url, session_id=session_id, interactive_mode=True, stream=stream,
            request_output_len=request_output_len, top_p=top_p, top_k=top_k, temperature=temperature,
            repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
        ):  # fmt: skip
            if "error" in item:
                yield item["error"].get("message", ""), 0, "error"
            else:
                yield item["text"], item["tokens"], item["finish_reason"]

    def end_session(self, session_id: int) -> dict[str, Any]:
        """End an interactive session: the server forgets its history and frees its KV cache."""
        [answer] = self.chat_interactive_v1(prompt="", session_id=session_id, request_output_len=0)
        return answer

    def cancel(self, session_id: int) -> dict[str, Any]:
        """Abort the session's running turn; answers once that turn has ended."""
        [answer] = self.chat_interactive_v1(prompt="", session_id=session_id, cancel=True)
        return answer

    def _post(self, path: str, body: dict[str, Any], stream: bool, sse: bool) -> Iterator[dict[str, Any]]:
        with self._http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                yield self._error(response)
                return
            if not stream:
                response.read()
                yield response.json()
                return
            for line in body_lines(response):
                payload = _sse_data(line) if sse else line
                if not payload:
                    continue
                item = json.loads(payload)
                if "error" in item and self.raise_errors:  # a failure after the stream began
                    raise APIClientError(response.status_code, item["error"])
                yield item

    def _error(self, response: httpx.Response) -> dict[str, Any] | None:
        """An error answer's body (raised with `raise_errors`); None for a success."""
        if response.status_code < 400:
            return None
        try:
            body = response.json()
            error = body["error"]
        except (ValueError, KeyError, TypeError):
            body = {"error": {"message": response.text, "type": None, "param": None, "code": None}}
            error = body["error"]
        if self.raise_errors:
            raise APIClientError(response.status_code, error)
        return body


def get_model_list(api_url: str, headers: dict[str, str] | None = None) -> list[str] | None:
    """The model ids a `GET /v1/models` URL lists, or None if it answers an error (LMDeploy's helper)."""
    response = httpx.get(api_url, headers=headers, timeout=TIMEOUT)
    if response.status_code >= 400:
        return None
    return [card["id"] for card in response.json()["data"]]


class LineSplitter:
    """Body bytes in, lines out, split at "\n" only (a "\r" before it dropped), as SSE and NDJSON define
    them. Not httpx's `iter_lines`: it splits like `str.splitlines`, also at U+2028, U+0085 and the like,
    which a model's text can hold and JSON written with `ensure_ascii=False` carries unescaped."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        return [line.removesuffix(b"\r").decode() for line in lines]

    def end(self) -> list[str]:
        """The last line, if the body did not end with a newline."""
        last, self._pending = self._pending, b""
        return [last.removesuffix(b"\r").decode()] if last else []


def body_lines(response: httpx.Response) -> Iterator[str]:
    """The lines of a streamed body (see `LineSplitter`)."""
    splitter = LineSplitter()
    for data in response.iter_bytes():
        yield from splitter.feed(data)
    yield from splitter.end()


def _sse_data(line: str) -> str | None:
    """The JSON of a `data:` event; None for blank lines, comments and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line.removeprefix("data:").strip()
    return None if data == "[DONE]" else data


# ---- the console: `xlserve serve api_client URL` ----------------------------------------------------


def console(api_server_url: str, api_key: str | None = None, session_id: int = 1, out: TextIO = sys.stdout) -> int:
    """Chat in the terminal on one interactive session: `end` starts the conversation over, `exit` (or
    end of input) ends it and quits, Ctrl-C stops the answer being written."""
    with APIClient(api_server_url, api_key, raise_errors=True) as client:
        try:
            models = client.available_models
        except (httpx.HTTPError, APIClientError) as error:
            print(f"cannot reach the server at {api_server_url}: {error}", file=sys.stderr)
            return 1
        print(f"chatting with {models[0]} at {api_server_url} (session {session_id}); "
              "`end` starts over, `exit` quits, Ctrl-C stops an answer", file=out, flush=True)  # fmt: skip
        while True:
            prompt = _read_prompt()
            if prompt in ("exit", "end"):
                client.end_session(session_id)
                if prompt == "exit":
                    return 0
                print("(a new conversation)", file=out, flush=True)
            elif prompt:
                _turn(client, session_id, prompt, out)


def _read_prompt() -> str:
    try:
        return input(">>> ").strip()
    except (EOFError, KeyboardInterrupt):
        return "exit"


def _turn(client: APIClient, session_id: int, prompt: str, out: TextIO) -> None:
    """Stream one answer; Ctrl-C cancels it on the server (the history stays as before the turn)."""
    try:
        for item in client.chat_interactive_v1(prompt, session_id=session_id, interactive_mode=True, stream=True):
            print(item["text"], end="", file=out, flush=True)
            if item.get("message"):
                print(f"[{item['message']}]", end="", file=out)
        print(file=out, flush=True)
    except KeyboardInterrupt:
        client.cancel(session_id)
        print("\n[cancelled]", file=out, flush=True)
    except APIClientError as error:
        print(f"\n[error: {error.message}]", file=out, flush=True)
