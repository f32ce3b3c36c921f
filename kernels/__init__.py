"""Attention kernels over the paged KV cache, behind one backend switch.

`backend="xla"` is the portable reference (CPU, tests, any GPU); GPU kernels plug in beside it with
the same signatures. Nothing here imports `model` or `serving`: a kernel is usable on its own.
"""

from __future__ import annotations

from collections.abc import Callable

from kernels.paged_attention import paged_attention_reference, write_kv_pages

BACKENDS = ("xla",)


def get_paged_attention(backend: str = "xla") -> Callable:
    """The paged attention function for `backend` (see `paged_attention_reference` for the contract)."""
    if backend == "xla":
        return paged_attention_reference
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "get_paged_attention", "paged_attention_reference", "write_kv_pages"]
