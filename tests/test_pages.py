"""The host-side page allocator: the null page is never handed out, counts are exact, misuse is loud."""

from __future__ import annotations

import pytest

from serving.engine.pages import NULL_PAGE, OutOfPages, PageAllocator


def test_allocate_share_release_round_trip():
    pages = PageAllocator(5)
    assert pages.num_usable == 4 and pages.num_free == 4
    first = pages.allocate(3)
    assert NULL_PAGE not in first and len(set(first)) == 3 and pages.num_used == 3
    pages.share(first[:1])
    pages.release(first)
    assert pages.num_used == 1, "a shared page stays in use until its last reference goes"
    pages.release(first[:1])
    assert pages.num_free == 4


def test_out_of_pages_and_double_free_are_errors():
    pages = PageAllocator(3)
    taken = pages.allocate(2)
    with pytest.raises(OutOfPages):
        pages.allocate(1)
    pages.release(taken)
    with pytest.raises(ValueError, match="released more often"):
        pages.release(taken[:1])
    with pytest.raises(ValueError, match="neither in use nor cached"):
        pages.share(taken[:1])
    with pytest.raises(ValueError):
        PageAllocator(1)
