"""A thin, local-only wrapper over a transformers fast tokenizer.

It pins down the few things the server needs (ids of special tokens, encode, decode, chat template) so
the rest of the code never touches transformers' wide and version-dependent tokenizer API.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from model.gguf import find_gguf_file

logger = logging.getLogger(__name__)

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

    @classmethod
    def from_pretrained(cls, path: str) -> Tokenizer:
        """Load from a local directory; never downloads and never runs code shipped with a model.

        A tokenizer whose class exists only in the checkpoint's remote code (InternLM2's) is read
        from its `tokenizer.model` by transformers' SentencePiece-backed Llama tokenizer instead. A GGUF
        checkpoint (`model.gguf`) carries its vocabulary, merges, special tokens and chat template in its
        metadata, which transformers' GGUF converter turns into a fast tokenizer.
        """
        gguf_file = find_gguf_file(path)
        if gguf_file is not None:
            return cls(PreTrainedTokenizerFast.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                               local_files_only=True))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer path {path!r} is not a local directory")
        remote_class = _remote_tokenizer_class(path)
        if remote_class in SENTENCEPIECE_REMOTE_TOKENIZERS and os.path.isfile(os.path.join(path, "tokenizer.model")):
            logger.info("reading %s's tokenizer.model as a SentencePiece BPE model (no remote code)", remote_class)
            config = _tokenizer_config(path)
            add_bos = config.get("add_bos_token", SENTENCEPIECE_REMOTE_TOKENIZERS[remote_class])
            return cls(LlamaTokenizer.from_pretrained(path, local_files_only=True, add_bos_token=add_bos))
        hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        return cls(hf)

    def token_id(self, token: str) -> int | None:
        """The id of `token` when it is one whole token of the vocabulary (e.g. `<|im_end|>`), else None."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of tokenization spaces: it rewrites text across token boundaries, so streamed
        # text could then differ from a one-shot decode of the same ids.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` to prompt text (encode it with `add_special_tokens=False`: templates
        write their own BOS). `kwargs` reach the template (e.g. `chat_template=` to override it,
        `continue_final_message=True` to leave a final assistant message open)."""
        if self.chat_template is None and kwargs.get("chat_template") is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
                "chat_template.jinja); pass a chat template explicitly or use the completions API"
            )
        return self._hf.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )


def _tokenizer_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as handle:
        config = json.load(handle)
    return config if isinstance(config, dict) else {}


def _remote_tokenizer_class(path: str) -> str | None:
    """The tokenizer class a checkpoint names only through remote code (`auto_map`), if any."""
    config = _tokenizer_config(path)
    if "AutoTokenizer" not in (config.get("auto_map") or {}):
        return None
    return config.get("tokenizer_class")
