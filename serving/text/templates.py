"""Chat templates: the checkpoint's own, a built-in one by name, a Jinja file, or LMDeploy's JSON format.

Everything ends as Jinja source rendered by transformers' `apply_chat_template` (its sandbox, its
`tojson`, `raise_exception` and `strftime_now`), so a template behaves exactly as it would in
transformers. LMDeploy's JSON custom templates (keys `system, meta_instruction, eosys, user, eoh,
assistant, eoa, separator, tool, eotool, stop_words, ...`) are compiled to Jinja that renders
LMDeploy's order: `{system}{meta_instruction}{eosys}` (unless the conversation brings its own system
message), then `{role prefix}{content}{role suffix}` per message, then `{assistant}`.

A template also says where a turn ends: its `stop_words` (`<|im_end|>`, `<|eot_id|>`, ...) become stop
token ids, so a checkpoint whose generation_config.json lacks them (a base model, a converted one)
still stops at the end of its turn. For a checkpoint's own Jinja template they are the known
end-of-turn tokens that its source writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "configs" / "templates"

# LMDeploy's JSON keys, in its render order; `capability` and `model_name` are carried for round trips.
JSON_TEXT_FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator", "tool",
                    "eotool")  # fmt: skip
JSON_FIELDS = ("model_name", *JSON_TEXT_FIELDS, "capability", "stop_words")
# `--chat-template hf` asks for the checkpoint's own template, as in LMDeploy.
CHECKPOINT_TEMPLATE = "hf"


@dataclass(frozen=True)
class BuiltinTemplate:
    file: str
    stop_words: tuple[str, ...]
    description: str


BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "llama2": BuiltinTemplate("llama2.jinja", ("</s>",), "Llama 2 chat: [INST] <<SYS>> ... [/INST]"),
    "llama3": BuiltinTemplate("llama3.jinja", ("<|eot_id|>",), "Llama 3 Instruct: header ids, <|eot_id|>"),
    "llama3_1": BuiltinTemplate(
        "llama3_1.jinja", ("<|eot_id|>", "<|eom_id|>"), "Llama 3.1/3.2/3.3 Instruct, with JSON tool calls"
    ),
    "mistral": BuiltinTemplate("mistral.jinja", ("</s>",), "Mistral Instruct v0.1/v0.2: [INST] ... [/INST]"),
    "qwen2_5": BuiltinTemplate(
        "qwen2_5.jinja", ("<|im_end|>",), "Qwen2/Qwen2.5 Instruct: ChatML, <tool_call> tool calls"
    ),
    "qwen3": BuiltinTemplate(
        "qwen3.jinja", ("<|im_end|>",), "Qwen3: ChatML, <think> reasoning (enable_thinking), <tool_call>"
    ),
    "internlm2": BuiltinTemplate(
        "internlm2.jinja",
        ("<|im_end|>", "<|action_end|>"),
        "InternLM2/2.5 chat: ChatML, <|action_start|><|plugin|> tool calls",
    ),
    "chatml": BuiltinTemplate("chatml.jinja", ("<|im_end|>",), "plain ChatML (<|im_start|>role ... <|im_end|>)"),
}
# Which built-in serves which family's chat checkpoints (for `list-templates`).
FAMILY_TEMPLATES = {
    "llama": ("llama2", "llama3", "llama3_1"),
    "mistral": ("mistral",),
    "qwen2": ("qwen2_5",),
    "qwen3": ("qwen3",),
    "internlm2": ("internlm2",),
}
# Tokens that end a turn in the built-in templates; a checkpoint's own template that writes one
# stops on it as well.
END_OF_TURN_TOKENS = tuple(dict.fromkeys(w for t in BUILTIN_TEMPLATES.values() for w in t.stop_words if w != "</s>"))


@dataclass(frozen=True)
class ChatTemplate:
    """Jinja source and the words that end an assistant turn."""

    name: str
    source: str
    stop_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class JsonTemplate:
    """LMDeploy's custom chat template (its `ChatTemplateConfig` JSON). Missing text fields are empty;
    a missing `meta_instruction` writes no default system turn."""

    model_name: str | None = None
    system: str = ""
    meta_instruction: str | None = None
    eosys: str = ""
    user: str = ""
    eoh: str = ""
    assistant: str = ""
    eoa: str = ""
    separator: str = ""
    tool: str = ""
    eotool: str = ""
    capability: str | None = None
    stop_words: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JsonTemplate:
        unknown = sorted(set(data) - set(JSON_FIELDS))
        if unknown:
            raise ValueError(f"unknown chat template key(s) {', '.join(unknown)}; known: {', '.join(JSON_FIELDS)}")
        for key, value in data.items():
            if key == "stop_words":
                if value is not None and not (isinstance(value, list) and all(isinstance(w, str) for w in value)):
                    raise ValueError(f"stop_words must be a list of strings, got {value!r}")
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"chat template key {key!r} must be a string, got {value!r}")
        values = {k: v for k, v in data.items() if v is not None}
        values["stop_words"] = tuple(values.get("stop_words", ()))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, leaving out what is unset (so `from_dict(t.to_dict()) == t`)."""
        data: dict[str, Any] = {}
        for key in JSON_FIELDS:
            value = getattr(self, key)
            if key == "stop_words":
                if value:
                    data[key] = list(value)
            elif value not in (None, "") or (key == "meta_instruction" and value is not None):
                data[key] = value
        return data

    def to_jinja(self) -> str:
        """Jinja source rendering LMDeploy's order; a final assistant message is rendered in full, and
        continuing it (a prefix) is `apply_chat_template(continue_final_message=True)`'s business."""
        literal = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731 - a valid Jinja string literal
        prefixes = {"system": self.system, "user": self.user, "assistant": self.assistant, "tool": self.tool}
        suffixes = {"system": self.eosys, "user": self.eoh, "assistant": self.eoa + self.separator,
                    "tool": self.eotool}  # fmt: skip
        lines = [
            "{%- set prefixes = {" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in prefixes.items()) + "} %}",
            "{%- set suffixes = {" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in suffixes.items()) + "} %}",
        ]
        if self.meta_instruction is not None:
            default_system = literal(self.system + self.meta_instruction + self.eosys)
            lines.append(
                "{%- if messages and messages[0]['role'] != 'system' %}{{- " + default_system + " }}{%- endif %}"
            )
        lines += [
            "{%- for message in messages %}",
            "{{- prefixes[message['role']] + (message['content'] or '') + suffixes[message['role']] }}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}{{- " + literal(self.assistant) + " }}{%- endif %}",
        ]
        return "\n".join(lines)


