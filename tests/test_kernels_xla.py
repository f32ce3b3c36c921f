"""The XLA attention that reads the cache only up to the batch's longest context, against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlkernels import paged_attention_reference, paged_attention_xla
from xlkernels.xla_attention import CHUNK_TOKENS, chunk_pages, context_chunks

HEAD_DIM, PAGE_SIZE, PAGES_PER_SEQ = 16, 4, 12


def paged_batch(kv_lens: list[int], num_q: int, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0,
                head_dim: int = HEAD_DIM) -> dict:
    """A batch whose rows own shuffled pages holding random keys/values up to their kv_len; each row's last
    `num_q` positions are its queries (a decode step when num_q == 1, a prefill chunk otherwise)."""
    rng = np.random.default_rng(seed)
    batch, num_pages = len(kv_lens), len(kv_lens) * PAGES_PER_SEQ + 1
    tables = (1 + rng.permutation(num_pages - 1)).reshape(batch, PAGES_PER_SEQ).astype(np.int32)
    shape = (num_kv_heads, num_pages, PAGE_SIZE, head_dim)
    k_pages, v_pages = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    kv_lens = np.asarray(kv_lens, np.int32)
    positions = np.maximum(kv_lens[:, None] - num_q + np.arange(num_q)[None, :], 0).astype(np.int32)
    q = rng.standard_normal((batch, num_q, num_heads, head_dim)).astype(np.float32)
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, block_tables=tables, q_positions=positions, kv_lens=kv_lens)


def attend(fn, args: dict, **options) -> np.ndarray:
    return np.asarray(fn(*(jnp.asarray(a) for a in args.values()), scale=HEAD_DIM**-0.5, **options))


@pytest.mark.parametrize("chunk_tokens", [PAGE_SIZE, 3 * PAGE_SIZE, CHUNK_TOKENS])  # 1 page, 3 pages, the default
@pytest.mark.parametrize("num_q", [1, 5])
def test_matches_reference(chunk_tokens, num_q):
    # Ragged rows: inside the first page, on a page boundary, mid-table, and the whole table.
    args = paged_batch([3, 2 * PAGE_SIZE, 21, PAGES_PER_SEQ * PAGE_SIZE], num_q)
    want = attend(paged_attention_reference, args)
    got = attend(paged_attention_xla, args, chunk_tokens=chunk_tokens)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-5)


def test_grouped_query_heads_and_bf16():
    args = paged_batch([9, 30], 1, num_heads=8, num_kv_heads=1)
    args = {k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v) for k, v in args.items()}
    want = attend(paged_attention_reference, args).astype(np.float32)
    got = attend(paged_attention_xla, args, chunk_tokens=2 * PAGE_SIZE).astype(np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_block_table_width_read_follows_the_longest_context():
    tokens = 2 * PAGE_SIZE  # a chunk is two pages
    lens = lambda *n: jnp.asarray(n, jnp.int32)  # noqa: E731
    assert int(context_chunks(lens(1), tokens, 6)) == 1
    assert int(context_chunks(lens(tokens), tokens, 6)) == 1
    assert int(context_chunks(lens(3, tokens + 1), tokens, 6)) == 2  # the longest row sets the width
    assert int(context_chunks(lens(0, 0), tokens, 6)) == 0  # a batch of padding reads nothing
    assert int(context_chunks(lens(10**6), tokens, 6)) == 6  # never past the table
    assert chunk_pages(64) == CHUNK_TOKENS // 64 and chunk_pages(1024) == 1


def test_pages_past_the_longest_context_are_never_read():
    """Poison (NaN) every page a row owns past the chunks the batch's longest context spans: the
    reference, which reads the whole table, turns NaN; the bounded attention does not even see them."""
    chunk = 2 * PAGE_SIZE
    args = paged_batch([5, 13], 1)  # the longest context (13 tokens) spans chunks 0 and 1 = pages 0..3
    clean = attend(paged_attention_reference, args)
    for table in args["block_tables"]:
        for page in table[4:]:
            args["k_pages"][:, page] = args["v_pages"][:, page] = np.nan
    assert np.isnan(attend(paged_attention_reference, args)).all()
    np.testing.assert_allclose(attend(paged_attention_xla, args, chunk_tokens=chunk), clean, atol=2e-6, rtol=2e-5)


def test_padding_rows_and_an_all_padding_batch_stay_finite():
    args = paged_batch([0, 0], 1)
    assert np.array_equal(attend(paged_attention_xla, args), np.zeros_like(args["q"]))
    args = paged_batch([0, 17], 3)  # a padding row beside a real one
    want = attend(paged_attention_reference, args)
    np.testing.assert_allclose(attend(paged_attention_xla, args, chunk_tokens=PAGE_SIZE)[1], want[1], atol=2e-6,
                               rtol=2e-5)


def test_one_program_serves_every_context_length():
    fn = jax.jit(paged_attention_xla, static_argnames=("scale", "chunk_tokens"))
    for lens in ([1, 2], [40, 3], [PAGES_PER_SEQ * PAGE_SIZE, 7]):
        args = paged_batch(lens, 1)
        np.testing.assert_allclose(attend(fn, args, chunk_tokens=PAGE_SIZE), attend(paged_attention_reference, args),
                                   atol=2e-6, rtol=2e-5)
    assert fn._cache_size() == 1
