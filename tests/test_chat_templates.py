"""Chat templates: our rendering path against transformers' `apply_chat_template`, per family.

Each family's tokenizer is built here (no downloads) with that family's published template as its
own; the server's path (OpenAI messages → `chat_prompt`) must give the text and ids transformers
gives for the same conversation, and `--chat-template NAME` on a tokenizer without a template must
give the same again. LMDeploy's JSON format is checked against a port of LMDeploy's own renderer and
round-trips. InternLM2's SentencePiece tokenizer loads without its remote code and encodes as
sentencepiece does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.http.prompts import chat_prompt
from serving.http.protocol import ChatMessage
from serving.text.templates import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    JsonTemplate,
    builtin_template,
    end_of_turn_words,
    list_templates,
    resolve_chat_template,
)
from serving.text.tokenizer import Tokenizer
from tests.conftest import add_tokenizer
from tests.family_tokenizers import internlm2_tokenizer, llama3_tokenizer, qwen_tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
]
NO_SYSTEM = PLAIN[1:]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]  # fmt: skip

# template name: (tokenizer builder, conversations, with tools)
FAMILIES = {
    "qwen2_5": (qwen_tokenizer, [PLAIN, NO_SYSTEM], True),
    "qwen3": (qwen_tokenizer, [PLAIN, NO_SYSTEM], True),
    "chatml": (qwen_tokenizer, [PLAIN], False),
    "llama3": (llama3_tokenizer, [PLAIN, NO_SYSTEM], False),
    "llama3_1": (llama3_tokenizer, [PLAIN, NO_SYSTEM], True),
    "internlm2": (internlm2_tokenizer, [PLAIN, NO_SYSTEM], True),
    "llama2": ("llama2", [PLAIN, NO_SYSTEM], False),
    "mistral": ("llama2", [NO_SYSTEM], False),
}


def as_transformers_sees_it(messages: list[dict]) -> list[dict]:
    """The conversation as a transformers user writes it: text content, arguments as objects."""
    result = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
        message["content"] = message.get("content") or ""
        if "tool_calls" in message:
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        result.append(message)
    return result


def make_tokenizer(builder, directory: Path, template: str | None, sentencepiece_dir: Path) -> Path:
    if builder == "llama2":
        add_tokenizer(directory, sentencepiece_dir)
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        if template is not None:
            (directory / "chat_template.jinja").write_text(template)
        return directory
    return builder(directory, template)


def reference_tokenizer(path: Path):
    """transformers' own tokenizer for the oracle; InternLM2's class is remote code, so its
    SentencePiece model is read as the Llama tokenizer it is."""
    config = json.loads((path / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") == "InternLM2Tokenizer":
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(path, add_bos_token=True)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, sentencepiece_dir):
    name = request.param
    builder, conversations, with_tools = FAMILIES[name]
    template = builtin_template(name)
    own = make_tokenizer(builder, tmp_path_factory.mktemp(f"{name}-own"), template.source,
                         sentencepiece_dir)
    bare = make_tokenizer(builder, tmp_path_factory.mktemp(f"{name}-bare"), None, sentencepiece_dir)
    return name, template, own, bare, conversations, with_tools


def test_rendering_matches_transformers_per_family(family):
    name, template, own, bare, conversations, with_tools = family
    ours_own, ours_bare = Tokenizer.from_pretrained(str(own)), Tokenizer.from_pretrained(str(bare))
    reference = reference_tokenizer(own)
    cases = [(conversation, None) for conversation in conversations]
    if with_tools:
        cases.append((TOOL_TURNS, [WEATHER_TOOL]))
    for conversation, tools in cases:
        messages = [ChatMessage.model_validate(m) for m in conversation]
        want = reference.apply_chat_template(as_transformers_sees_it(conversation), tools=tools,
                                             add_generation_prompt=True, tokenize=False)  # fmt: skip
        want_ids = reference.apply_chat_template(as_transformers_sees_it(conversation), tools=tools,
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        got = chat_prompt(ours_own, messages, None, None, tools)
        assert got.text == want
        assert got.token_ids == list(want_ids)
        # the same template by name, on a tokenizer that ships none
        assert chat_prompt(ours_bare, messages, None, template, tools) == got
    assert end_of_turn_words(template.source) == tuple(w for w in template.stop_words if w != "</s>")


def test_written_out_prompts(tmp_path):
    qwen = Tokenizer.from_pretrained(str(qwen_tokenizer(tmp_path / "qwen", None)))
    llama3 = Tokenizer.from_pretrained(str(llama3_tokenizer(tmp_path / "llama3", None)))
    internlm2 = Tokenizer.from_pretrained(str(internlm2_tokenizer(tmp_path / "internlm2", None)))

    def render(tokenizer, name, messages, tools=None, **kwargs):
        return chat_prompt(tokenizer, [ChatMessage.model_validate(m) for m in messages], kwargs or None,
                           builtin_template(name), tools).text  # fmt: skip

    hi = [{"role": "user", "content": "hi"}]
    assert render(qwen, "qwen2_5", hi) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(qwen, "qwen3", hi, enable_thinking=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render(llama3, "llama3", hi) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(internlm2, "internlm2", hi) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_tools = render(internlm2, "internlm2", TOOL_TURNS, [WEATHER_TOOL])
    assert with_tools.startswith('<s><|im_start|>system name=<|plugin|>\n[{"name": "get_weather", ')
    assert ('<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
            '{"city": "Paris"}}<|action_end|><|im_end|>\n') in with_tools  # fmt: skip
    assert '<|im_start|>environment name=<|plugin|>\n{"temperature": 21}<|im_end|>\n' in with_tools
    # a final assistant message is continued, not closed
    prefix = [*hi, {"role": "assistant", "content": "Sure, the answer is"}]
    assert render(qwen, "chatml", prefix) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nSure, the answer is"
    )


# ----- LMDeploy's JSON format ------------------------------------------------------------------------------

INTERNLM2_JSON = {
    "model_name": "my-internlm2",
    "system": "<|im_start|>system\n",
    "meta_instruction": "You are a helpful assistant.",
    "eosys": "<|im_end|>\n",
    "user": "<|im_start|>user\n",
    "eoh": "<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n",
    "eoa": "<|im_end|>",
    "separator": "\n",
    "tool": "<|im_start|>environment\n",
    "eotool": "<|im_end|>\n",
    "capability": "chat",
    "stop_words": ["<|im_end|>", "<|action_end|>"],
}


def lmdeploy_messages2prompt(spec: dict, messages: list[dict]) -> str:
    """LMDeploy's BaseChatTemplate.messages2prompt, ported as it reads."""
    get = lambda key: spec.get(key, "")  # noqa: E731
    box = {"user": get("user"), "assistant": get("assistant"), "system": get("system"), "tool": get("tool")}
    eox = {"user": get("eoh"), "assistant": get("eoa") + get("separator"), "system": get("eosys"),
           "tool": get("eotool")}  # fmt: skip
    ret = ""
    if spec.get("meta_instruction") is not None and messages and messages[0]["role"] != "system":
        ret += f"{get('system')}{spec['meta_instruction']}{get('eosys')}"
    for message in messages:
        ret += f"{box[message['role']]}{message['content']}{eox[message['role']]}"
    if messages and messages[-1]["role"] == "assistant":
        return ret[: -len(eox["assistant"])]
    return ret + box["assistant"]


