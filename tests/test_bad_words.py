"""The bad-words automaton against the rule it implements, checked by brute force: a token is allowed
exactly when appending it completes none of the banned sequences; the end tokens always are."""

from __future__ import annotations

import numpy as np

from serving.text.bad_words import bad_words_automaton

VOCAB = 12
END = frozenset({11})


def completes_one(tokens: list[int], banned: list[tuple[int, ...]]) -> bool:
    return any(len(b) <= len(tokens) and tuple(tokens[len(tokens) - len(b):]) == b for b in banned)


def test_the_automaton_allows_exactly_the_tokens_that_complete_no_banned_sequence() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        count = rng.integers(1, 6)
        banned = sorted({tuple(rng.integers(0, 6, size=rng.integers(2, 5)).tolist()) for _ in range(count)})
        automaton = bad_words_automaton(banned, VOCAB, END, f"trial-{trial}")
        tokens: list[int] = []
        state = automaton.initial
        for _ in range(40):
            allowed = [t for t in range(VOCAB) if automaton.transitions[state, automaton.token_class[t]] >= 0]
            want = [t for t in range(VOCAB) if t in END or not completes_one(tokens + [t], banned)]
            assert allowed == want, (banned, tokens)
            token = int(rng.choice([t for t in allowed if t not in END]))
            tokens.append(token)
            state = int(automaton.transitions[state, automaton.token_class[token]])
            assert state == automaton.walk(tokens)  # what the engine recomputes after a preemption


def test_an_overlapping_ban_is_caught_through_the_failure_links() -> None:
    """Banning (1, 2, 3) and (2, 4): after 1, 2 the automaton must still see the 2 that begins (2, 4)."""
    automaton = bad_words_automaton([(1, 2, 3), (2, 4)], VOCAB, END, "overlap")
    state = automaton.walk([1, 2])
    assert automaton.transitions[state, automaton.token_class[4]] == -1
    assert automaton.transitions[state, automaton.token_class[3]] == -1
    assert automaton.transitions[state, automaton.token_class[5]] >= 0
