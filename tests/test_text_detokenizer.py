"""Incremental detokenization against one-shot `decode`, on Llama 2's SentencePiece tokenizer (byte
fallback, leading-space stripping) and the demo model's byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest

from configs.demo import ensure_demo_checkpoint
from serving.text.detokenizer import IncrementalDetokenizer
from serving.text.tokenizer import Tokenizer
from tests.sentencepiece_tokenizer import BYTE_IDS

# Rare CJK (Extension B), emoji (also a ZWJ family), combining marks, math letters: all beyond Llama
# 2's pieces, so they go through byte-fallback tokens; mixed with text that has pieces.
UNICODE_TEXTS = [
    "Hello world, 𠀀𠀁 鿰 ꙮ 🦜🦜 ✓ 你好世界 👨‍👩‍👧 e\u0301 naïve   spaces\n\nnew line",
    "  two leading spaces",
    "🦜",
    "a 🦜b",
    "ʕ•́ᴥ•̀ʔっ ♡ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def llama(sentencepiece_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(str(sentencepiece_dir))


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(ensure_demo_checkpoint(str(tmp_path_factory.mktemp("cache"))))


def stream(tok: Tokenizer, prompt: list[int], ids: list[int], chunks: list[int] | None = None,
           skip_special_tokens: bool = True) -> list[str]:
    """Push `ids` in pieces of the given sizes (default one token each), then flush."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    sizes = iter(chunks or [])
    pieces, i = [], 0
    while i < len(ids):
        n = next(sizes, 1)
        pieces.append(detok.push(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", ["你好，𠀀𠀁世界鿰！", "emoji 🦜🎉👨‍👩‍👧 done"])
def test_byte_fallback_characters_never_stream_broken(llama, text):
    ids = llama.encode(text, add_special_tokens=False)
    assert sum(i in BYTE_IDS for i in ids) >= 4  # the case under test really is exercised
    pieces = stream(llama, [], ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == llama.decode(ids) == text
    assert len([p for p in pieces if p]) > 3  # streamed as it goes, not all at the end


def test_sentencepiece_leading_space_matches_one_shot_decode(llama):
    prompt = llama.encode("[INST] Say hello [/INST]")
    ids = llama.encode("Hello there, world", add_special_tokens=False)
    # Without a prompt the first token's space is dropped, exactly as decode() drops it.
    assert "".join(stream(llama, [], ids)) == llama.decode(ids) == "Hello there, world"
    # After a prompt it is a real space between prompt and answer.
    assert "".join(stream(llama, prompt, ids)) == " Hello there, world"
    assert stream(llama, [1], ids)[:3] == ["Hello", " there", ","]


@pytest.mark.parametrize("tokenizer", ["llama", "byte_level"])
def test_any_split_of_the_ids_gives_the_one_shot_text(tokenizer, request):
    tok: Tokenizer = request.getfixturevalue(tokenizer)
    rng = random.Random(0)
    specials = sorted(tok.all_special_ids)
    for _ in range(150):
        text = rng.choice(UNICODE_TEXTS)
        cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
        # Encode in chunks with special tokens between some, and cut prompt/generation at a chunk edge.
        parts = []
        for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
            parts.append(tok.encode(text[start:end], add_special_tokens=False))
            if rng.random() < 0.3:
                parts.append([rng.choice(specials)])
        k = rng.randrange(len(parts) + 1)
        prompt, ids = sum(parts[:k], []), sum(parts[k:], [])
        skip = rng.random() < 0.5
        chunks = [rng.choice([1, 1, 1, 2, 3, 5]) for _ in ids]
        pieces = stream(tok, prompt, ids, chunks, skip_special_tokens=skip)
        whole = tok.decode(prompt + ids, skip_special_tokens=skip)
        prompt_text = tok.decode(prompt, skip_special_tokens=skip)
        assert whole.startswith(prompt_text)
        assert "".join(pieces) == whole[len(prompt_text) :]
        assert all("\ufffd" not in piece for piece in pieces)


def test_skip_special_tokens(llama):
    hi, there = (llama.encode(word, add_special_tokens=False) for word in ("Hi", "there"))
    ids = [*hi, 2, 1, *there]
    assert "".join(stream(llama, [1], ids)) == llama.decode(ids) == "Hi there"
    shown = "".join(stream(llama, [1], ids, skip_special_tokens=False))
    assert shown == llama.decode([1, *ids], skip_special_tokens=False)[len("<s>") :]
    assert "</s><s>" in shown


def test_all_ids_at_once(llama):
    ids = llama.encode(UNICODE_TEXTS[0], add_special_tokens=False)
    assert stream(llama, [1], ids, [len(ids)]) == [UNICODE_TEXTS[0], ""]


def test_invalid_bytes_still_stream(llama):
    # A model looping on a stray continuation byte: the U+FFFDs it makes must flow out as they come
    # rather than pile up in the window (which would also make every step slower).
    detok = IncrementalDetokenizer(llama, [1])
    emitted = "".join(detok.push([0x80 + 3]) for _ in range(100))
    assert len(emitted) >= 95
    assert emitted + detok.flush() == "\ufffd" * 100
