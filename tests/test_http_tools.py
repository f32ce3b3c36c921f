"""Tool calls and reasoning through a live server and the openai SDK.

A random tiny model never writes a tool call by itself, so this one is built to: a 1-layer Llama whose
attention and MLP outputs are zero (`o_proj`, `down_proj` = 0), so each next token depends only on the
current one, and whose LM head maps each token of a fixed chain to the next. Its tokenizer (Qwen's
special tokens, bytes otherwise) makes every piece of the chain one token. After the generation
prompt's last token (`\\n` of `<|im_start|>assistant\\n`) it therefore writes, greedily or sampled
(the next token's logit leads by 80):

    <think>Paris needs a forecast.</think>\\n\\n<tool_call>\\n{"name": "get_weather",
        "arguments": {"city": "Paris"}}\\n</tool_call><|im_end|>

which is what Qwen3 writes for such a request. Everything else is the real server: the Qwen3 template
renders the tools, the engine generates, `<|im_end|>` stops it (a template stop word), the qwen3
reasoning parser and the qwen tool-call parser read the text, and the SDK parses the answer. For a
named or required `tool_choice` the server writes the call's start into the prompt; the model then
continues the chain from there, which is how enforcement looks from the outside.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.http.options import Launch
from serving.http.settings import ServerSettings
from serving.text.templates import builtin_template
from tests.family_tokenizers import qwen_tokenizer
from tests.http_fixtures import (  # noqa: F401 (the `http_server` fixture)
    anthropic_client,
    free_port,
    openai_client,
    shared_http_server,
    wait_ready,
)

MODEL = "tool-caller"
CHAIN = ["\n", "<think>", "Paris needs a forecast.", "</think>", "\n\n", "<tool_call>", '\n{"name": "', "get_weather",
         '", "arguments": ', '{"city": "Paris"}', "}\n", "</tool_call>", "<|im_end|>"]  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def make_tool_caller(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    qwen_tokenizer(directory, builtin_template("qwen3").source, extra_words=tuple(w for w in CHAIN[2:-1]
                                                                                    if not w.startswith("<")))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = [tokenizer.convert_tokens_to_ids(w) if w.startswith("<") else tokenizer.encode(w) for w in CHAIN]
    ids = [i[0] if isinstance(i, list) and len(i) == 1 else i for i in ids]
    assert all(isinstance(i, int) for i in ids), f"every chain piece must be one token: {ids}"
    hidden = 64
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=ids[-1], bos_token_id=None, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
        for slot, (token, successor) in enumerate(zip(ids, ids[1:], strict=False)):
            model.model.embed_tokens.weight[token, slot] = 1.0  # one-hot: a direction per chain token
            model.lm_head.weight[successor, slot] = 10.0  # after RMSNorm the slot reads 8: logit 80
    model.save_pretrained(directory)
    GenerationConfig(eos_token_id=ids[-1]).save_pretrained(directory)
    return directory


class ToolServer:
    def __init__(self, checkpoint: Path, **settings: object):
        from serving.cli import serve
        from serving.http.factory import create_app

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = EngineConfig.from_options(page_size=16, num_pages=66, session_len=1024, decode_batch_buckets=(1, 2),
                                           prefill_row_buckets=(1,), prefill_token_buckets=(256,))  # fmt: skip
        self.engine = Engine.from_pretrained(str(checkpoint), config)
        app = create_app(self.engine, ServerSettings(model_name=MODEL, model_path=str(checkpoint), **settings))
        launch = Launch(str(checkpoint), config, app.extensions["xlserve"].settings, host="127.0.0.1", port=self.port)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(serve(app, launch, shutdown_trigger=self._stop.wait),), daemon=True)
        self._thread.start()
        wait_ready(self.base_url, alive=self._thread.is_alive)

    def client(self) -> openai.OpenAI:
        return openai_client(f"{self.base_url}/v1", "unused", max_retries=0)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_tool_caller(tmp_path_factory.mktemp("tool-caller"))
    running = ToolServer(checkpoint, tool_call_parser="qwen", reasoning_parser="qwen3")
    yield running
    running.stop()


def test_auto_tool_call_with_reasoning(server):
    reply = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0.7)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == "Paris needs a forecast."
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})  # fmt: skip
    assert call.id.startswith("call_")


def test_streamed_tool_call_name_first_then_arguments(server):
    stream = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True)
    reasoning, calls, finish = "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            calls.append(call)
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "Paris needs a forecast." and finish == "tool_calls"
    first, *rest = calls
    assert first.id.startswith("call_") and first.function.name == "get_weather" and first.index == 0
    assert rest and all(c.function.name is None and c.id is None for c in rest)
    assert json.loads("".join(c.function.arguments or "" for c in calls)) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_choices_are_written_into_the_prompt(server, stream):
    client = server.client()
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                               stream=stream)  # fmt: skip
        if stream:
            chunks = list(reply)
            names = [c.function.name for ch in chunks for c in ch.choices[0].delta.tool_calls or [] if c.function.name]
            arguments = "".join(c.function.arguments or "" for ch in chunks
                                for c in ch.choices[0].delta.tool_calls or [])  # fmt: skip
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            calls = reply.choices[0].message.tool_calls
            names, arguments = [c.function.name for c in calls], calls[0].function.arguments
            assert reply.choices[0].message.model_extra.get("reasoning_content") is None  # the call starts at once
        assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"}


def test_required_choice_is_constrained_even_against_the_model(server):
    """The model only ever calls get_weather; constrained to get_time (which takes no arguments), it calls that."""
    only_time = [TOOLS[1]]
    reply = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=only_time,
                                                    tool_choice="required")  # fmt: skip
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert reply.choices[0].finish_reason == "tool_calls"
    stream = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=only_time,
                                                     tool_choice="required", stream=True)  # fmt: skip
    names = [c.function.name for ch in stream for c in ch.choices[0].delta.tool_calls or [] if c.function.name]
    assert names == ["get_time"]


def test_tool_results_and_tool_choice_none(server):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]  # fmt: skip
    reply = server.client().chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"  # (the model ignores history)
    # none: tools are rendered but no call is read; the text comes back as it is
    reply = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    message = reply.choices[0].message
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert message.content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_requests_that_cannot_be_served_are_400(server):
    with httpx.Client(base_url=server.base_url) as http:
        named = {"type": "function", "function": {"name": "book_flight"}}
        answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS,
                                                         "tool_choice": named})  # fmt: skip
        assert answer.status_code == 400 and "not among `tools`" in answer.json()["error"]["message"]
        answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tool_choice": "required"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "tool_choice"


def test_tools_need_a_tool_call_parser(http_server):  # the shared server has no parser
    with httpx.Client(base_url=http_server.base_url) as http:
        body = {"model": http_server.model_name, "messages": ASK, "tools": TOOLS, "max_tokens": 2}
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 400 and "--tool-call-parser" in answer.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).status_code == 200


# ---- the same model through OpenAI's Responses API and Anthropic's Messages API ------------------

RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"].get("description"),
                    "parameters": t["function"]["parameters"]} for t in TOOLS]  # fmt: skip


def test_responses_api_tool_call_with_reasoning(server):
    client = server.client()
    response = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=RESPONSES_TOOLS)
    reasoning, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Paris needs a forecast."
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Paris"})
    assert call.call_id.startswith("call_") and response.status == "completed"
    # The call and its result sent back as input items: the conversation goes on (the model ignores it).
    followup = client.responses.create(model=MODEL, tools=RESPONSES_TOOLS, tool_choice="auto", input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
    ])  # fmt: skip
    assert followup.output[-1].name == "get_weather"
    assert followup.usage.input_tokens > response.usage.input_tokens


def test_responses_api_streams_the_call_as_argument_deltas(server):
    events = list(server.client().responses.create(model=MODEL, input="Weather in Paris?", tools=RESPONSES_TOOLS,
                                                   tool_choice={"type": "function", "name": "get_weather"},
                                                   stream=True))  # fmt: skip
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(item.type, item.name) for item in added] == [("function_call", "get_weather")]  # named: no reasoning
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(arguments) == json.loads(done.arguments) == {"city": "Paris"}
    final = events[-1]
    assert final.type == "response.completed" and final.response.output[0].call_id == added[0].call_id


ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"].get("description"),
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]  # fmt: skip


def claude_client(server):
    return anthropic_client(server.base_url, "unused", max_retries=0)


def test_messages_api_tool_use_with_thinking(server):
    message = claude_client(server).messages.create(model=MODEL, max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS)
    thinking, tool_use = message.content
    assert thinking.type == "thinking" and thinking.thinking == "Paris needs a forecast."
    assert (tool_use.type, tool_use.name, tool_use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert tool_use.id.startswith("toolu_") and message.stop_reason == "tool_use"
    # The tool's result sent back: a tool_use block, then a tool_result block (the model ignores it).
    followup = claude_client(server).messages.create(model=MODEL, max_tokens=64, tools=ANTHROPIC_TOOLS, messages=[
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_use.id, "name": tool_use.name,
                                           "input": tool_use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "21 C"}]},
    ])  # fmt: skip
    assert followup.content[-1].name == "get_weather"
    assert followup.usage.input_tokens + followup.usage.cache_read_input_tokens > message.usage.input_tokens
    counted = claude_client(server).messages.count_tokens(model=MODEL, messages=ASK, tools=ANTHROPIC_TOOLS)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_messages_api_streams_tool_use_as_input_json_deltas(server):
    client = claude_client(server)
    options = dict(model=MODEL, max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS)
    events = list(client.messages.create(**options, stream=True))
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [block.type for block in starts] == ["thinking", "tool_use"] and starts[1].name == "get_weather"
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.delta.type == "input_json_delta")  # fmt: skip
    assert json.loads(partial) == {"city": "Paris"}
    assert events[-2].delta.stop_reason == "tool_use" and events[-1].type == "message_stop"
    # The SDK's helper assembles the blocks; a named tool_choice writes the call's start into the prompt.
    with client.messages.stream(**options, tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    [tool_use] = final.content
    assert (tool_use.name, tool_use.input, final.stop_reason) == ("get_weather", {"city": "Paris"}, "tool_use")
