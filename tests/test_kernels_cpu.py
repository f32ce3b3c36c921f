"""The CPU's native decode attention (`xlkernels.cpu_decode`) against the reference: built here with this
machine's compiler (CI has one: a kernel that does not build fails these tests, it is not skipped)."""

from __future__ import annotations

import logging
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_kernels_xla import HEAD_DIM, PAGE_SIZE, PAGES_PER_SEQ, attend, paged_batch
from xlkernels import get_paged_attention, paged_attention_reference, resolve_backend
from xlkernels.cpu_decode import TARGETS, paged_attention_cpu
from xlkernels.kv_quant import BF16_BITS, as_stored, as_values, empty_pages, write_tokens
from xlkernels.native_build import build, native_kernels_ready

NATIVE = "xlserve_paged_decode"  # the prefix of every page dtype's kernel (cpu_decode.TARGETS)


def lowered(args: dict) -> str:
    arrays = [jnp.asarray(a) for a in args.values()]
    return jax.jit(lambda *a: paged_attention_cpu(*a, scale=HEAD_DIM**-0.5)).lower(*arrays).as_text()


def test_the_kernel_builds_here_and_is_the_cpus_default():
    assert native_kernels_ready()
    assert resolve_backend("auto") == "cpu" and get_paged_attention("auto") is paged_attention_cpu


