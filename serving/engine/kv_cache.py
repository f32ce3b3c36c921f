"""The KV cache manager: which pages a sequence holds, which it may take from the prefix cache, and which
an interactive session keeps between its turns. The scheduler decides policy (who runs, who is
preempted); this module does the page arithmetic underneath, over the `PageAllocator` (`pages`).

Prefix caching. A sequence that starts (or restarts after preemption) first takes the cached pages of
the longest cached prefix of its tokens (`get_computed`) and computes only the rest; at least one
token is always computed, since its logits are what the first sample needs. Pages are registered
(`commit`) once the step that filled them has been read back, so a page whose step failed is never
shared. A request with a repetition penalty computes its whole prompt (the penalty's seen-tokens table
is filled by the tokens a step processes), but still registers its pages for others.

Sessions (`/v1/chat/interactive`): when a sequence with a `session_id` is freed, its registered pages
stay referenced ("pinned") under that id until the session's next turn is freed, the session ends, or
pages run short: then the least recently pinned session is unpinned before the scheduler has to preempt
anything, and its next turn recomputes whatever was evicted meanwhile.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from serving.engine.page_hash import ROOT_KEY, page_key
from serving.engine.pages import OutOfPages, PageAllocator, PageContent


@dataclass(eq=False)
class SeqPages:
    """One sequence's hold on the cache: its pages, and the prefix-cache names of its full pages so far.
    Owned by `KVCacheManager`; the scheduler reads `pages` only to hand them to the runner."""

    pages: list[int] = field(default_factory=list)
    # (key, content) of its full pages, in order: named once, however often they are looked up.
    names: list[tuple[int, PageContent]] = field(default_factory=list)
    num_registered: int = 0  # leading pages registered in (or taken from) the prefix cache


class KVCacheManager:
    def __init__(self, allocator: PageAllocator, page_size: int, prefix_caching: bool = True):
        self.allocator = allocator
        self.page_size = page_size
        self.prefix_caching = prefix_caching  # off: only sessions use the cache, for their own history
        self.pins: OrderedDict[str, list[int]] = OrderedDict()  # session id -> its pinned pages, oldest first

    def get_computed(self, held: SeqPages, token_ids: list[int], session_id: str | None,
                     may_reuse: bool = True) -> int:
        """Give a sequence that holds no pages the cached pages of the longest cached prefix of its
        tokens (all but the last, which must be computed); returns how many tokens they hold."""
        if not may_reuse or not self._uses_cache(session_id):
            return 0
        pages = self._cached_prefix(held, token_ids, (len(token_ids) - 1) // self.page_size)
        if pages:
            self.allocator.share(pages)
            held.pages = pages
            held.num_registered = len(pages)
        return len(pages) * self.page_size

    def allocate(self, held: SeqPages, num_tokens: int) -> bool:
        """Make `held` hold pages for `num_tokens` tokens in all, unpinning idle sessions' pages if need
        be; False when there are still not enough (the scheduler then preempts or waits)."""
        needed = -(-num_tokens // self.page_size) - len(held.pages)
        if needed <= 0:
            return True
        while True:
            try:
                held.pages.extend(self.allocator.allocate(needed))
                return True
            except OutOfPages:
                if not self.pins:
                    return False
                self.end_session(next(iter(self.pins)))  # the least recently pinned gives way

    def commit(self, held: SeqPages, token_ids: list[int], num_tokens: int, session_id: str | None) -> None:
        """Register the pages filled by a read-back step, which computed the first `num_tokens` tokens."""
        full = min(num_tokens, len(token_ids)) // self.page_size
        if full <= held.num_registered or not self._uses_cache(session_id):
            return  # no page filled up: the common case, once per decoding sequence per step
        for index in range(held.num_registered, full):
            key, content = self._page_name(held, token_ids, index)
            self.allocator.register(held.pages[index], key, content)
        held.num_registered = full

    def free(self, held: SeqPages, token_ids: list[int], pin_session: str | None = None) -> None:
        """Give back every page, tail first (evicted before the shared head). With `pin_session`, the
        registered prefix stays pinned under that session first (else its previous pin stays)."""
        if pin_session is not None and held.num_registered:
            self._pin(pin_session, self._cached_prefix(held, token_ids, held.num_registered))
        if held.pages:
            self.allocator.release(held.pages[::-1])
        held.pages = []
        held.num_registered = 0

    def end_session(self, session_id: str) -> None:
        """Unpin a session's pages: they stay cached until evicted."""
        pages = self.pins.pop(session_id, None)
        if pages:
            self.allocator.release(pages[::-1])

    def _cached_prefix(self, held: SeqPages, token_ids: list[int], max_pages: int) -> list[int]:
        """The cached pages holding the longest prefix of the first `max_pages` full pages of `token_ids`."""
        pages = []
        for index in range(max_pages):
            page = self.allocator.lookup(*self._page_name(held, token_ids, index))
            if page is None:
                break
            pages.append(page)
        return pages

    def _page_name(self, held: SeqPages, token_ids: list[int], index: int) -> tuple[int, PageContent]:
        """Key and content of full page `index` (its tokens must be known; pages are named in order)."""
        if index == len(held.names):
            start = index * self.page_size
            tokens = tuple(token_ids[start : start + self.page_size])
            parent = held.names[-1][0] if index else ROOT_KEY
            held.names.append((page_key(parent, tokens), PageContent(parent, tokens)))
        return held.names[index]

    def _uses_cache(self, session_id: str | None) -> bool:
        return self.prefix_caching or session_id is not None

    def _pin(self, session_id: str, pages: list[int]) -> None:
        self.allocator.share(pages)  # before the old pin goes, so pages in both are never evicted
        self.end_session(session_id)
        self.pins[session_id] = pages
