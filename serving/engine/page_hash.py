"""How a full KV page is named in the prefix cache: a key chained over its tokens and the pages before it.

A page full of keys/values is a pure function of every token up to its end, so its name is
`page_key(parent, tokens)`, where `parent` names the pages before it (`ROOT_KEY` for the first). The
engine's KV-cache manager (`kv_cache.py`) names pages with it, and the proxy's cache-aware routing names
the pages of a request's prompt with the same function, so both agree on what "the same prefix" is. This module
imports nothing, so the proxy can use it without pulling in the engine or JAX.

Keys are Python hashes of tuples of ints, which do not depend on PYTHONHASHSEED: two processes (the
proxy and an engine, or two engines) name the same tokens alike. Two contents may still share a key,
so the engine checks a page's content before reusing it (`pages.PageAllocator.lookup`).
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT_KEY = 0  # the parent key of a sequence's first page


def page_key(parent: int, tokens: tuple[int, ...]) -> int:
    """The name of a full page holding `tokens` after the pages named up to `parent`."""
    return hash((parent, tokens))


def page_keys(items: Sequence[int], page_size: int) -> list[int]:
    """The chained names of the full pages of `items` (a partial last page has none)."""
    keys: list[int] = []
    parent = ROOT_KEY
    for start in range(0, len(items) - page_size + 1, page_size):
        parent = page_key(parent, tuple(items[start : start + page_size]))
        keys.append(parent)
    return keys