# Head sizes: the kernel sums values 32 at a time in registers, then the rest one by one (16: only the rest).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (8, 1, 64), (3, 3, 40)])
# bf16 pages are stored as their bits; bf16 queries (--dtype bfloat16) are widened to float32 for the kernel.
@pytest.mark.parametrize("stored,query", [(jnp.dtype(jnp.float32), jnp.float32), (BF16_BITS, jnp.float32),
                                          (BF16_BITS, jnp.bfloat16)])
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, stored, query):
    # Ragged rows: a padding row, inside the first page, on a page boundary, mid-table, the whole table.
    args = paged_batch([0, 3, 2 * PAGE_SIZE, 21, PAGES_PER_SEQ * PAGE_SIZE], 1, num_heads, num_kv_heads,
                       head_dim=head_dim)
    args["q"] = args["q"].astype(query).astype(np.float32)  # the values a bf16 query holds, for the reference
    pages = {name: as_stored(jnp.asarray(args[name]), stored) for name in ("k_pages", "v_pages")}
    served = {**args, **pages, "q": jnp.asarray(args["q"], query)}
    assert TARGETS[stored] in lowered(served), "decode rows run the native kernel"
    got = attend(paged_attention_cpu, served)
    assert got.dtype == query
    # Against the reference in float32 over the same (rounded) values: the kernel widens them exactly.
    want = attend(paged_attention_reference, {**args, **{n: as_values(p).astype(np.float32) for n, p in pages.items()}})
    # The reference averages a padding row's (masked) values; the kernels, like the XLA loop, give zeros; a bf16
    # answer is the float32 one rounded.
    tolerance = dict(atol=2e-6, rtol=2e-5) if query == jnp.float32 else dict(atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(got[1:].astype(np.float32), want[1:], **tolerance)
    assert not got[0].astype(np.float32).any(), "a row that sees no token comes out as zeros"


def test_a_query_sees_only_positions_up_to_its_own():
    """q_position, not kv_len, bounds a row whose cache already holds later tokens (and a position past
    the block table reads only the table)."""
    args = paged_batch([30, 17, 40], 1)
    args["q_positions"][:, 0] = [12, 16, PAGES_PER_SEQ * PAGE_SIZE + 5]
    args["kv_lens"][2] = PAGES_PER_SEQ * PAGE_SIZE + 6
    np.testing.assert_allclose(attend(paged_attention_cpu, args), attend(paged_attention_reference, args),
                               atol=2e-6, rtol=2e-5)


def test_pages_past_a_rows_context_are_never_read():
    args = paged_batch([5, 13], 1)
    clean = attend(paged_attention_reference, args)
    for table, length in zip(args["block_tables"], args["kv_lens"], strict=True):
        for page in table[-(-length // PAGE_SIZE):]:
            args["k_pages"][:, page] = args["v_pages"][:, page] = np.nan
    np.testing.assert_allclose(attend(paged_attention_cpu, args), clean, atol=2e-6, rtol=2e-5)


def test_prompt_chunks_quantized_pages_and_bfloat16_pools_run_in_xla():
    """Not the native kernel's: prompt chunks, quantized pages, and pools of bfloat16 itself (the GPU's, as built
    by tests of its lowering on a CPU host; the CPU's own are stored as bits)."""
    prompt = paged_batch([9, 30], 4)
    assert NATIVE not in lowered(prompt)
    np.testing.assert_allclose(attend(paged_attention_cpu, prompt), attend(paged_attention_reference, prompt),
                               atol=2e-6, rtol=2e-5)
    bf16 = {k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v) for k, v in paged_batch([9], 1).items()}
    assert NATIVE not in lowered(bf16)
    decode = paged_batch([9, 30], 1)
    k, v = (empty_pages("int8", decode[name].shape, jnp.float32) for name in ("k_pages", "v_pages"))
    arrays = [jnp.asarray(decode["q"]), k, v, *(jnp.asarray(decode[name]) for name in ("block_tables",
                                                                                  "q_positions", "kv_lens"))]
    assert NATIVE not in jax.jit(lambda *a: paged_attention_cpu(*a, scale=1.0)).lower(*arrays).as_text()

def test_a_compiler_error_is_reported(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(subprocess.CalledProcessError):
        build(tmp_path / "kernel.so")
    assert not list(tmp_path.iterdir()), "nothing half-written is left behind"
    native_kernels_ready.cache_clear()
    monkeypatch.setattr("xlkernels.native_build.library_path", lambda: tmp_path / "kernel.so")
    try:
        with caplog.at_level(logging.WARNING):
            assert not native_kernels_ready()
        assert "run in XLA" in caplog.text
    finally:
        native_kernels_ready.cache_clear()
    monkeypatch.undo()
    assert native_kernels_ready()


def test_bf16_pages_are_stored_gathered_and_written_as_their_bits():
    """XLA:CPU gathers and scatters bfloat16 through float32, widening the whole operand (a pool per layer and
    step), so the CPU's bfloat16 pools are stored as their 16-bit patterns (`kv_quant.BF16_BITS`): the prompt
    chunks' attention and the cache writes make no float32 array of a pool's (or one head's pool's) shape, and give
    the numbers of float32 over the same bfloat16 values."""
    args = paged_batch([9, 30], 4)
    pages = {name: as_stored(jnp.asarray(args[name]), BF16_BITS) for name in ("k_pages", "v_pages")}
    pool_shape = ",".join(map(str, args["k_pages"].shape[1:]))  # [P, PS, D], with or without the heads before it
    widened = re.compile(rf"f32\[(\d+,)?{pool_shape}\]")
    arrays = [jnp.asarray(a) for a in {**args, **pages}.values()]
    attention = jax.jit(lambda *a: paged_attention_cpu(*a, scale=HEAD_DIM**-0.5))
    assert not widened.search(attention.lower(*arrays).compile().as_text())
    want = attend(paged_attention_reference, {**args, **{n: as_values(p).astype(np.float32) for n, p in pages.items()}})
    np.testing.assert_allclose(np.asarray(attention(*arrays)), want, atol=2e-6, rtol=2e-5)

    pool, new = pages["k_pages"], jnp.asarray(args["q"][0, :, :2].transpose(1, 0, 2))  # [Hkv, 4, D]
    page_idx, offsets = jnp.asarray([3, 3, 5, 10_000]), jnp.asarray([0, 1, PAGE_SIZE - 1, 0])  # the last one drops
    write = jax.jit(write_tokens)
    assert not widened.search(write.lower(pool, new, page_idx, offsets).compile().as_text())
    written = write(pool, new, page_idx, offsets)
    assert written.dtype == BF16_BITS
    expected = np.array(as_values(pool).astype(jnp.float32))
    expected[:, [3, 3, 5], [0, 1, PAGE_SIZE - 1]] = np.asarray(new[:, :3].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(as_values(written).astype(jnp.float32)), expected)
