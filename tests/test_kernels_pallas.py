"""Our Pallas attention kernels (interpret mode on CPU) against the XLA paged-attention reference.

Shapes are small because interpret mode compiles each case (about 1-2 s apiece). Every case uses
scattered, shuffled pages from a pool filled with random data everywhere, so a kernel that reads a
page or a slot it should not (past kv_len, past the causal limit, a stale table entry) gets a wrong
answer rather than a lucky zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlkernels import get_paged_attention, paged_attention_reference, paged_attention_xla, resolve_backend
from xlkernels.kv_quant import quantize_pages
from xlkernels.pallas_decode import merge_splits, merge_splits_pallas, paged_decode_attention
from xlkernels.pallas_prefill import paged_prefill_attention
from xlkernels.pallas_rms_norm import add_rms_norm_pallas
from xlkernels.pallas_rope_kv import rope_write_pallas
from xlkernels.pallas_shared_prefix import shared_prefix_decode_attention
from xlkernels.rms_norm import add_rms_norm_reference
from xlkernels.rope_kv import rope_write_reference
from xlkernels.shared_prefix import SharedPrefix, plan_shared_prefix

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_problem(
    seed: int,
    *,
    starts: list[int],  # cached tokens before this step, per row; -1 marks a padding row
    num_q: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    dtype: jnp.dtype,
) -> tuple[tuple[jax.Array, ...], np.ndarray]:
    """Random (q, k_pages, v_pages, block_tables, q_positions, kv_lens) and a bool[B] of real rows."""
    rng = np.random.default_rng(seed)
    batch = len(starts)
    num_pages = batch * pages_per_seq + 3
    q = rng.standard_normal((batch, num_q, num_heads, head_dim))
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    # Every row owns distinct, shuffled pages; page 0 stays the padding rows' null page.
    tables = rng.permutation(np.arange(1, num_pages))[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    real = np.asarray(starts) >= 0
    tables[~real] = 0
    positions = np.maximum(np.asarray(starts), 0)[:, None] + np.arange(num_q)[None, :]
    kv_lens = np.where(real, positions[:, -1] + 1, 0)
    assert (kv_lens <= pages_per_seq * page_size).all()
    arrays = (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(tables, jnp.int32),
        jnp.asarray(positions, jnp.int32),
        jnp.asarray(kv_lens, jnp.int32),
    )
    return arrays, real


def reference_f32(args: tuple[jax.Array, ...], scale: float) -> np.ndarray:
    """The reference on f32 copies: a sharper oracle than bf16, and XLA:CPU lacks bf16 x bf16 -> f32
    batched dots (the reference itself fails on CPU for bf16 with G > 1)."""
    q, k_pages, v_pages, tables, positions, kv_lens = args
    f32 = jnp.float32
    out = paged_attention_reference(
        q.astype(f32), k_pages.astype(f32), v_pages.astype(f32), tables, positions, kv_lens, scale=scale
    )
    return np.asarray(out)


def check(out: jax.Array, args: tuple[jax.Array, ...], real: np.ndarray, dtype: jnp.dtype) -> None:
    head_dim = args[0].shape[-1]
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    got = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(got).all(), "padding rows and empty splits must not produce NaN/inf"
    want = reference_f32(args, head_dim**-0.5)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)


# (starts, num_heads, num_kv_heads, head_dim, page_size, pages_per_seq, dtype, tunables)
# starts are the cached tokens before the new one, so kv_len = start + 1: 1 token, exactly one and two
# full pages (page boundaries), mid-page lengths, a full table, and padding rows (-1). GQA 1, 2, 4, 8
# and 7 (not a power of two). Several splits, some empty, exercise the merge; in the last case a
# 6-page row over 2 splits of 2-page blocks checks the share's rounding to whole blocks.
DECODE_CASES = [
    ([0, 7, 22, -1], 4, 4, 64, 8, 4, jnp.float32, {}),  # GQA 1; lens 1, 8 (= page), 23
    ([15, 0, 44, -1], 8, 4, 128, 16, 4, jnp.bfloat16, {"k_splits": 1}),  # GQA 2; 16 = page; no merge
    ([31, 2, 9], 16, 4, 64, 8, 8, jnp.float32, {"k_splits": 4, "pages_per_block": 2}),
    ([63, 16, -1], 16, 2, 128, 16, 4, jnp.bfloat16, {"k_splits": 8}),  # GQA 8
    ([5, 40], 7, 1, 64, 8, 6, jnp.float32, {"pages_per_block": 2, "k_splits": 2}),
]


def check_kernel(kernel, seed, starts, num_q, num_heads, num_kv_heads, head_dim, page_size, pps, dtype, tunables):
    """Run a Pallas kernel in interpret mode on a random problem and compare it with the XLA reference."""
    args, real = make_problem(seed, starts=starts, num_q=num_q, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, page_size=page_size, pages_per_seq=pps, dtype=dtype)
    check(kernel(*args, scale=head_dim**-0.5, interpret=True, **tunables), args, real, dtype)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"G{c[1] // c[2]}-D{c[3]}-{c[6].__name__}")
def test_decode_kernel_matches_reference(case):
    starts, *shape, tunables = case
    check_kernel(paged_decode_attention, 0, starts, 1, *shape, tunables)


def test_decode_kernel_honours_query_position():
    """A query at position p sees keys 0..p even when kv_len runs further (the contract's causal part)."""
    args, real = make_problem(
        1,
        starts=[20, 9],
        num_q=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        page_size=8,
        pages_per_seq=4,
        dtype=jnp.float32,
    )
    q, k_pages, v_pages, tables, positions, kv_lens = args
    args = (q, k_pages, v_pages, tables, positions - jnp.asarray([[5], [0]], jnp.int32), kv_lens)
    out = paged_decode_attention(*args, scale=64**-0.5, interpret=True, k_splits=2)
    check(out, args, real, jnp.float32)


def test_merge_splits_ignores_empty_splits():
    o = np.random.default_rng(2).standard_normal((1, 1, 3, 2, 4)).astype(np.float32)
    o[0, 0, 1] = np.nan  # an empty split never writes its output: whatever is there must not leak
    o[0, 0, :, 1] = np.nan
    o = jnp.asarray(o)
    l = jnp.asarray([[[[2.0, 0.0], [0.0, 0.0], [6.0, 0.0]]]])  # split 1 empty; head 1 all empty
    m = jnp.asarray([[[[1.0, -1e30], [-1e30, -1e30], [0.0, -1e30]]]])
    out = np.asarray(merge_splits(o, l, m))
    w0, w2 = 2.0 * 2.0**1.0, 6.0
    np.testing.assert_allclose(out[0, 0, 0], (w0 * o[0, 0, 0, 0] + w2 * o[0, 0, 2, 0]) / (w0 + w2), rtol=1e-6)
    np.testing.assert_array_equal(out[0, 0, 1], 0.0)


def test_merge_kernel_matches_merge_splits():
    """The Pallas merge over two parts equals the XLA merge over their concatenation, NaN in empty splits too."""
    rng = np.random.default_rng(3)
    parts = []
    for splits in (2, 4):
        o = rng.standard_normal((3, 2, splits, 5, 16)).astype(np.float32)
        l = rng.uniform(0.5, 2.0, (3, 2, splits, 5)).astype(np.float32)
        m = rng.uniform(-3.0, 3.0, (3, 2, splits, 5)).astype(np.float32)
        l[0, :, 0], m[0, :, 0], o[0, :, 0] = 0.0, -1e30, np.nan  # row 0: an empty split in each part
        parts.append((o, l, m))
    parts[0][1][1], parts[1][1][1] = 0.0, 0.0  # row 1 has nothing at all: zeros out
    want = merge_splits(*(jnp.asarray(np.concatenate(xs, axis=2)) for xs in zip(*parts, strict=True)))
    got = merge_splits_pallas([tuple(map(jnp.asarray, part)) for part in parts], jnp.float32, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)


# (starts, num_q, num_heads, num_kv_heads, head_dim, page_size, pages_per_seq, dtype, tunables)
PREFILL_CASES = [
    ([0, 8, 13, -1], 8, 4, 4, 64, 8, 4, jnp.float32, {}),  # GQA 1; chunk at 0, at a page boundary, mid-page
    ([0, 33], 16, 8, 4, 128, 16, 4, jnp.bfloat16, {"block_rows": 16}),  # GQA 2; several q blocks a row
    ([3, 16, -1], 5, 16, 4, 64, 8, 4, jnp.float32, {"pages_per_block": 2}),  # GQA 4; T=5 padded to 8
    ([0, 32], 32, 16, 2, 128, 16, 4, jnp.bfloat16, {}),  # GQA 8; full table, unmasked + masked loops
    ([2, 9], 4, 7, 1, 64, 8, 4, jnp.float32, {}),  # GQA 7: group padded to 8
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"G{c[2] // c[3]}-T{c[1]}-{c[7].__name__}")
def test_prefill_kernel_matches_reference(case):
    starts, num_q, *shape, tunables = case
    check_kernel(paged_prefill_attention, 3, starts, num_q, *shape, tunables)


def test_backend_switch_dispatches_on_num_tokens():
    attend = get_paged_attention("pallas", interpret=True)
    for num_q, seed in ((1, 4), (3, 5)):  # T == 1 -> decode kernel, T > 1 -> prefill kernel
        args, real = make_problem(
            seed,
            starts=[4, 11],
            num_q=num_q,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            page_size=8,
            pages_per_seq=2,
            dtype=jnp.float32,
        )
        check(attend(*args, scale=64**-0.5), args, real, jnp.float32)
    assert resolve_backend("auto") == {"gpu": "pallas", "cpu": "cpu"}.get(jax.default_backend(), "xla")
    assert get_paged_attention("xla") is paged_attention_xla
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_paged_attention("triton-magic")


# Shared-prefix (cascade) decode: (groups, solo rows, num_heads, num_kv_heads, head_dim, page_size, pps, dtype,
# tunables). A group is (rows, shared pages); its rows get ragged lengths past the shared pages, one of them
# ending right after them (its own pass is a single key, a page boundary), and rows beyond the tile size or a
# group too small for a tile take the plain path, as do the solo rows and a padding row.
SHARED_PREFIX_CASES = [
    ([(6, 3), (4, 5)], 2, 8, 2, 64, 8, 8, jnp.float32, {"k_splits": 2, "prefix_splits": 2}),  # GQA 4
    ([(9, 2)], 1, 4, 4, 64, 8, 6, jnp.float32, {}),  # GQA 1: tiles of 4 rows, the 9th row left alone
    ([(5, 4), (3, 2)], 1, 7, 1, 64, 8, 6, jnp.float32, {"prefix_splits": 8}),  # GQA 7 (rows padded); group of 3
    ([(8, 6)], 2, 16, 2, 128, 16, 8, jnp.bfloat16, {"pages_per_block": 2}),  # GQA 8, blocks straddling the end
]


def make_shared_problem(seed, groups, solo, num_heads, num_kv_heads, head_dim, page_size, pps, dtype):
    """A decode problem whose groups of rows hold the same leading pages, plus the rows' lengths."""
    rng = np.random.default_rng(seed)
    sizes = [n for n, _ in groups]
    batch = sum(sizes) + solo + 1  # + a padding row
    num_pages = batch * pps + 3
    tables = rng.permutation(np.arange(1, num_pages))[: batch * pps].reshape(batch, pps).astype(np.int32)
    lens = rng.integers(1, pps * page_size + 1, batch).astype(np.int32)
    row = 0
    for size, pages in groups:
        tables[row + 1 : row + size, :pages] = tables[row, :pages]
        lens[row : row + size] = rng.integers(pages * page_size + 1, pps * page_size + 1, size)
        lens[row] = pages * page_size + 1
        row += size
    tables[-1], lens[-1] = 0, 0  # padding row
    q = rng.standard_normal((batch, 1, num_heads, head_dim))
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    args = (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(tables),
            jnp.asarray(np.maximum(lens - 1, 0)[:, None], jnp.int32), jnp.asarray(lens))
    return args, lens > 0


@pytest.mark.parametrize("case", SHARED_PREFIX_CASES, ids=lambda c: f"G{c[2] // c[3]}-{c[7].__name__}")
def test_shared_prefix_decode_matches_reference(case):
    groups, solo, num_heads, num_kv_heads, head_dim, page_size, pps, dtype, tunables = case
    args, real = make_shared_problem(6, groups, solo, num_heads, num_kv_heads, head_dim, page_size, pps, dtype)
    tables, lens = np.asarray(args[3]), np.asarray(args[5])
    tile_size, max_tiles = 4, 3
    plan = plan_shared_prefix(tables[real], lens[real], page_size=page_size, tile_size=tile_size, max_tiles=max_tiles)
    padding = (np.array([max_tiles], np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32))
    plan = [jnp.asarray(np.concatenate([part, pad])) for part, pad in zip(plan, padding, strict=True)]
    shared = SharedPrefix.from_rows(*plan, num_tiles=max_tiles, tile_size=tile_size)
    assert int((np.asarray(shared.tile_len) > 0).sum()) >= 1, "the case must exercise the prefix pass"
    out = shared_prefix_decode_attention(*args, shared, scale=head_dim**-0.5, interpret=True, **tunables)
    check(out, args, real, dtype)
    # The backend switch takes the same plan; so does the reference, which ignores it. The switch passes the
    # arguments through with the default tunables: checked in the case that uses them (in the others it compiled
    # a second kernel, 1.2-1.5 s each, to check the same plumbing).
    if not tunables:
        via_switch = get_paged_attention("pallas", interpret=True)(*args, scale=head_dim**-0.5, shared=shared)
        np.testing.assert_array_equal(np.asarray(via_switch), np.asarray(out))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no-add"])
def test_add_rms_norm_kernel_matches_reference(dtype, with_delta):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 5, 64)) * 3, dtype)
    delta = jnp.asarray(rng.standard_normal((3, 5, 64)), dtype) if with_delta else None
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 64), dtype)
    total, normed = add_rms_norm_pallas(x, delta, scale, 1e-5, interpret=True)
    want_total, want_normed = add_rms_norm_reference(x, delta, scale, 1e-5)
    np.testing.assert_array_equal(np.asarray(total, np.float32), np.asarray(want_total, np.float32))
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want_normed, np.float32), atol=tol, rtol=tol)
    assert total.dtype == normed.dtype == dtype