def builtin_template(name: str) -> ChatTemplate:
    spec = BUILTIN_TEMPLATES[name]
    return ChatTemplate(name, (TEMPLATES_DIR / spec.file).read_text(encoding="utf-8"), spec.stop_words)


def resolve_chat_template(value: str) -> ChatTemplate | None:
    """`--chat-template VALUE`: a built-in name, a `.json` file (LMDeploy's format) or a Jinja file.

    None for `hf` (the checkpoint's own template, the default). Raises ValueError naming the choices.
    """
    if value == CHECKPOINT_TEMPLATE:
        return None
    if value in BUILTIN_TEMPLATES:
        return builtin_template(value)
    if not os.path.isfile(value):
        raise ValueError(
            f"chat template {value!r} is neither a built-in name ({', '.join(BUILTIN_TEMPLATES)}, or hf for the "
            "checkpoint's own) nor a file (a Jinja template, or LMDeploy's JSON format ending in .json)"
        )
    try:
        text = Path(value).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read the chat template file {value!r}: {error}") from error
    if value.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{value} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{value} must hold a JSON object of LMDeploy's chat template keys")
        spec = JsonTemplate.from_dict(data)
        return ChatTemplate(spec.model_name or Path(value).stem, spec.to_jinja(), spec.stop_words)
    return ChatTemplate(Path(value).stem, text, end_of_turn_words(text))


def end_of_turn_words(source: str) -> tuple[str, ...]:
    """The known end-of-turn tokens a Jinja template writes."""
    return tuple(word for word in END_OF_TURN_TOKENS if word in source)


def list_templates() -> str:
    """The `xlserve list-templates` table."""
    by_name = {name: family for family, names in FAMILY_TEMPLATES.items() for name in names}
    rows = [f"{'name':<10} {'family':<10} {'stops at':<26} description"]
    for name, spec in BUILTIN_TEMPLATES.items():
        rows.append(f"{name:<10} {by_name.get(name, '-'):<10} {' '.join(spec.stop_words):<26} {spec.description}")
    rows.append("")
    rows.append(f"--chat-template takes one of these names, {CHECKPOINT_TEMPLATE} (the checkpoint's own template, "
                "the default), a Jinja file, or a JSON file in LMDeploy's format.")
    return "\n".join(rows)
