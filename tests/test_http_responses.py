"""OpenAI's Responses API (`POST /v1/responses`) against the shared live server, through the real openai
SDK's `client.responses.create`, streamed and not; tool calls are tested on the tool-calling model in
test_http_tools.py."""

from __future__ import annotations

import openai
import pytest

from tests.http_fixtures import LiveServer, http, shared_http_server  # noqa: F401 (`http_server`)

STORY = "Tell me a story"


def test_a_response_says_what_chat_completions_says(http_server: LiveServer) -> None:
    client = http_server.client()
    response = client.responses.create(model=http_server.model_name, input=STORY, instructions="Be brief.",
                                       max_output_tokens=6, temperature=0)  # fmt: skip
    chat = client.chat.completions.create(
        model=http_server.model_name, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": STORY}],
    )  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == http_server.model_name
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None


def test_input_items_are_the_conversation(http_server: LiveServer) -> None:
    client = http_server.client()
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": STORY}]},
    ]
    by_items = client.responses.create(model=http_server.model_name, input=items, max_output_tokens=4, temperature=0)
    by_text = client.responses.create(model=http_server.model_name, input=STORY, instructions="Be brief.",
                                      max_output_tokens=4, temperature=0)  # fmt: skip
    assert by_items.output_text == by_text.output_text
    assert by_items.usage.input_tokens == by_text.usage.input_tokens


def test_a_streamed_response_has_the_responses_event_sequence(http_server: LiveServer) -> None:
    client = http_server.client()
    options = dict(model=http_server.model_name, input=STORY, max_output_tokens=5, temperature=0)
    whole = client.responses.create(**options)
    events = list(client.responses.create(**options, stream=True))
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]  # fmt: skip
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == whole.output_text == final.output_text == events[-4].text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == whole.status
    item_ids = {event.item_id for event in events if hasattr(event, "item_id")}
    assert item_ids == {final.output[0].id}


def test_the_sdk_stream_helper_reads_it(http_server: LiveServer) -> None:
    # ignore_eos: cut by max_output_tokens, so the last event is `response.incomplete` (the helper's
    # get_final_response wants `response.completed`, as with OpenAI's own server)
    with http_server.client().responses.stream(model=http_server.model_name, input=STORY, max_output_tokens=3,
                                               extra_body={"ignore_eos": True}) as stream:  # fmt: skip
        events = list(stream)
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": []}, "input"),
    ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
])  # fmt: skip
def test_what_cannot_be_served_is_a_400(http_server: LiveServer, fields: dict, param: str) -> None:
    body = {"model": http_server.model_name, "input": STORY, **fields}
    answer = http.post(f"{http_server.base_url}/v1/responses", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    with pytest.raises(openai.NotFoundError):
        http_server.client().responses.create(model="no-such-model", input=STORY)
