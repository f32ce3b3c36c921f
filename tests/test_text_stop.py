"""Stop strings matched on streamed text, independent of how the text is cut into pieces."""

from __future__ import annotations

import random

import pytest

from serving.text.stop import StopStringMatcher


def run(stop_words: list[str], pieces: list[str], include: bool = False) -> tuple[list[str], bool]:
    """Feed pieces until a stop; return what was emitted per push (plus the flush) and whether it stopped."""
    matcher = StopStringMatcher(stop_words, include_stop_str=include)
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_across_pieces_is_held_back_then_cut():
    out, stopped = run(["STOP"], ["Hel", "lo ST", "OP now"])
    assert stopped
    assert out == ["Hel", "lo ", ""]  # "ST" was held back until it turned out to be a stop string


def test_include_stop_string():
    out, stopped = run(["STOP"], ["Hello ST", "OP now"], include=True)
    assert stopped and "".join(out) == "Hello STOP"


def test_held_tail_is_released_when_it_is_not_a_stop():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("ART") == ("START", False)
    assert matcher.push("S") == ("", False)
    assert matcher.flush() == "S"


def test_one_stop_string_a_prefix_of_another():
    # "Hello" completes first, so it wins even though "Hello world" is also present.
    assert run(["Hello world", "Hello"], ["say Hello world"]) == (["say "], True)
    assert run(["Hello world", "Hello"], ["say Hel", "lo world"], include=True) == (["say ", "Hello"], True)
    # While only a prefix of the longer one is present, its tail is held; it is released at the end.
    assert run(["Hello world", "Hello"], ["say Hello wor"])[0] == ["say "]
    assert run(["Hello world!"], ["say Hello wor"]) == (["say ", "Hello wor"], False)


def test_earliest_completed_stop_wins():
    # "y" is complete before "xyz" is, whatever the split.
    for pieces in (["xyz"], ["x", "yz"], ["xy", "z"]):
        assert "".join(run(["xyz", "y"], pieces)[0]) == "x"
    # Completed at the same character: the longer one.
    assert run(["bc", "abc"], ["zabc"]) == (["z"], True)


def test_nothing_after_a_stop():
    matcher = StopStringMatcher(["."])
    assert matcher.push("a.b") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_words_pass_everything_through():
    assert run([], ["a", "b"]) == (["a", "b", ""], False)


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("include", [False, True])
def test_result_does_not_depend_on_the_split(include):
    rng = random.Random(1)
    alphabet = "ab \n你🦜"
    long_stop = "ab" * 100  # any length works
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 250)))
        short = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(3)]
        stops = [*short[: rng.randrange(1, 4)], long_stop]
        whole, whole_stopped = run(stops, [text], include)
        cuts = sorted(rng.sample(range(1, len(text) + 1), min(len(text), rng.randrange(1, 20))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if a < b]
        split, split_stopped = run(stops, pieces, include)
        assert ("".join(split), split_stopped) == ("".join(whole), whole_stopped)
        if not include:
            assert not any(stop in "".join(split) for stop in stops)
