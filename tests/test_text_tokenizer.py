"""Tokenizer wrapper: local loading, special ids, and chat templates rendered exactly as transformers does."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.text.tokenizer import PromptTooLong, TemplateVariableError, Tokenizer
from tests.sentencepiece_tokenizer import VOCAB_SIZE

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, 用中文 🦜"},
    ],
]


@pytest.fixture(scope="module")
def llama_dir(sentencepiece_dir) -> Path:
    return sentencepiece_dir


def test_loads_offline_with_llama_special_ids(llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = Tokenizer.from_pretrained(str(llama_dir))
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == frozenset({2})
    assert tok.all_special_ids == frozenset({0, 1, 2})
    assert tok.chat_template is not None


def test_encode_adds_bos_and_decode_skips_it(llama_dir):
    tok = Tokenizer.from_pretrained(str(llama_dir))
    ids = tok.encode("Hello world")
    assert ids[0] == 1
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<s> Hello world"


def test_only_local_directories_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        Tokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(str(tmp_path / "missing"))


def test_chat_template_matches_transformers(llama_dir):
    reference = AutoTokenizer.from_pretrained(str(llama_dir), local_files_only=True)
    tok = Tokenizer.from_pretrained(str(llama_dir))
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            assert expected.startswith("<s>[INST] ")
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_missing_chat_template_is_a_clear_error(llama_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):  # everything but chat_template.jinja
        shutil.copy(llama_dir / name, tmp_path / name)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])
    # A template passed in explicitly is used instead.
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert tok.apply_chat_template(CONVERSATIONS[0], chat_template=template) == "[user] Hello!\n"


def test_encode_at_most_encodes_what_fits_and_refuses_the_rest_without_tokenizing_it(llama_dir):
    tokenizer = Tokenizer.from_pretrained(str(llama_dir))
    text = "Once upon a time, a fox read a book. " * 3
    fits = len(tokenizer.encode(text, add_special_tokens=False))
    assert tokenizer.encode_at_most(text, fits) == tokenizer.encode(text)  # exactly at the limit, BOS aside
    assert tokenizer.encode_at_most(text, fits, add_special_tokens=False) == tokenizer.encode(text, False)
    with pytest.raises(PromptTooLong) as over:
        tokenizer.encode_at_most(text, fits - 1)
    assert over.value.at_least == fits
    # Past the character bound (limit × the longest token), refused before any tokenizing.
    assert tokenizer.max_token_chars == 12  # "▁development", in this vocabulary
    huge = "Once upon a time. " * 220_000  # 4 MB
    began = time.perf_counter()
    with pytest.raises(PromptTooLong):
        tokenizer.encode_at_most(huge, 127)
    assert time.perf_counter() - began < 0.05
    # Within the bound, at 2 characters a token: a prefix shows it too long.
    short_tokens = "a " * 2000
    with pytest.raises(PromptTooLong) as prefix:
        tokenizer.encode_at_most(short_tokens, 500)
    assert 500 < prefix.value.at_least <= len(tokenizer.encode(short_tokens, add_special_tokens=False))


def test_template_variables_are_variables_only(llama_dir):
    tokenizer = Tokenizer.from_pretrained(str(llama_dir))
    messages = [{"role": "user", "content": "hi"}]
    plain = tokenizer.apply_chat_template(messages)
    assert tokenizer.apply_chat_template(messages, variables={"enable_thinking": False}) == plain
    for name in ("tokenize", "documents", "return_dict", "padding", "messages", "raise_exception", "range", "1x"):
        with pytest.raises(TemplateVariableError) as refused:
            tokenizer.apply_chat_template(messages, variables={name: 5})
        assert refused.value.name == name


def test_named_classes_load_as_autotokenizer_loads_them_without_importing_torch(llama_dir, tmp_path):
    """A tokenizer_config.json naming a class transformers has, LlamaTokenizer (SentencePiece),
    PreTrainedTokenizerFast (byte-level BPE, Llama 3's), a family's own (Qwen2Tokenizer: its fast variant) or
    TokenizersBackend (what transformers 5 saves), is built directly: the same tokenizer AutoTokenizer builds,
    and no torch in the server's process (AutoTokenizer's module imports it)."""
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.family_tokenizers import llama3_tokenizer, qwen_tokenizer

    text = "Hello <|eot_id|> wörld  \n\n 123 <s> <|im_end|>"
    paths = [llama_dir, llama3_tokenizer(tmp_path / "llama3", chat_template=None)]
    for name in ("Qwen2Tokenizer", "TokenizersBackend"):
        path = qwen_tokenizer(tmp_path / name, chat_template=None)
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": name}))
        paths.append(path)
    for path in paths:
        reference = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tok = Tokenizer.from_pretrained(str(path))
        assert type(tok.hf_tokenizer) is type(reference)
        assert tok.encode(text) == reference.encode(text)
        assert (tok.bos_token_id, tok.vocab_size) == (reference.bos_token_id, len(reference))
        script = ("import sys; from serving.text.tokenizer import Tokenizer; "
                  f"Tokenizer.from_pretrained({str(path)!r}); print('torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.stdout.strip() == "False", result.stderr[-2000:]
