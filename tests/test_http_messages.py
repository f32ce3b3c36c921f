"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) against the shared live
server, through the real anthropic SDK's `client.messages.create`, streamed and not; tool use is tested on
the tool-calling model in test_http_tools.py."""

from __future__ import annotations

import anthropic
import pytest

from tests.http_fixtures import LiveServer, anthropic_client, http, shared_http_server  # noqa: F401 (`http_server`)

STORY = "Tell me a story"
ASK = [{"role": "user", "content": STORY}]
GREEDY = {"temperature": 0}  # this SDK version has no `temperature` argument; the API still takes it


def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic_client(server.base_url, "unused", max_retries=0)


def test_a_message_says_what_chat_completions_says(http_server: LiveServer) -> None:
    message = client(http_server).messages.create(model=http_server.model_name, max_tokens=6, messages=ASK,
                                                  system="Be brief.", extra_body=GREEDY)  # fmt: skip
    chat = http_server.client().chat.completions.create(
        model=http_server.model_name, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, *ASK],
    )  # fmt: skip
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    [block] = message.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    counted = client(http_server).messages.count_tokens(model=http_server.model_name, messages=ASK, system="Be brief.")
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_a_streamed_message_has_anthropics_event_sequence(http_server: LiveServer) -> None:
    options = dict(model=http_server.model_name, max_tokens=5, messages=ASK, extra_body=GREEDY)
    whole = client(http_server).messages.create(**options)
    events = list(client(http_server).messages.create(**options, stream=True))
    types = [event.type for event in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    text = "".join(event.delta.text for event in events if event.type == "content_block_delta")
    assert text == whole.content[0].text
    assert events[-2].delta.stop_reason == whole.stop_reason
    assert events[-2].usage.output_tokens == whole.usage.output_tokens
    # The SDK's stream helper assembles the same message.
    with client(http_server).messages.stream(**options) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason


@pytest.mark.parametrize("fields, words", [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"temperature": "hot"}, "temperature"),
])  # fmt: skip
def test_errors_come_in_anthropics_envelope(http_server: LiveServer, fields: dict, words: str) -> None:
    body = {"model": http_server.model_name, "max_tokens": 4, "messages": ASK, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    if "tool_choice" in fields:
        body["tools"] = [{"name": "f", "input_schema": {"type": "object"}}]
    answer = http.post(f"{http_server.base_url}/v1/messages", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]


def test_the_sdk_raises_anthropics_errors(http_server: LiveServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client(http_server).messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client(http_server).messages.count_tokens(model=http_server.model_name, messages=[])
