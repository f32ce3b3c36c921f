"""A thin, local-only wrapper over a transformers fast tokenizer.

It pins down the few things the server needs (ids of special tokens, encode, decode, chat template) so
the rest of the code never touches transformers' wide and version-dependent tokenizer API.

Prompts come from clients, so their cost is bounded before it is paid: `encode_at_most` refuses a text
that must have more tokens than allowed without tokenizing all of it (`PromptTooLong`), and a chat
template sees a request's variables only as variables, never as options of the rendering call.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2.defaults
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Names a chat template sees that a request's variables may not take: apply_chat_template's own
# parameters (it would read them as options: `tokenize`, `padding`, `documents`...) and the names the
# renderer gives the template (the messages, its helper functions, Jinja's globals).
RESERVED_TEMPLATE_NAMES = (
    frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
) | {"messages", "raise_exception", "strftime_now"} | frozenset(jinja2.defaults.DEFAULT_NAMESPACE)

# `encode_at_most` first reads a prefix of this many characters per allowed token: more than nearly any
# text spends on a token (prose and code average 3 to 5), so a text too long for the limit is usually
# found out there; texts of longer tokens are read in longer prefixes.
PREFIX_CHARS_PER_TOKEN = 4
# Tokens that cutting a text may add at the cut (a word split in two tokenizes into more pieces): a
# prefix is over the limit only if it is over by more than this.
CUT_MARGIN_TOKENS = 64


def named_tokenizer_class(name: object) -> type | None:
    """The transformers class tokenizer_config.json names (its fast variant where one exists, as AutoTokenizer
    picks), found without AutoTokenizer: AutoTokenizer's module imports transformers' model configuration,
    which imports torch where it is installed, the longest part of a server's restart where torch is built for
    CUDA (docs/perf-notes.md, "Fifteenth session"). None for a name transformers lacks (remote code)."""
    if not isinstance(name, str) or not name.isidentifier():
        return None
    import transformers

    for candidate in (name,) if name.endswith("Fast") else (f"{name}Fast", name):
        found = getattr(transformers, candidate, None)
        if isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase):
            return found
    return None


class PromptTooLong(ValueError):
    """A text has more tokens than allowed, found out without tokenizing all of it."""

    def __init__(self, at_least: int, limit: int):
        super().__init__(f"more than {limit} tokens (at least {at_least})")
        self.at_least = at_least
        self.limit = limit


class TemplateVariableError(ValueError):
    """A request's chat template variable that cannot be one (a reserved name or not an identifier)."""

    def __init__(self, name: str, why: str):
        super().__init__(f"{name!r} {why}")
        self.name = name

# Tokenizer classes that live in a checkpoint's remote code but are plain SentencePiece BPE models
# (byte fallback, dummy prefix, BOS added) that transformers' Llama tokenizer reads from
# `tokenizer.model` as they are; with their default of adding BOS.
SENTENCEPIECE_REMOTE_TOKENIZERS = {"InternLM2Tokenizer": True, "InternLM2TokenizerFast": True}


