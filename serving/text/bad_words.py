"""`bad_words`: words the answer must not contain, as vLLM bans them (each word as it starts a text and
after a space, in generated tokens).

A spelling that is one token is banned outright (a column of the sampler's bias table,
`GenerationConfig.bad_token_ids`). A spelling of several tokens is banned where it would be completed:
its last token is not allowed right after the others. That is a regular constraint over tokens, so it runs
as a `TokenAutomaton` on the device like a structured-output one (`serving.engine.guided`), with no host
round trip: an Aho-Corasick automaton over the banned token sequences, whose state is the longest suffix
of the tokens so far that begins one of them, and in which the token completing a sequence has no
transition. Every state is final: the request's end tokens are allowed anywhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from serving.request import TokenAutomaton
from serving.text.tokenizer import Tokenizer


def bad_word_spellings(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[list[int], list[tuple[int, ...]]]:
    """The token ids of the one-token spellings of `words`, and the spellings of several tokens."""
    single: set[int] = set()
    several: set[tuple[int, ...]] = set()
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if len(ids) == 1:
                single.add(ids[0])
            elif ids:
                several.add(ids)
    return sorted(single), sorted(several)


def bad_words_automaton(sequences: Sequence[Sequence[int]], vocab_size: int, end_ids: frozenset[int],
                        key: str) -> TokenAutomaton:
    """The automaton that allows every token sequence in which none of `sequences` occurs."""
    children: list[dict[int, int]] = [{}]
    completes = [False]  # a node that is a whole banned sequence
    for sequence in sequences:
        node = 0
        for token in sequence:
            if token not in children[node]:
                children[node][token] = len(children)
                children.append({})
                completes.append(False)
            node = children[node][token]
        completes[node] = True
    symbols = sorted({token for sequence in sequences for token in sequence} - set(end_ids))
    column = {token: i + 1 for i, token in enumerate(symbols)}  # 0: every other token; last: the end tokens
    table = np.zeros((len(children), len(symbols) + 2), np.int32)  # any other token returns to the root
    fail = [0] * len(children)
    queue = deque([0])
    while queue:  # breadth first, so a node's failure link is complete before its children need it
        node = queue.popleft()
        completes[node] = completes[node] or completes[fail[node]]
        for token in symbols:
            child = children[node].get(token)
            if child is None:
                table[node, column[token]] = 0 if node == 0 else table[fail[node], column[token]]
                continue
            fail[child] = 0 if node == 0 else int(table[fail[node], column[token]])
            table[node, column[token]] = child
            queue.append(child)
    banned = np.array(completes)
    table[:, 1:-1] = np.where(banned[table[:, 1:-1]], -1, table[:, 1:-1])
    table[:, -1] = np.arange(len(children))  # an end token ends the answer wherever it is
    token_class = np.zeros(vocab_size, np.int32)
    token_class[symbols] = np.arange(1, len(symbols) + 1)
    token_class[sorted(end_ids)] = len(symbols) + 1
    return TokenAutomaton(key, token_class, table, 0)
