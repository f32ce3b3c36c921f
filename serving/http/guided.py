"""Structured output from a request's fields: which constraint it asks for, compiled off the event loop.

The fields (one constraint per request; two are a 400):
- `response_format`: OpenAI's `{"type": "json_object"}` and `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (enforced whatever `strict` says), LMDeploy's `{"type": "regex_schema",
  "regex_schema": PATTERN}`; `{"type": "text"}` asks for nothing;
- vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark or GBNF) and its newer
  `structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}`; `guided_decoding_backend`:
  `device` / `host` sends a regular constraint to one path (default: the device when it is regular);
- `bad_words` whose spellings are several tokens (`serving.text.bad_words`), as an automaton that bans
  the token completing one;
- chat's `tool_choice: "required"` or a named function (with `--tool-call-parser`): the call that the
  prompt's call prefix opens is constrained to a tool's name and its parameters' schema.

Compilation runs on a small thread pool with a time limit (`COMPILE_TIMEOUT_S`), cached by hash in the
server's `GuideCompiler`; what cannot be enforced is a 400 naming the field, never unconstrained text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import Any

from serving.http.errors import APIError
from serving.http.protocol import SamplingFields
from serving.http.tools import ToolPlan
from serving.request import GenerationConfig, Guide
from serving.text.bad_words import bad_word_spellings
from serving.text.grammar import GuideCompiler, GuideError, GuideSpec
from serving.text.tokenizer import Tokenizer

COMPILE_TIMEOUT_S = 20.0
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="xlserve-grammar")
_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def guide_spec(body: SamplingFields, tokenizer: Tokenizer, plan: ToolPlan | None = None) -> GuideSpec | None:
    """The constraint `body` asks for, if any; 400 for a malformed or doubled one."""
    specs = []
    if body.bad_words:  # the spellings of several tokens (one-token ones are sampler bans: params.py)
        several = bad_word_spellings(tokenizer, body.bad_words)[1]
        specs += [GuideSpec("bad_words", [list(ids) for ids in several], "bad_words")] if several else []
    backend = body.guided_decoding_backend or "auto"
    if backend not in ("auto", "device", "host"):
        raise APIError(400, "guided_decoding_backend must be auto, device or host", param="guided_decoding_backend")
    if body.response_format is not None:
        specs += _response_format(body.response_format)
    for field, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                        ("guided_grammar", "grammar")):
        value = getattr(body, field)
        if value is not None:
            if kind == "json_schema" and isinstance(value, str):
                value = _json(value, field)
            specs.append(GuideSpec(kind, value, field))
    if body.structured_outputs is not None:
        specs += _structured_outputs(body.structured_outputs)
    if plan is not None and plan.allowed is not None and plan.format is not None:
        specs.append(_tool_call(plan))
    if len(specs) > 1:
        raise APIError(400, f"one structured-output constraint per request; got {', '.join(s.param for s in specs)}",
                       param=specs[1].param)
    if not specs:
        return None
    spec = specs[0]
    return GuideSpec(spec.kind, spec.source, spec.param, backend)


async def compile_guide(compiler: GuideCompiler, spec: GuideSpec | None, config: GenerationConfig,
                        eos_token_ids: frozenset[int]) -> Guide | None:
    """`spec` compiled (on the grammar pool) for requests of `config`, which end at its stop ids."""
    if spec is None:
        return None
    if config.min_new_tokens and spec.kind != "bad_words":
        raise APIError(400, "min_tokens (min_new_tokens) cannot be combined with structured output: the end "
                       "token must stay allowed where the constraint is complete", param="min_tokens")
    # The stop ids become the automaton's end tokens: ids outside the vocabulary are a 400 here, as the engine
    # would answer (InvalidRequestError), not an overflow inside the compiler (a 500 the fuzzer found).
    config.validate(compiler.vocab_size)
    end_ids = frozenset(config.stop_token_ids or []) | (frozenset() if config.ignore_eos else eos_token_ids)
    future = _POOL.submit(compiler.compile, spec, end_ids)
    try:
        guide = await asyncio.wait_for(asyncio.wrap_future(future), COMPILE_TIMEOUT_S)
    except TimeoutError:
        raise APIError(400, f"the {spec.param} constraint took more than {COMPILE_TIMEOUT_S:.0f}s to compile; "
                       "simplify it", param=spec.param) from None
    except GuideError as error:
        raise APIError(400, error.message, param=error.param) from None
    return guide


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise APIError(400, f"{field} must be a JSON schema (an object, or its JSON text)", param=field) from None


def _response_format(value: Any) -> list[GuideSpec]:
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return []
    if kind == "json_object":
        return [GuideSpec("json_object", None, param)]
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict | bool):
            raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                           param="response_format.json_schema")
        return [GuideSpec("json_schema", inner["schema"], "response_format.json_schema.schema")]
    if kind == "regex_schema":
        if not isinstance(value.get("regex_schema"), str):
            raise APIError(400, "response_format regex_schema needs regex_schema (a pattern)",
                           param="response_format.regex_schema")
        return [GuideSpec("regex", value["regex_schema"], "response_format.regex_schema")]
    raise APIError(400, "response_format.type must be text, json_object, json_schema or regex_schema",
                   param="response_format")


def _structured_outputs(value: Any) -> list[GuideSpec]:
    if not isinstance(value, dict):
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    specs = []
    for key, item in value.items():
        if key == "json_object" and item:
            specs.append(GuideSpec("json_object", None, "structured_outputs.json_object"))
        elif key in _STRUCTURED_KINDS:
            source = _json(item, "structured_outputs.json") if key == "json" and isinstance(item, str) else item
            specs.append(GuideSpec(_STRUCTURED_KINDS[key], source, f"structured_outputs.{key}"))
        elif item is not None:
            raise APIError(400, f"structured_outputs.{key} is not supported", param=f"structured_outputs.{key}")
    return specs


def _tool_call(plan: ToolPlan) -> GuideSpec:
    """The rest of an enforced call after the prompt's call prefix: for a named function its arguments, else
    one tool's name, its arguments key and arguments; then the call's close."""
    fmt = plan.format
    tools = [tool["function"] for tool in plan.tools or [] if tool["function"]["name"] in plan.allowed]
    calls = [(tool["name"], tool.get("parameters") or {"type": "object", "properties": {}}) for tool in tools]
    close = "}" + ("\n" + fmt.end_tag if fmt.end_tag is not None and not fmt.special_tokens else "")
    named = plan.call_prefix.endswith(f'"{fmt.arguments_key}": ')  # the prefix already holds the name
    source = {"calls": calls, "named": named, "arguments_key": fmt.arguments_key, "close": close}
    return GuideSpec("tool_call", source, "tool_choice")