class Tokenizer:
    """Encode, decode and render chat prompts for one model.

    Attributes:
        vocab_size: size of the full vocabulary, added tokens included.
        bos_token_id: the tokenizer's BOS id, or None.
        eos_token_ids: the tokenizer's own EOS id(s); the engine adds the model config's.
        all_special_ids: every id that `skip_special_tokens` removes when decoding.
        chat_template: the Jinja chat template shipped with the tokenizer, or None.
    """

    def __init__(self, hf_tokenizer: Any):
        if not getattr(hf_tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(hf_tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; "
                "xlserve needs one (a tokenizer.json, or a tokenizer.model that transformers can convert)"
            )
        self._hf = hf_tokenizer
        # Decoding runs once per generated token, so it calls the Rust tokenizer directly rather than
        # going through transformers' Python layers (about half the cost per call).
        self._backend = hf_tokenizer.backend_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        eos = hf_tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset() if eos is None else frozenset([eos])
        # The Rust decoder skips every added token flagged special, which can be more than the
        # named special tokens transformers lists, so take the union.
        flagged = {i for i, tok in hf_tokenizer.added_tokens_decoder.items() if tok.special}
        self.all_special_ids: frozenset[int] = frozenset(hf_tokenizer.all_special_ids) | flagged
        template = hf_tokenizer.chat_template
        # Some tokenizers ship several named templates; "default" is the one chat uses.
        if isinstance(template, dict):
            template = template.get("default")
        self.chat_template: str | None = template
        self._pieces: dict[int, tuple[str, bytes]] = {}  # token_piece's cache

    @classmethod
    def from_pretrained(cls, path: str, gguf_file: str | os.PathLike[str] | None = None) -> Tokenizer:
        """Load from a local directory; never downloads and never runs code shipped with a model.

        A tokenizer whose class exists only in the checkpoint's remote code (InternLM2's) is read
        from its `tokenizer.model` by transformers' SentencePiece-backed Llama tokenizer instead. A GGUF
        checkpoint (`model.gguf`) carries its vocabulary, merges, special tokens and chat template in its
        metadata, which transformers' GGUF converter turns into a fast tokenizer: `path` is then that file, or
        `gguf_file` names it (`model.gguf.find_gguf_file` finds it in a folder; the text layer does not look).
        """
        if gguf_file is None and os.path.isfile(path):
            gguf_file = path
        if gguf_file is not None:
            gguf_file = Path(gguf_file)
            return cls(PreTrainedTokenizerFast.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                               local_files_only=True))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer path {path!r} is not a local directory")
        config = _tokenizer_config(path)
        remote_class = _remote_tokenizer_class(config)
        if remote_class in SENTENCEPIECE_REMOTE_TOKENIZERS and os.path.isfile(os.path.join(path, "tokenizer.model")):
            logger.info("reading %s's tokenizer.model as a SentencePiece BPE model (no remote code)", remote_class)
            add_bos = config.get("add_bos_token", SENTENCEPIECE_REMOTE_TOKENIZERS[remote_class])
            return cls(LlamaTokenizer.from_pretrained(path, local_files_only=True, add_bos_token=add_bos))
        direct = named_tokenizer_class(config.get("tokenizer_class"))
        if direct is not None and remote_class is None:
            return cls(direct.from_pretrained(path, local_files_only=True))
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True))

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer underneath, for libraries that read one (llguidance's token bytes)."""
        return self._hf

    def token_id(self, token: str) -> int | None:
        """The id of `token` when it is one whole token of the vocabulary (e.g. `<|im_end|>`), else None."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for: its vocabulary string's length bounds that (a
        byte-level piece is one character a byte, a SentencePiece `▁` one space, a byte-fallback piece
        `<0xE3>` six characters for less than one)."""
        return max(map(len, self._hf.get_vocab()))

    def encode_at_most(self, text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
        """`encode(text)`, unless the text has more than `max_tokens` tokens (special tokens aside): then
        PromptTooLong, found out with work bounded by `max_tokens`, not by the text's length. A text of
        more than `max_tokens * max_token_chars` characters is refused before any tokenizing; a longer
        one than `PREFIX_CHARS_PER_TOKEN` characters a token is first judged by prefixes of growing length.
        Assumes the normalizer deletes no characters, as those of Llama, Qwen, Mistral and InternLM do."""
        if len(text) > max_tokens * self.max_token_chars:
            raise PromptTooLong(len(text) // self.max_token_chars, max_tokens)
        span = PREFIX_CHARS_PER_TOKEN * max(max_tokens, 1)
        while span < len(text):
            found = len(self._hf.encode(text[:span], add_special_tokens=False)) - CUT_MARGIN_TOKENS
            if found > max_tokens:
                raise PromptTooLong(found, max_tokens)
            span *= PREFIX_CHARS_PER_TOKEN
        ids = self.encode(text, add_special_tokens)
        found = len(ids) - (self._num_added_tokens if add_special_tokens else 0)
        if found > max_tokens:
            raise PromptTooLong(found, max_tokens)
        return ids

    @functools.cached_property
    def _num_added_tokens(self) -> int:
        """The special tokens `encode` adds to any text (a BOS, say)."""
        return len(self._hf.encode("", add_special_tokens=True))

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """A token's own text and UTF-8 bytes, as log probabilities show it (OpenAI's `token`, `bytes`).

        Decoding the id after a plain anchor token keeps its leading space (SentencePiece drops a space
        at the start of a text); a byte-fallback token (`<0xE2>`) is its byte, and its text is the piece's
        name. Cached: an answer's top logprobs name the same few hundred tokens again and again."""
        cached = self._pieces.get(token_id)
        if cached is None:
            name = self._hf.convert_ids_to_tokens(token_id)
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name or "")
            if byte:
                cached = name, bytes([int(byte.group(1), 16)])
            else:
                anchor = self._anchor_text
                text = self._backend.decode([self._anchor_id, token_id], skip_special_tokens=False)[len(anchor):]
                cached = text, text.encode()
            self._pieces[token_id] = cached
        return cached

    @functools.cached_property
    def _anchor_id(self) -> int:
        return self._hf.encode("a", add_special_tokens=False)[-1]

    @functools.cached_property
    def _anchor_text(self) -> str:
        return self._backend.decode([self._anchor_id], skip_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token boundaries, so streamed
        # text could then differ from a one-shot decode of the same ids.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """Render `messages` to prompt text (encode it with `add_special_tokens=False`: templates
        write their own BOS). `chat_template` overrides the tokenizer's; `continue_final_message` leaves
        a final assistant message open; `variables` are extra template variables (`enable_thinking`),
        TemplateVariableError if one is named like anything in RESERVED_TEMPLATE_NAMES."""
        if chat_template is None and self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); pass a chat template explicitly or use the completions API"
            )
        for name in variables or {}:
            if name in RESERVED_TEMPLATE_NAMES:
                raise TemplateVariableError(name, "is reserved: the template or its renderer already uses it")
            if not name.isidentifier():
                raise TemplateVariableError(name, "is not a template variable name")
        return self._hf.apply_chat_template(
            messages,
            tools=tools,
            chat_template=chat_template,  # None: the tokenizer's own (or its `tool_use` one, given tools)
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(variables or {}),
        )


def _tokenizer_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as handle:
        config = json.load(handle)
    return config if isinstance(config, dict) else {}


def _remote_tokenizer_class(config: dict[str, Any]) -> str | None:
    """The tokenizer class a tokenizer_config.json names only through remote code (`auto_map`), if any."""
    if "AutoTokenizer" not in (config.get("auto_map") or {}):
        return None
    return config.get("tokenizer_class")