def test_add_rms_norm_scales_and_rounds_a_quantized_products_sums():
    """A quantized weight's unscaled f32 sums (`Scaled`) with their scale give exactly what the scaled product
    rounded to the activations' dtype gives, in the kernel and in the reference."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((1, 1, 64)) * 3, jnp.bfloat16)
    sums, delta_scale = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, 1, 64), (64,)))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.bfloat16)
    for fn in (functools.partial(add_rms_norm_pallas, interpret=True), add_rms_norm_reference):
        got = fn(x, sums, scale, 1e-5, delta_scale)
        want = fn(x, (sums * delta_scale).astype(jnp.bfloat16), scale, 1e-5)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_add_rms_norm_falls_back_for_other_hidden_sizes():
    x, delta, scale = (jnp.ones((2, 48)), jnp.full((2, 48), 2.0), jnp.ones(48))
    total, normed = add_rms_norm_pallas(x, delta, scale, 1e-6, interpret=True)
    np.testing.assert_allclose(np.asarray(total), 3.0)
    np.testing.assert_allclose(np.asarray(normed), 1.0, rtol=1e-5)


def rope_write_problem(group: int, dtype: jnp.dtype, tokens: int) -> tuple:
    """Random (qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid): 3 rows of `tokens` tokens over
    4-token pages, a padding token in the second row, angles of any size."""
    rng = np.random.default_rng(group * 10 + tokens)
    num_kv_heads, head_dim, page_size, num_pages = 2, 64, 4, 13
    qkv = jnp.asarray(rng.standard_normal((3, tokens, num_kv_heads, group + 2, head_dim)), dtype)
    angles = rng.uniform(0, 100, (3, tokens, 1, head_dim // 2))
    pools = [jnp.asarray(rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim)), dtype) for _ in "kv"]
    tables = jnp.asarray(rng.permutation(np.arange(1, num_pages))[:12].reshape(3, 4), jnp.int32)
    positions = jnp.asarray(np.array([[3], [8], [13]]) + np.arange(tokens)[None, :], jnp.int32)
    valid = jnp.ones((3, tokens), bool).at[1, -1].set(False)
    return (qkv, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32), *pools, tables,
            positions, valid)


@pytest.mark.parametrize("group,dtype,tokens", [(4, jnp.bfloat16, 1), (1, jnp.float32, 1), (2, jnp.bfloat16, 3)])
def test_rope_write_kernel_matches_reference(group, dtype, tokens):
    """The fused rotation and cache write turns q and k and stores k and v as the XLA path does: the same f32
    arithmetic rounded the same way (within an ulp: XLA may contract a multiply and add into an FMA in either
    program), the padding token written nowhere, every other slot untouched."""
    args = rope_write_problem(group, dtype, tokens)
    got, want = rope_write_pallas(*args, dtype=dtype, interpret=True), rope_write_reference(*args, dtype=dtype)
    ulp = float(jnp.finfo(dtype).eps)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=ulp, atol=4 * ulp)
    changed = np.asarray(got[1] != args[3]).any(axis=-1)  # [Hkv, P, PS]: the slots the step wrote
    assert changed.sum() == 2 * (3 * tokens - 1)  # each valid token's slot, for each KV head


def test_rope_write_scales_and_rounds_a_quantized_products_sums():
    """A quantized weight's unscaled f32 sums (`Scaled`) with their scale write exactly what the scaled qkv
    rounded to the activations' dtype writes: q in that dtype, the same pages."""
    args = rope_write_problem(4, jnp.bfloat16, 1)
    sums = args[0].astype(jnp.float32) + 1e-3  # bits that rounding to bf16 drops
    qkv_scale = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2, sums.shape[2:]), jnp.float32)
    rounded = (sums * qkv_scale).astype(jnp.bfloat16)
    for fn in (functools.partial(rope_write_pallas, interpret=True), rope_write_reference):
        got = fn(sums, *args[1:], dtype=jnp.bfloat16, qkv_scale=qkv_scale)
        want = fn(rounded, *args[1:], dtype=jnp.bfloat16)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_rope_write_falls_back_where_the_kernel_does_not_fit():
    """G = 3 (not a power of two) and quantized pools take the reference (jitted: within an FMA's rounding)."""
    args = rope_write_problem(3, jnp.float32, 1)
    f32 = dict(dtype=jnp.float32)
    for g, w in zip(rope_write_pallas(*args, **f32, interpret=True), rope_write_reference(*args, **f32), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    quantized = (*args[:3], quantize_pages(args[3], "int8"), quantize_pages(args[4], "int8"), *args[5:])
    got, want = rope_write_pallas(*quantized, **f32, interpret=True), rope_write_reference(*quantized, **f32)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(got[1].data, np.int32) - np.asarray(want[1].data, np.int32)).max() <= 1
