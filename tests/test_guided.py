"""Structured output through the real server and the openai SDK: a tiny random model's answers follow the
JSON schemas, regexes, choices and grammars they were constrained to, on the device path and the host path.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from typing import Any

import jax
import jsonschema
import pytest

from tests.http_fixtures import LiveServer, http, shared_http_server  # noqa: F401 (the `http_server` fixture)

PROMPT = "Answer:"


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A small schema: objects (required and optional fields), arrays, enums, bounded strings and numbers."""
    kinds = ["string", "integer", "number", "enum", "boolean"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, 6)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 300)}
    if kind == "number":
        low = rng.randint(-20, 20)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 40)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 7, None, "a b"], rng.randint(1, 3))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": 2}
    names = rng.sample(["id", "name", "tags", "score", "kind", "x"], rng.randint(1, 3))
    properties = {name: random_schema(rng, depth + 1) for name in names}
    return {"type": "object", "properties": properties, "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False}


SCHEMAS = [random_schema(random.Random(i)) for i in range(50)]


async def _complete(server: LiveServer, **fields: Any) -> Any:
    async with server.async_client() as client:
        return await client.completions.create(model=server.model_name, prompt=PROMPT, **{"max_tokens": 100, **fields})


def _gather(server: LiveServer, requests: list[dict[str, Any]]) -> list[Any]:
    async def run() -> list[Any]:
        return await asyncio.gather(*(_complete(server, **fields) for fields in requests))

    return asyncio.run(run())


def test_answers_validate_against_fifty_json_schemas(http_server: LiveServer) -> None:
    requests = [dict(temperature=temperature, seed=seed,
                     extra_body={"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "s", "schema": schema, "strict": True}}})
                for schema in SCHEMAS for temperature, seed in ((0.0, None), (1.0, 7))]  # fmt: skip
    replies = _gather(http_server, requests)
    for schema, reply in zip([s for s in SCHEMAS for _ in range(2)], replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.text)
        jsonschema.validate(json.loads(choice.text), schema)
    assert http_server.engine.stats().compilations_after_warmup == 0


def test_regex_and_choice_guides(http_server: LiveServer) -> None:
    pattern = r"[a-z]{2,5}-[0-9]{2,4}( ok)?"
    choices = ["red", "green", "blue sky"]
    requests = [dict(temperature=1.0, seed=seed, extra_body={"guided_regex": pattern}) for seed in range(6)] + \
        [dict(temperature=1.0, seed=seed, extra_body={"guided_choice": choices}) for seed in range(6)]
    replies = _gather(http_server, requests)
    for reply in replies[:6]:
        assert re.fullmatch(pattern, reply.choices[0].text), reply.choices[0].text
    assert {reply.choices[0].text for reply in replies[6:]} <= set(choices)
    chat = http_server.client().chat.completions.create(
        model=http_server.model_name, messages=[{"role": "user", "content": "a date?"}], max_tokens=60,
        extra_body={"response_format": {"type": "regex_schema", "regex_schema": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", chat.choices[0].message.content)


def test_device_and_host_paths_give_the_same_greedy_tokens(http_server: LiveServer) -> None:
    schemas = SCHEMAS[:12]
    requests = [dict(temperature=0.0, extra_body={"guided_json": schema, "guided_decoding_backend": backend})
                for backend in ("device", "host") for schema in schemas]  # fmt: skip
    before = http_server.engine.runner.guided.host_rows
    replies = _gather(http_server, requests)
    device, host = replies[: len(schemas)], replies[len(schemas):]
    for a, b in zip(device, host, strict=True):
        assert a.choices[0].text == b.choices[0].text
        assert a.usage.completion_tokens == b.usage.completion_tokens
    assert http_server.engine.runner.guided.host_rows > before  # the host path did run


def test_grammars_that_are_not_regular_run_on_the_host(http_server: LiveServer) -> None:
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"}  # fmt: skip
    lark = 'start: "(" item (" " item)* ")"\nitem: "a" | "b" | start'
    requests = [dict(temperature=1.0, seed=seed, extra_body={"guided_json": tree}) for seed in range(3)] + \
        [dict(temperature=1.0, seed=seed, extra_body={"response_format": {"type": "json_object"}})
         for seed in range(6)] + \
        [dict(temperature=1.0, seed=seed, max_tokens=40, extra_body={"guided_grammar": lark}) for seed in range(3)]
    replies = _gather(http_server, requests)
    for reply in replies[:3]:
        jsonschema.validate(json.loads(reply.choices[0].text), tree)
    # any JSON object: a random model's free strings may run to the token limit; those that end are objects
    ended = [reply.choices[0].text for reply in replies[3:9] if reply.choices[0].finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    for reply in replies[9:]:
        text = reply.choices[0].text
        assert reply.choices[0].finish_reason == "length" or re.fullmatch(r"[()ab ]+", text), text


@pytest.mark.parametrize("fields, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "email"}}}},
     "response_format.json_schema.schema", "'format'"),
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json",
     "'uniqueItems'"),
    ({"guided_json": {"type": "integer", "multipleOf": 3}}, "guided_json", "'multipleOf'"),
    ({"guided_regex": "[a-z"}, "guided_regex", "cannot be compiled"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one structured-output constraint"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"guided_json": {"type": "object"}, "ignore_eos": True}, "ignore_eos", "ends it"),
])  # fmt: skip
def test_what_cannot_be_enforced_is_a_400_naming_it(http_server: LiveServer, fields: dict, param: str,
                                                    says: str) -> None:
    body = {"model": http_server.model_name, "prompt": PROMPT, "max_tokens": 5, **fields}
    answer = http.post(f"{http_server.base_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_constrained_steps_copy_nothing_to_the_host_but_the_tokens(http_server: LiveServer, monkeypatch) -> None:
    """Every step of constrained rows on the device path runs under `jax.transfer_guard_device_to_host`, which
    refuses device-to-host copies on an accelerator; on a CPU, where arrays are host memory and the guard has
    nothing to refuse, every read of an array's value (`np.asarray`, `int`, `tolist`... all go through
    `_value`) inside a step is counted instead. Only the engine's read-back of the sampled tokens, after
    the step, may read."""
    runner = http_server.engine.runner
    array_type = type(jax.numpy.zeros(1))
    value = array_type._value
    inside, reads, constrained = threading.local(), [], []

    def counted_value(array: Any) -> Any:
        if getattr(inside, "step", False):
            reads.append(array.shape)
        return value.fget(array)

    run = runner.run

    def run_guarded(*args: Any, **kwargs: Any) -> Any:
        inside.step = True
        try:
            with jax.transfer_guard_device_to_host("disallow"):
                tokens = run(*args, **kwargs)
        finally:
            inside.step = False
        constrained.append(runner.guided._guided)
        return tokens

    monkeypatch.setattr(array_type, "_value", property(counted_value))
    inside.step = True  # the counter counts (a control read on this thread)
    int(jax.numpy.ones(()) + 1)
    inside.step = False
    assert reads == [()]
    reads.clear()
    monkeypatch.setattr(runner, "run", run_guarded)
    replies = _gather(http_server, [dict(temperature=1.0, seed=seed, extra_body={"guided_json": schema})
                                    for seed, schema in enumerate(SCHEMAS[:4])])
    for reply, schema in zip(replies, SCHEMAS[:4], strict=True):
        jsonschema.validate(json.loads(reply.choices[0].text), schema)
    assert sum(constrained) > 20 and reads == []
