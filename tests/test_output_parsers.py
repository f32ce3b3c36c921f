"""Tool-call and reasoning parsers on recorded model outputs, whole and streamed.

The outputs are what each model family writes (Qwen2.5 and Qwen3 `<tool_call>` JSON, InternLM2.5
`<|action_start|><|plugin|>` with its `<|action_end|>` stop word already cut off, Llama 3.1 bare JSON,
DeepSeek-R1 and Qwen3 `<think>` blocks), plus malformed ones. Streaming must not depend on where the
text is cut: every output is fed split at every single position, and one character at a time, and
must give the same events as the whole text, with tags never leaking and names before arguments.
"""

from __future__ import annotations

import pytest

from serving.text.chat_output import ChatOutputParser, OutputEvent, collect_text
from serving.text.reasoning import ReasoningParser, parser_name, starts_in_reasoning
from serving.text.tool_parsers import tool_format

WEATHER = '{"city": "Paris", "unit": "celsius", "days": [1, 2], "note": "a \\"quoted\\" } brace"}'

TOOL_CASES = {
    # name: (parser, model output, expected content, expected [(name, arguments)])
    "qwen2.5-content-then-call": (
        "qwen",
        f'Let me check the weather.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
        "Let me check the weather.",
        [("get_weather", WEATHER)],
    ),
    "qwen2.5-two-calls": (
        "qwen",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        None,
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris"}')],
    ),
    "qwen-keys-swapped": (
        "qwen",
        '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>',
        None,
        [("search", '{"q": "x"}')],
    ),
    "qwen-malformed-block-stays-text": (
        "qwen",
        "I would call <tool_call>get_weather(city=Paris)</tool_call> but cannot.",
        "I would call <tool_call>get_weather(city=Paris)</tool_call> but cannot.",
        [],
    ),
    "qwen-unclosed-block-stays-text": (
        "qwen",
        "Answer: <tool_call>\n{not json",
        "Answer: <tool_call>\n{not json",
        [],
    ),
    "qwen-length-cut-inside-arguments": (
        "qwen",
        '<tool_call>\n{"name": "write_file", "arguments": {"path": "a.txt", "text": "hello wor',
        None,
        [("write_file", '{"path": "a.txt", "text": "hello wor')],
    ),
    "qwen-plain-answer-kept-exactly": (
        "qwen",
        "Paris is sunny; use {braces} and <tags> freely.\n\n",
        "Paris is sunny; use {braces} and <tags> freely.\n\n",
        [],
    ),
    "internlm2.5-action": (
        "internlm",
        'I need the weather first.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
        + WEATHER + "}",
        "I need the weather first.",
        [("get_weather", WEATHER)],
    ),
    "internlm-closed-action": (
        "internlm",
        '<|action_start|><|plugin|>\n{"name": "search", "parameters": {"query": "xlserve"}}<|action_end|>',
        None,
        [("search", '{"query": "xlserve"}')],
    ),
    "llama3.1-json": (
        "llama3",
        '{"name": "get_weather", "parameters": ' + WEATHER + "}",
        None,
        [("get_weather", WEATHER)],
    ),
    "llama3-python-tag-two-calls": (
        "llama3",
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1]}}',
        None,
        [("a", "{}"), ("b", '{"x": [1]}')],
    ),
    "llama3-json-inside-text-is-text": (
        "llama3",
        'Use {"name": "x", "parameters": {}} to call x.',
        'Use {"name": "x", "parameters": {}} to call x.',
        [],
    ),
}

REASONING_CASES = {
    # name: (parser, starts in reasoning, output, expected reasoning, expected content)
    "r1-template-opened": ("deepseek-r1", True, "The user wants 2+2.\nThat is 4.\n</think>\n\nThe answer is 4.",
                           "The user wants 2+2.\nThat is 4.\n", "The answer is 4."),
    "qwen3-model-opens": ("qwen3", False, "<think>\nShort question.\n</think>\n\nHello!", "Short question.\n",
                          "Hello!"),
    "qwen3-no-thinking": ("qwen3", False, "Hello there, <think> is just a word here.", None,
                          "Hello there, <think> is just a word here."),
    "r1-unclosed-reasoning": ("deepseek-r1", True, "Still thinking about </thi", "Still thinking about </thi", None),
    "r1-leading-open-tag": ("deepseek-r1", True, "  <think>\nhmm</think>ok", "hmm", "ok"),
}


def normalized(events: list[OutputEvent]) -> list[tuple]:
    """Adjacent pieces of the same kind (and call) merged: what a client accumulates."""
    merged: list[tuple] = []
    for event in events:
        key = (event.kind, event.index if event.kind in ("call", "arguments") else 0)
        if merged and merged[-1][:2] == key and event.kind != "call":
            merged[-1] = (*key, merged[-1][2] + event.text)
        else:
            merged.append((*key, event.text))
    return merged


