"""Host-side bookkeeping of KV pages: reference counts, a free list, and a cache of full pages by content.

Page 0 is never handed out: padding rows of a batch point their block tables at it, so a stray read
lands on harmless data and writes from padding are dropped before they reach any page. Reference
counts let several sequences share a page and make a double free loud.

Prefix caching. A page full of keys/values is a pure function of the tokens up to its end, so it is
named by a key chained over the pages before it (`page_hash.page_key`). A registered page that
drops to zero references is not freed but *cached*: it keeps its keys/values and its name, and a
later prompt that starts with the same tokens takes a reference on it instead of computing it again.
Cached pages are evicted least-recently-released first, and only when `allocate` finds no free page.
A key is a Python hash, so two contents could share one; each cached page therefore also remembers
its parent key and its tokens, and a lookup that does not match them exactly is a miss. Reuse is exact.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for an allocation; the scheduler preempts or waits."""


@dataclass(frozen=True)
class PageContent:
    """What a registered page holds: its tokens, after the prefix named `parent`."""

    parent: int
    tokens: tuple[int, ...]


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the cache needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first
        self._by_key: dict[int, int] = {}  # key -> the registered page holding that content
        self._content: dict[int, tuple[int, PageContent]] = {}  # registered page -> (its key, its content)
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced registered pages, oldest first

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: free ones, and cached ones it would evict."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Unreferenced pages kept for their contents."""
        return len(self._cached)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        """Pages some sequence or session holds a reference on."""
        return self.num_usable - self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfPages(f"need {count} pages, {self.num_free} free")
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently released cached page
                page, _ = self._cached.popitem(last=False)
                self._forget(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        """Take another reference on pages in use or cached."""
        for page in pages:
            if self._refs[page] <= 0 and page not in self._cached:
                raise ValueError(f"page {page} is neither in use nor cached")
            self._cached.pop(page, None)
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page; at zero a registered page is cached, any other freed.

        Release a sequence's pages last-first: the tail of a prefix is then evicted before its head,
        which more prompts share.
        """
        for page in pages:
            if page == NULL_PAGE or self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._content:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    # ----- prefix caching -----------------------------------------------------------------------------
    def register(self, page: int, key: int, content: PageContent) -> None:
        """Name an in-use page that now holds `content` in full. A key already naming another page
        keeps it (the same tokens computed twice): this page stays anonymous and is freed as usual."""
        if self._refs[page] <= 0:
            raise ValueError(f"page {page} is not in use")
        if key not in self._by_key and page not in self._content:
            self._by_key[key] = page
            self._content[page] = (key, content)

    def lookup(self, key: int, content: PageContent) -> int | None:
        """The page registered with exactly this content, if any (in use or cached)."""
        page = self._by_key.get(key)
        if page is None or self._content[page][1] != content:
            return None
        return page

    def _forget(self, page: int) -> None:
        key, _ = self._content.pop(page)
        del self._by_key[key]