def test_lmdeploy_json_template_round_trips_and_renders_as_lmdeploy(tmp_path):
    spec = JsonTemplate.from_dict(INTERNLM2_JSON)
    assert spec.to_dict() == INTERNLM2_JSON
    assert JsonTemplate.from_dict(spec.to_dict()) == spec
    assert JsonTemplate.from_dict({"user": "U:", "meta_instruction": ""}).to_dict() == {
        "meta_instruction": "", "user": "U:"}  # fmt: skip
    file = tmp_path / "internlm2.json"
    file.write_text(json.dumps(INTERNLM2_JSON))
    template = resolve_chat_template(str(file))
    assert (template.name, template.stop_words) == ("my-internlm2", ("<|im_end|>", "<|action_end|>"))
    tokenizer = Tokenizer.from_pretrained(str(qwen_tokenizer(tmp_path / "tok", None)))
    conversations = [
        [{"role": "user", "content": 'Quote "this" \\ and {{ that }} 你好'}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "tool", "content": "r"}, {"role": "assistant", "content": "the prefix"}],
    ]  # fmt: skip
    for messages in conversations:
        got = chat_prompt(tokenizer, [ChatMessage.model_validate(m) for m in messages], None, template).text
        assert got == lmdeploy_messages2prompt(INTERNLM2_JSON, messages)
    # without its default system turn, the JSON form of InternLM2's template is the built-in one
    plain = JsonTemplate.from_dict({k: v for k, v in INTERNLM2_JSON.items() if k != "meta_instruction"})
    internlm2 = Tokenizer.from_pretrained(str(internlm2_tokenizer(tmp_path / "internlm2", None)))
    messages = [ChatMessage.model_validate(m) for m in conversations[1]]
    assert "<s>" + chat_prompt(internlm2, messages, None, ChatTemplate("json", plain.to_jinja())).text == chat_prompt(
        internlm2, messages, None, builtin_template("internlm2")
    ).text


def test_resolving_names_files_and_errors(tmp_path):
    assert resolve_chat_template("hf") is None
    assert resolve_chat_template("qwen2_5").stop_words == ("<|im_end|>",)
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}")
    assert resolve_chat_template(str(jinja)).stop_words == ("<|eot_id|>",)
    with pytest.raises(ValueError, match="neither a built-in name"):
        resolve_chat_template("qwen9")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"user": "U", "eos": "x"}))
    with pytest.raises(ValueError, match="unknown chat template key"):
        resolve_chat_template(str(bad))
    table = list_templates()
    assert all(name in table for name in BUILTIN_TEMPLATES)


# ----- InternLM2's SentencePiece tokenizer, without its remote code ------------------------------------------


def test_internlm2_tokenizer_loads_without_remote_code_and_encodes_as_sentencepiece(tmp_path):
    import sentencepiece as spm

    path = internlm2_tokenizer(tmp_path, builtin_template("internlm2").source)
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers alone refuses it
        AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    tokenizer = Tokenizer.from_pretrained(str(path))
    processor = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    # (transformers' conversion differs from sentencepiece on runs of spaces at the very start of a text,
    # which chat prompts never have: they start with <s>)
    texts = ["Hello world", "two  spaces\nand a newline", "你好，世界。", "emoji 🙂 falls back to bytes",
             '{"city": "Paris"}']  # fmt: skip
    for text in texts:
        assert tokenizer.encode(text) == [1, *processor.encode(text)]  # BOS, as InternLM2Tokenizer adds
        assert tokenizer.decode(tokenizer.encode(text)) == processor.decode(processor.encode(text))
    assert tokenizer.token_id("<|im_end|>") == processor.piece_to_id("<|im_end|>")
    assert processor.piece_to_id("<|im_end|>") in tokenizer.encode("hi<|im_end|>\n", add_special_tokens=False)
    assert tokenizer.token_id("<|action_start|>") in tokenizer.all_special_ids
    assert tokenizer.decode(tokenizer.encode("<|action_start|>x"), skip_special_tokens=True) == "x"
