"""The XLA paged-attention reference against plain causal attention over contiguous keys/values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from xlkernels import get_paged_attention, paged_attention_reference, paged_attention_xla, write_kv_pages


def dense_attention(q, k, v, q_pos, kv_len, scale):
    """Causal attention for one row: q [T, Hq, D], k/v [S, Hkv, D] contiguous (numpy, f64)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) * scale
    mask = (np.arange(k.shape[0])[None, :] <= q_pos[:, None]) & (np.arange(k.shape[0])[None, :] < kv_len)
    scores = np.where(mask[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("num_q", [1, 5])
def test_paged_attention_matches_dense(num_heads, num_kv_heads, num_q):
    rng = np.random.default_rng(0)
    head_dim, page_size, num_pages, pages_per_seq = 16, 4, 32, 6
    starts = np.array([0, 3, 9, 17])  # ragged: rows begin mid-page and span page boundaries
    batch = len(starts)
    k_pages = np.zeros((num_kv_heads, num_pages, page_size, head_dim), np.float32)
    v_pages = np.zeros_like(k_pages)
    # Each row owns a shuffled, non-contiguous set of pages.
    tables = rng.permutation(np.arange(1, num_pages))[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    q = rng.standard_normal((batch, num_q, num_heads, head_dim)).astype(np.float32)
    positions = starts[:, None] + np.arange(num_q)[None, :]
    kv_lens = starts + num_q
    contexts = []
    for b in range(batch):
        k = rng.standard_normal((kv_lens[b], num_kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((kv_lens[b], num_kv_heads, head_dim)).astype(np.float32)
        for pos in range(kv_lens[b]):
            page, off = tables[b, pos // page_size], pos % page_size
            k_pages[:, page, off], v_pages[:, page, off] = k[pos], v[pos]
        contexts.append((k, v))

    out = paged_attention_reference(
        jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables, jnp.int32),
        jnp.asarray(positions, jnp.int32), jnp.asarray(kv_lens, jnp.int32), scale=head_dim**-0.5,
    )
    for b, (k, v) in enumerate(contexts):
        want = dense_attention(q[b].astype(np.float64), k, v, positions[b], kv_lens[b], head_dim**-0.5)
        np.testing.assert_allclose(np.asarray(out[b]), want, atol=2e-5, rtol=2e-5)


def test_write_kv_pages_scatters_valid_tokens_and_drops_padding():
    num_kv_heads, num_pages, page_size, head_dim = 2, 8, 4, 3
    k_pages = jnp.zeros((num_kv_heads, num_pages, page_size, head_dim))
    v_pages = jnp.zeros_like(k_pages)
    tables = jnp.asarray([[5, 2, 0], [7, 0, 0]], jnp.int32)
    positions = jnp.asarray([[3, 4, 5], [0, 1, 2]], jnp.int32)
    valid = jnp.asarray([[True, True, True], [True, False, False]])
    k = jnp.arange(2 * 3 * num_kv_heads * head_dim, dtype=jnp.float32).reshape(2, 3, num_kv_heads, head_dim) + 1
    new_k, new_v = write_kv_pages(k_pages, v_pages, k, -k, tables, positions, valid)
    np.testing.assert_array_equal(new_k[:, 5, 3], k[0, 0])  # position 3 -> page 5, offset 3
    np.testing.assert_array_equal(new_k[:, 2, 0], k[0, 1])  # position 4 -> second page, offset 0
    np.testing.assert_array_equal(new_k[:, 2, 1], k[0, 2])
    np.testing.assert_array_equal(new_v[:, 7, 0], -k[1, 0])
    written = np.zeros((num_pages, page_size), bool)
    written[5, 3] = written[2, 0] = written[2, 1] = written[7, 0] = True
    assert not np.asarray(new_k)[:, ~written].any(), "padding tokens must never be written"


def test_backend_switch():
    assert get_paged_attention("xla") is paged_attention_xla
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_paged_attention("cuda-magic")
