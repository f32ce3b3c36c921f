"""Tokenizers shaped like each family's, built on the spot (no downloads) for template and tool tests.

Byte-level BPE tokenizers (built with the `tokenizers` library) carry a family's special and added
tokens as that family's tokenizer does: Qwen's `<|im_start|>`/`<|im_end|>` special and `<tool_call>`,
`<think>` plain added tokens; Llama 3's header and end-of-turn ids special. InternLM2's tokenizer is a
SentencePiece BPE model with byte fallback, trained here with `sentencepiece` and configured as
InternLM2 ships it (a tokenizer class that only its remote code defines).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_ADDED = ("<tool_call>", "</tool_call>", "<think>", "</think>")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")  # fmt: skip
INTERNLM2_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
                      "<|plugin|>")  # fmt: skip


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what the ByteLevel pre-tokenizer produces)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def byte_level_tokenizer(
    directory: str | Path,
    *,
    specials: tuple[str, ...],
    added: tuple[str, ...] = (),
    chat_template: str | None,
    bos: str | None,
    eos: str,
    extra_words: tuple[str, ...] = (),
) -> Path:
    """Save a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) into `directory`.

    `extra_words` become plain added tokens too, so a test can make chosen strings single tokens.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(_byte_alphabet())}
    tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*added, *extra_words)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def qwen_tokenizer(directory: str | Path, chat_template: str | None, extra_words: tuple[str, ...] = ()) -> Path:
    return byte_level_tokenizer(directory, specials=QWEN_SPECIALS, added=QWEN_ADDED, chat_template=chat_template,
                                bos=None, eos="<|im_end|>", extra_words=extra_words)  # fmt: skip


def llama3_tokenizer(directory: str | Path, chat_template: str | None) -> Path:
    return byte_level_tokenizer(directory, specials=LLAMA3_SPECIALS, chat_template=chat_template,
                                bos="<|begin_of_text|>", eos="<|eot_id|>")  # fmt: skip


CORPUS = (
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The weather in Paris is sunny today; tomorrow it rains in Shanghai.",
    "你好，世界。书生浦语是一个语言模型。",
    'Call the function get_weather with {"city": "Paris"} and [1, 2, 3].',
    "numbers 0123456789 and symbols {}[]\":,<>|/\\",
)


def internlm2_tokenizer(directory: str | Path, chat_template: str | None) -> Path:
    """A SentencePiece BPE tokenizer.model with InternLM2's tokenizer_config.json (its remote class)."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, user_defined_symbols=list(INTERNLM2_SPECIALS), character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    special = lambda text: {"content": text, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                            "single_word": False, "special": True}  # fmt: skip
    config = {
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {
            str(i): special(t) for i, t in enumerate(("<unk>", "<s>", "</s>", *INTERNLM2_SPECIALS))
        },
        "additional_special_tokens": list(INTERNLM2_SPECIALS),
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "model_max_length": 32768,
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
    }  # fmt: skip
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
