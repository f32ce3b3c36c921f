"""The backend switch: which attention function `--attention-backend` names on this host (see the package
docstring for the backends)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from xlkernels import BACKENDS
from xlkernels.shared_prefix import SharedPrefix
from xlkernels.xla_attention import paged_attention_xla


def paged_attention_pallas(
    q: jax.Array,  # [B, T, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, PS, D]
    v_pages: jax.Array,  # [Hkv, P, PS, D]
    block_tables: jax.Array,  # i32[B, pages_per_seq]
    q_positions: jax.Array,  # i32[B, T]
    kv_lens: jax.Array,  # i32[B]
    *,
    scale: float,
    shared: SharedPrefix | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, T, Hq, D] in q.dtype
    """Our Pallas kernels with the reference's contract; `interpret=True` runs them on CPU."""
    # Imported here so `import xlkernels` stays light and never touches the Triton lowering on CPU hosts.
    from xlkernels.pallas_decode import paged_decode_attention
    from xlkernels.pallas_prefill import paged_prefill_attention
    from xlkernels.pallas_shared_prefix import shared_prefix_decode_attention

    args = (q, k_pages, v_pages, block_tables, q_positions, kv_lens)
    if q.shape[1] > 1:
        return paged_prefill_attention(*args, scale=scale, interpret=interpret)
    if shared is not None:
        return shared_prefix_decode_attention(*args, shared, scale=scale, interpret=interpret)
    return paged_decode_attention(*args, scale=scale, interpret=interpret)


def resolve_backend(backend: str) -> str:
    """The concrete backend ("xla", "cpu", "pallas" or "pallas-interpret") that `backend` stands for here."""
    if backend == "auto":
        return {"gpu": "pallas", "cpu": "cpu"}.get(jax.default_backend(), "xla")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def is_pallas(backend: str) -> bool:
    """Whether `backend` runs our Pallas kernels here (natively or interpreted), e.g. to plan for them."""
    return resolve_backend(backend) in ("pallas", "pallas-interpret")


def get_paged_attention(backend: str = "xla", *, interpret: bool = False) -> Callable:
    """The paged attention function for `backend` (see `paged_attention_reference` for the contract).

    interpret: run the Pallas kernels in interpret mode (CPU tests); ignored by "xla", implied by
    "pallas-interpret".
    """
    resolved = resolve_backend(backend)
    if resolved == "xla":
        return paged_attention_xla
    if resolved == "cpu":
        from xlkernels.cpu_decode import paged_attention_cpu

        return paged_attention_cpu
    return functools.partial(paged_attention_pallas, interpret=interpret or resolved == "pallas-interpret")
