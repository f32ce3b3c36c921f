"""Host-side bookkeeping of KV pages: a free list with reference counts.

Page 0 is never handed out: padding rows of a batch point their block tables at it, so a stray read
lands on harmless data and writes from padding are dropped before they reach any page. Reference
counts let several sequences share a page later (prefix caching) and make a double free loud.
"""

from __future__ import annotations

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for an allocation; the scheduler preempts or waits."""


class PageAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the cache needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(f"need {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Take another reference on pages already in use."""
        for page in pages:
            if self._refs[page] <= 0:
                raise ValueError(f"page {page} is not in use")
            self._refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page; a page returns to the free list at zero."""
        for page in pages:
            if page == NULL_PAGE or self._refs[page] <= 0:
                raise ValueError(f"page {page} released more often than taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)
