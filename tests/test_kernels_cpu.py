"""The CPU's native decode attention (`xlkernels.cpu_decode`) against the reference: built here with this
machine's compiler (CI has one: a kernel that does not build fails these tests, it is not skipped)."""

from __future__ import annotations

import logging
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_kernels_xla import HEAD_DIM, PAGE_SIZE, PAGES_PER_SEQ, attend, paged_batch
from xlkernels import get_paged_attention, paged_attention_reference, resolve_backend
from xlkernels.cpu_decode import TARGET, paged_attention_cpu
from xlkernels.kv_quant import empty_pages
from xlkernels.native_build import build, native_kernels_ready


def lowered(args: dict) -> str:
    arrays = [jnp.asarray(a) for a in args.values()]
    return jax.jit(lambda *a: paged_attention_cpu(*a, scale=HEAD_DIM**-0.5)).lower(*arrays).as_text()


def test_the_kernel_builds_here_and_is_the_cpus_default():
    assert native_kernels_ready()
    assert resolve_backend("auto") == "cpu" and get_paged_attention("auto") is paged_attention_cpu


# Head sizes: the kernel sums values 32 at a time in registers, then the rest one by one (16: only the rest).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 16), (8, 1, 64), (3, 3, 40)])
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim):
    # Ragged rows: a padding row, inside the first page, on a page boundary, mid-table, the whole table.
    args = paged_batch([0, 3, 2 * PAGE_SIZE, 21, PAGES_PER_SEQ * PAGE_SIZE], 1, num_heads, num_kv_heads,
                       head_dim=head_dim)
    assert TARGET in lowered(args), "decode rows of float32 pages run the native kernel"
    got = attend(paged_attention_cpu, args)
    # The reference averages a padding row's (masked) values; the kernels, like the XLA loop, give zeros.
    np.testing.assert_allclose(got[1:], attend(paged_attention_reference, args)[1:], atol=2e-6, rtol=2e-5)
    assert not got[0].any(), "a row that sees no token comes out as zeros"


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


def test_prompt_chunks_quantized_pages_and_bf16_run_in_xla():
    prompt = paged_batch([9, 30], 4)
    assert TARGET not in lowered(prompt)
    np.testing.assert_allclose(attend(paged_attention_cpu, prompt), attend(paged_attention_reference, prompt),
                               atol=2e-6, rtol=2e-5)
    bf16 = {k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v) for k, v in paged_batch([9], 1).items()}
    assert TARGET not in lowered(bf16)
    decode = paged_batch([9, 30], 1)
    k, v = (empty_pages("int8", decode[name].shape, jnp.float32) for name in ("k_pages", "v_pages"))
    arrays = [jnp.asarray(decode["q"]), k, v, *(jnp.asarray(decode[name]) for name in ("block_tables",
                                                                                  "q_positions", "kv_lens"))]
    assert TARGET not in jax.jit(lambda *a: paged_attention_cpu(*a, scale=1.0)).lower(*arrays).as_text()

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