def run(make_parser, chunks: list[str]) -> tuple[list[OutputEvent], ChatOutputParser]:
    parser = make_parser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish(), parser


def splits(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def check_streaming(make_parser, text: str) -> list[OutputEvent]:
    whole, _ = run(make_parser, [text])
    for chunks in splits(text):
        events, _ = run(make_parser, chunks)
        assert normalized(events) == normalized(whole), chunks
        seen_calls = set()
        for event in events:  # a call's name comes before any of its arguments
            if event.kind == "call":
                seen_calls.add(event.index)
            elif event.kind == "arguments":
                assert event.index in seen_calls
    return whole


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_tool_calls_whole_and_split_everywhere(case):
    parser_name_, text, content, calls = TOOL_CASES[case]
    fmt = tool_format(parser_name_)
    events = check_streaming(lambda: ChatOutputParser(tools=fmt), text)
    got_content, _ = collect_text(events)
    assert got_content == content
    _, parser = run(lambda: ChatOutputParser(tools=fmt), [text])
    assert [(c.name, c.arguments) for c in parser.calls] == calls
    streamed_arguments = {}
    for event in events:
        if event.kind == "arguments":
            streamed_arguments[event.index] = streamed_arguments.get(event.index, "") + event.text
    assert [streamed_arguments.get(i, "") for i in range(len(calls))] == [arguments for _, arguments in calls]


@pytest.mark.parametrize("case", sorted(REASONING_CASES))
def test_reasoning_whole_and_split_everywhere(case):
    name, in_reasoning, text, reasoning, content = REASONING_CASES[case]
    assert parser_name(name) == name
    events = check_streaming(lambda: ChatOutputParser(ReasoningParser(in_reasoning)), text)
    assert collect_text(events) == (content, reasoning)


def test_reasoning_then_tool_call_as_qwen3_writes_it():
    text = ('<think>\nThe user asks for the weather, I should call the tool.\n</think>\n\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')  # fmt: skip
    make = lambda: ChatOutputParser(ReasoningParser(False), tool_format("qwen3"))  # noqa: E731
    events = check_streaming(make, text)
    assert collect_text(events) == (None, "The user asks for the weather, I should call the tool.\n")
    assert [e.kind for e in normalized_events(events)] == ["reasoning", "call", "arguments"]


def normalized_events(events: list[OutputEvent]) -> list[OutputEvent]:
    return [OutputEvent(kind, text, index) for kind, index, text in normalized(events)]


def test_forced_call_prefix_is_read_but_never_emitted():
    fmt = tool_format("qwen")
    prefix = fmt.call_prefix("get_weather")
    assert prefix == '<tool_call>\n{"name": "get_weather", "arguments": '
    events = check_streaming(lambda: ChatOutputParser(tools=fmt, call_prefix=prefix), '{"city": "Oslo"}}\n</tool_call>')
    assert normalized(events) == [("call", 0, "get_weather"), ("arguments", 0, '{"city": "Oslo"}')]
    assert tool_format("internlm").call_prefix(None) == '<|action_start|><|plugin|>\n{"name": "'
    assert tool_format("llama3").call_prefix("f") == '{"name": "f", "parameters": '


def test_max_calls_keeps_the_first():
    text = TOOL_CASES["qwen2.5-two-calls"][1]
    events, parser = run(lambda: ChatOutputParser(tools=tool_format("qwen"), max_calls=1), [text])
    assert [c.name for c in parser.calls] == ["get_weather"]
    assert {e.index for e in events if e.kind in ("call", "arguments")} == {0}


@pytest.mark.parametrize(
    "name, prompt, enable_thinking, expected",
    [
        ("deepseek-r1", "<｜User｜>2+2?<｜Assistant｜><think>\n", None, True),  # R1's template opens it
        ("qwen3", "<|im_start|>assistant\n<think>\n", None, True),
        ("deepseek-r1", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", None, True),
        ("deepseek-r1", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False, False),
        ("qwen3", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", None, False),
        # Qwen3 with enable_thinking=false writes an empty closed block
        ("deepseek-r1", "<|im_start|>assistant\n<think>\n\n</think>\n\n", None, False),
        # an earlier turn's block, closed, does not open this one
        ("qwen3", "<|im_start|>assistant\n<think>\nx\n</think>\n\nhi<|im_end|>\n<|im_start|>assistant\n", None,
         False),
    ],
)
def test_where_the_output_starts_comes_from_the_prompt(name, prompt, enable_thinking, expected):
    assert starts_in_reasoning(name, prompt, enable_thinking) is expected


def test_unknown_parsers_are_named():
    with pytest.raises(ValueError, match="unknown tool call parser 'xml'"):
        tool_format("xml")
    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'"):
        parser_name("o1")
    assert parser_name("default") == "deepseek-r1" and tool_format("hermes").name == "qwen"
