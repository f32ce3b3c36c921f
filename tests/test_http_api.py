"""The OpenAI-compatible routes, live: Hypercorn on 127.0.0.1, the openai SDK (sync and async), the tiny
Llama checkpoint with the Llama 2 tokenizer. Sampled requests carry a seed, so every comparison
(streamed vs not, concurrent vs alone, HTTP vs pipeline) is exact."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from serving.client import body_lines
from serving.http.params import generation_config
from serving.http.protocol import ChatCompletionRequest
from serving.request import GenerationConfig
from tests.http_fixtures import LiveServer, http, shared_http_server  # noqa: F401 (the `http_server` fixture)
from tools.bench_serving import sse_lines

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat_prompt_tokens(server: LiveServer, messages: list[dict]) -> int:
    tokenizer = server.engine.tokenizer
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False))


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final `[DONE]`."""
    events: list[dict | str] = []
    for line in body_lines(response):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


# ---- discovery and probes --------------------------------------------------------------------


def test_models_lists_the_served_model(http_server: LiveServer) -> None:
    models = http_server.client().models.list()
    assert [m.id for m in models.data] == [http_server.model_name]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "xlserve" and isinstance(card.created, int)
    assert card.model_extra["max_model_len"] == http_server.engine.max_session_len


def test_health_and_ready(http_server: LiveServer) -> None:
    assert http.get(f"{http_server.base_url}/health").json() == {"status": "ok"}
    ready = http.get(f"{http_server.base_url}/v1/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "model": http_server.model_name}


# ---- chat ------------------------------------------------------------------------------------


def test_chat_completion_shape_and_exact_usage(http_server: LiveServer) -> None:
    response = http_server.client().chat.completions.create(
        model=http_server.model_name,
        messages=MESSAGES,
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
        user="u1",
    )
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == http_server.model_name and isinstance(response.created, int)
    [choice] = response.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert isinstance(choice.message.content, str)
    prompt_tokens = chat_prompt_tokens(http_server, MESSAGES)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 7)
    assert response.usage.total_tokens == prompt_tokens + 7
    # Prompt tokens taken from the prefix cache: at least the last prompt token is always computed.
    assert 0 <= response.usage.prompt_tokens_details.cached_tokens < prompt_tokens


