"""OutputProcessor: engine outputs to text deltas, with stop strings, token counts and finish reasons."""

from __future__ import annotations

import pytest

from serving.request import EngineOutput, FinishReason, GenerationConfig
from serving.text.output import OutputProcessor, TextDelta
from serving.text.tokenizer import Tokenizer

EOS = 2


@pytest.fixture(scope="module")
def llama(sentencepiece_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(str(sentencepiece_dir))


def run(tok: Tokenizer, ids: list[int], config: GenerationConfig, per_output: int = 1,
        finish: FinishReason = FinishReason.LENGTH) -> list[TextDelta]:
    """Feed `ids` as engine outputs of `per_output` tokens, the last one finished, until a finished delta."""
    processor = OutputProcessor(tok, tok.encode("Q:"), config)
    deltas = []
    for start in range(0, len(ids), per_output):
        last = start + per_output >= len(ids)
        out = EngineOutput("r", ids[start : start + per_output], finished=last,
                           finish_reason=finish if last else None)
        deltas.append(processor.process(out))
        if deltas[-1].finished:
            break
    return deltas


def completing_token(tok: Tokenizer, ids: list[int], stop: str) -> int:
    """How many tokens it takes until `stop` appears in the text."""
    return next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))


@pytest.mark.parametrize("per_output", [1, 3, 100])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(llama, per_output, include):
    ids = llama.encode("The answer is 42. Done deal. More text follows", add_special_tokens=False)
    stop = "42. Done"  # spans four tokens: "4", "2", ".", "▁Done"
    k = completing_token(llama, ids, stop)
    config = GenerationConfig(stop_words=[stop], include_stop_str_in_output=include)
    deltas = run(llama, ids, config, per_output)
    final = deltas[-1]
    assert final.finished and final.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == (" The answer is 42. Done" if include else " The answer is ")
    # Tokens after the one that completed the stop string are neither returned nor counted.
    assert sum((d.token_ids for d in deltas), []) == ids[:k]
    assert final.num_completion_tokens == k


def test_shorter_stop_that_prefixes_a_longer_one_wins(llama):
    ids = llama.encode("one two three four", add_special_tokens=False)
    config = GenerationConfig(stop_words=["two three", "two"])
    deltas = run(llama, ids, config)
    assert "".join(d.text for d in deltas) == " one "
    assert deltas[-1].num_completion_tokens == completing_token(llama, ids, "two")


def test_stop_string_inside_a_byte_fallback_character_run(llama):
    ids = llama.encode("look 🦜🎉 here", add_special_tokens=False)
    deltas = run(llama, ids, GenerationConfig(stop_words=["🎉"]))
    assert "".join(d.text for d in deltas) == " look 🦜"
    assert deltas[-1].num_completion_tokens == completing_token(llama, ids, "🎉")


def test_length_finish_releases_a_held_partial_stop(llama):
    ids = llama.encode("The end. Do", add_special_tokens=False)
    deltas = run(llama, ids, GenerationConfig(stop_words=["Done"]))
    assert [d.finished for d in deltas] == [False] * (len(ids) - 1) + [True]
    assert "".join(d.text for d in deltas) == " The end. Do"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].num_completion_tokens == len(ids)


def test_eos_is_counted_but_not_shown(llama):
    ids = [*llama.encode("Bye", add_special_tokens=False), EOS]
    deltas = run(llama, ids, GenerationConfig(skip_special_tokens=False), finish=FinishReason.STOP)
    assert "".join(d.text for d in deltas) == " Bye"
    assert deltas[-1].token_ids == [EOS]
    assert deltas[-1].num_completion_tokens == len(ids)
    assert deltas[-1].finish_reason == "stop"


def test_stop_token_id_text_is_left_out_unless_asked_for(llama):
    ids = llama.encode("Stop here!", add_special_tokens=False)  # "!" plays a stop_token_ids entry
    config = GenerationConfig(stop_token_ids=[ids[-1]])
    plain = run(llama, ids, config, per_output=2, finish=FinishReason.STOP)
    assert "".join(d.text for d in plain) == " Stop here"
    assert plain[-1].num_completion_tokens == len(ids)
    shown = run(llama, ids, GenerationConfig(stop_token_ids=[ids[-1]], include_stop_str_in_output=True),
                finish=FinishReason.STOP)
    assert "".join(d.text for d in shown) == " Stop here!"


@pytest.mark.parametrize("reason", [FinishReason.ABORT, FinishReason.ERROR, FinishReason.LENGTH])
def test_finish_reasons_pass_through(llama, reason):
    ids = llama.encode("partial 🦜", add_special_tokens=False)
    deltas = run(llama, ids, GenerationConfig(), per_output=2, finish=reason)
    assert deltas[-1].finish_reason == reason.value
    assert "".join(d.text for d in deltas) == " partial 🦜"


def test_outputs_after_a_stop_string_change_nothing(llama):
    processor = OutputProcessor(llama, [1], GenerationConfig(stop_words=["b"]))
    first = processor.process(EngineOutput("r", llama.encode("a b c", add_special_tokens=False)))
    assert (first.text, first.finished, first.finish_reason) == ("a ", True, "stop")
    # The engine's answer to the caller's abort, then a straggler: empty, still "stop", same count.
    for late in (EngineOutput("r", [], True, FinishReason.ABORT), EngineOutput("r", [29871])):
        assert processor.process(late) == TextDelta("", [], True, "stop", first.num_completion_tokens)


def test_skip_special_tokens_option(llama):
    ids = [*llama.encode("a", add_special_tokens=False), 1, *llama.encode("b", add_special_tokens=False)]
    hidden = run(llama, ids, GenerationConfig())
    shown = run(llama, ids, GenerationConfig(skip_special_tokens=False))
    assert "".join(d.text for d in hidden) == " a b"
    assert "".join(d.text for d in shown) == " a<s> b"


def test_cached_token_count_is_carried_to_the_end(llama):
    processor = OutputProcessor(llama, [1], GenerationConfig())
    ids = llama.encode("a b", add_special_tokens=False)
    assert processor.process(EngineOutput("r", ids[:1], num_cached_tokens=48)).num_cached_tokens == 48
    last = processor.process(EngineOutput("r", ids[1:], True, FinishReason.LENGTH))
    assert (last.finished, last.num_cached_tokens) == (True, 48)