def test_chat_stream_equals_non_stream_for_the_same_seed(http_server: LiveServer) -> None:
    client = http_server.client()
    options = dict(model=http_server.model_name, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=1234)
    whole = client.chat.completions.create(**options)
    chunks = list(client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_stream_wire_format(http_server: LiveServer) -> None:
    """Byte-level shape: the role in every delta (LMDeploy's clients read it on each), content in each but
    the choice's last, which has empty content and the finish_reason; usage null until the usage chunk, [DONE]."""
    body = dict(model=http_server.model_name, messages=MESSAGES, max_tokens=5, temperature=0, ignore_eos=True)
    url = f"{http_server.base_url}/v1/chat/completions"
    with http.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"role", "content"} for c in chunks[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": "length"}  # fmt: skip
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert list(chunks[-1]["usage"]["prompt_tokens_details"]) == ["cached_tokens"]
    with http.stream("POST", url, json={**body, "stream": True}) as r:
        assert all("usage" not in c for c in sse_events(r)[:-1])


def test_n_gives_indexed_choices_and_seed_plus_i(http_server: LiveServer) -> None:
    client = http_server.client()
    options = dict(model=http_server.model_name, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=99)
    response = client.chat.completions.create(**options, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.prompt_tokens == chat_prompt_tokens(http_server, MESSAGES)  # counted once
    # Choice i samples with seed + i, so each choice is reproducible on its own.
    for i, choice in enumerate(response.choices):
        alone = client.chat.completions.create(**{**options, "seed": 99 + i})
        assert alone.choices[0].message.content == choice.message.content
    streamed = {i: "" for i in range(3)}
    for chunk in client.chat.completions.create(**options, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[i] for i in range(3)] == [c.message.content for c in response.choices]


def test_stop_strings_cut_the_text(http_server: LiveServer) -> None:
    client = http_server.client()
    options = dict(
        model=http_server.model_name,
        prompt="The capital of France",
        max_tokens=30,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**options).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    expected = full[: full.index(stop)]
    for value in (stop, [stop, "never-appears"]):
        cut = client.completions.create(**options, stop=value).choices[0]
        assert (cut.text, cut.finish_reason) == (expected, "stop")
        streamed = "".join(c.choices[0].text for c in client.completions.create(**options, stop=value, stream=True))
        assert streamed == expected


def test_chat_template_refusal_is_a_400(http_server: LiveServer) -> None:
    # The Llama 2 template raises unless user and assistant turns alternate.
    with pytest.raises(openai.BadRequestError) as raised:
        http_server.client().chat.completions.create(
            model=http_server.model_name,
            messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        )
    assert raised.value.param == "messages"


# ---- completions -----------------------------------------------------------------------------


def test_completion_prompt_forms(http_server: LiveServer) -> None:
    client = http_server.client()
    tokenizer = http_server.engine.tokenizer
    options = dict(model=http_server.model_name, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    single = client.completions.create(prompt="Hello there", **options)
    assert single.id.startswith("cmpl-") and single.object == "text_completion"
    ids = tokenizer.encode("Hello there")
    assert single.usage.prompt_tokens == len(ids) and single.usage.completion_tokens == 4
    # The same prompt as token ids gives the same greedy text.
    assert client.completions.create(prompt=ids, **options).choices[0].text == single.choices[0].text
    # Several prompts: one choice each, times n, indexed prompt * n + i.
    many = client.completions.create(prompt=["Hello there", "Once upon"], n=2, **options)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == single.choices[0].text  # greedy: n copies
    assert many.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Once upon"))
    assert many.usage.completion_tokens == 16
    assert 0 <= many.usage.prompt_tokens_details.cached_tokens < many.usage.prompt_tokens
    lists = client.completions.create(prompt=[ids, tokenizer.encode("Once upon")], **options)
    assert [c.text for c in lists.choices] == [many.choices[0].text, many.choices[2].text]


def test_completion_matches_pipeline_greedy_tokens(http_server: LiveServer, tiny_pipe) -> None:
    prompt = "In the beginning"
    ours = http_server.client().completions.create(
        model=http_server.model_name, prompt=prompt, max_tokens=16, temperature=0
    )
    reference = tiny_pipe(prompt, gen_config=GenerationConfig(max_new_tokens=16))
    assert ours.choices[0].text == reference.text
    assert ours.usage.completion_tokens == reference.generate_token_len
    assert ours.usage.prompt_tokens == reference.input_token_len


def test_max_tokens_aliases_and_null(http_server: LiveServer) -> None:
    client = http_server.client()

    def complete(**fields: object) -> openai.types.Completion:
        return client.completions.create(
            model=http_server.model_name,
            prompt="Count:",
            temperature=0,
            extra_body={"ignore_eos": True, **fields},
        )

    assert complete(max_completion_tokens=3).usage.completion_tokens == 3
    assert complete(max_tokens=9, max_completion_tokens=2).usage.completion_tokens == 2  # the newer name wins
    unbounded = complete(max_tokens=None)  # null: up to the session length
    assert unbounded.choices[0].finish_reason == "length"
    assert unbounded.usage.total_tokens == http_server.engine.max_session_len


def test_sampling_filters_reach_the_engine(http_server: LiveServer) -> None:
    """top_k=1, top_p→0 and min_p=1 each leave only the argmax: sampled text must equal greedy text."""
    client = http_server.client()

    def complete(temperature: float, **fields: object) -> openai.types.Completion:
        return client.completions.create(
            model=http_server.model_name,
            prompt="Once upon a time",
            max_tokens=12,
            temperature=temperature,
            seed=3,
            extra_body={"ignore_eos": True, **fields},
        )

    greedy = complete(0).choices[0].text
    for only_the_argmax in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}):
        assert complete(1.5, **only_the_argmax).choices[0].text == greedy, only_the_argmax
    # The penalty's effect depends on the weights; here it must at least be accepted and run.
    assert complete(0, repetition_penalty=1.3).usage.completion_tokens == 12


def test_seeds_reproduce_and_differ(http_server: LiveServer) -> None:
    client = http_server.client()
    options = dict(
        model=http_server.model_name,
        prompt="Once upon a time",
        max_tokens=16,
        temperature=1.5,
        extra_body={"ignore_eos": True},
    )
    texts = [client.completions.create(**options, seed=s).choices[0].text for s in (5, 5, 6, 7)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1


def test_special_token_options_are_accepted(http_server: LiveServer) -> None:
    eos = sorted(http_server.engine.eos_token_ids)[0]
    response = http_server.client().completions.create(
        model=http_server.model_name,
        prompt="Hi",
        max_tokens=6,
        temperature=0,
        extra_body={
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "stop_token_ids": [eos],
            "include_stop_str_in_output": True,
        },
    )
    assert response.choices[0].finish_reason in ("stop", "length")


def test_generation_defaults_come_from_the_checkpoint(http_server: LiveServer) -> None:
    defaults = http_server.engine.model_config.generation_defaults
    assert dict(defaults)["temperature"] == 0.6  # tests/checkpoints.py writes this generation_config
    body = ChatCompletionRequest.model_validate_json('{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    config = generation_config(body, dict(defaults), http_server.engine.tokenizer)
    assert (config.temperature, config.top_p, config.do_sample) == (0.6, 0.9, True)
    explicit = ChatCompletionRequest.model_validate_json(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "top_k": -1}'
    )
    assert generation_config(explicit, dict(defaults), http_server.engine.tokenizer).greedy
    assert generation_config(explicit, {}, http_server.engine.tokenizer).top_k == 0


def test_unknown_model_is_404(http_server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        http_server.client().completions.create(model="gpt-4", prompt="x")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


# ---- async client and concurrency ------------------------------------------------------------


async def test_async_client_streams_and_batches_exactly(http_server: LiveServer) -> None:
    client = http_server.async_client()
    prompts = ["One", "Two two", "Three three three", "Four", "Five five", "Six"]

    async def complete(i: int, prompt: str, stream: bool) -> str:
        options = dict(model=http_server.model_name, prompt=prompt, max_tokens=20, temperature=1.0, seed=i)
        if not stream:
            return (await client.completions.create(**options)).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(**options, stream=True)])

    alone = [await complete(i, p, stream=False) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(complete(i, p, stream=i % 2 == 0) for i, p in enumerate(prompts)))
    assert list(together) == alone

    chat = await client.chat.completions.create(
        model=http_server.model_name, messages=MESSAGES, max_tokens=8, seed=4, temperature=1.0
    )
    stream = await client.chat.completions.create(
        model=http_server.model_name, messages=MESSAGES, max_tokens=8, seed=4, temperature=1.0, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == chat.choices[0].message.content
    await client.close()


async def test_client_disconnect_frees_the_engine(http_server: LiveServer) -> None:
    body = {
        "model": http_server.model_name,
        "prompt": "Tell me a long story",
        "stream": True,
        "max_tokens": None,
        "ignore_eos": True,
        "temperature": 1.0,
    }
    async with httpx.AsyncClient(base_url=http_server.base_url, timeout=30) as client:
        for _ in range(3):
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = sse_lines(response)
                while not (await anext(lines)).startswith("data: {"):
                    pass  # read until the first token arrived, then hang up
    engine = http_server.engine
    assert await asyncio.to_thread(engine.wait_idle, 30)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_pages_used) == (0, 0, 0)
    # and the server still answers
    again = await http_server.async_client().completions.create(model=http_server.model_name, prompt="x", max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")


async def test_no_compilation_while_serving(http_server: LiveServer) -> None:
    # The counter is process-wide (other engines in this test process compile too), so compare
    # before and after a burst of differently shaped requests rather than against zero.
    before = http_server.engine.stats().compilations_after_warmup
    client = http_server.async_client()
    await asyncio.gather(
        *(
            client.completions.create(model=http_server.model_name, prompt="word " * length, max_tokens=3, n=n)
            for length, n in ((1, 1), (10, 2), (70, 1), (30, 3), (5, 4))
        )
    )
    assert http_server.engine.stats().compilations_after_warmup == before
    await client.close()


# ---- OpenAPI and Swagger UI -----------------------------------------------------------------


def test_openapi_document_is_valid_and_complete(http_server: LiveServer) -> None:
    from openapi_spec_validator import validate

    spec = http.get(f"{http_server.base_url}/openapi.json").json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    expected = {
        "/v1/chat/completions": "post",
        "/v1/completions": "post",
        "/v1/models": "get",
        "/health": "get",
        "/v1/ready": "get",
        "/v1/encode": "post",
        "/generate": "post",
        "/v1/responses": "post",
        "/v1/messages": "post",
        "/v1/messages/count_tokens": "post",
    }
    assert {path: set(spec["paths"][path]) for path in expected} == {p: {m} for p, m in expected.items()}
    schemas = spec["components"]["schemas"]
    for name in (
        "ChatCompletionRequest",
        "ChatCompletionResponse",
        "CompletionRequest",
        "CompletionResponse",
        "ModelList",
        "ErrorResponse",
    ):
        assert name in schemas, f"{name} is missing from the OpenAPI components"
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert {"200", "400", "404"} <= set(chat["responses"])
    streamed = chat["responses"]["200"]["content"]["text/event-stream"]
    assert streamed["x-sse-event-schema"]["$ref"].endswith("ChatCompletionChunk")


def test_swagger_ui_at_root_served_from_this_server(http_server: LiveServer) -> None:
    page = http.get(f"{http_server.base_url}/")
    assert page.status_code == 200 and "swagger-ui" in page.text and '"openapi.json"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    scripts = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert scripts and not [url for url in scripts if "//" in url], "Swagger UI must not load from a CDN"
    for url in scripts:
        assert http.get(f"{http_server.base_url}/{url}").status_code == 200, url
