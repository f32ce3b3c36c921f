"""The CPU's native few-row products (`xlkernels.cpu_matmul`) against numpy in float64, over float32 weights and
(one row) bfloat16 weights: built here with this machine's compiler (CI has one: a kernel that does not build
fails these tests, it is not skipped)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlkernels.cpu_matmul import MAX_ROWS, TARGETS, native_matmul_applies, rows_matmul

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def products(m: int, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Nonzero everywhere, mixed signs and magnitudes: a skipped or repeated term shows.
    x = (rng.standard_normal((m, k)) + 0.1).astype(np.float32)
    w = (rng.uniform(0.5, 1.5, (n, k)) * rng.choice([-1, 1], (n, k))).astype(np.float32)
    return x, w


def assert_close(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """Each output within 2e-6 of float64's, relative to the sum of its terms' magnitudes (the bound of a
    float32 dot: relative to the result itself, one of near zero could pass or fail by cancellation)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    error = np.abs(got - x64 @ w64.T) / (np.abs(x64) @ np.abs(w64).T)
    assert got.shape == (x.shape[0], w.shape[0])
    assert error.max() < 2e-6, f"relative error {error.max():.2e} at {np.unravel_index(error.argmax(), error.shape)}"


# Rows: one, a few, a full 8-row vector and one more (the 16-lane form), all 16. Channels: fewer than a
# register block, blocks plus 4-channel and single-channel rests. Inputs: down to one, and the model's.
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("n,k", [(1, 1), (5, 3), (13, 19), (100, 576), (37, 1536)])
def test_products_match_float64(m, n, k):
    x, w = products(m, n, k, seed=m * 1000 + n + k)
    assert native_matmul_applies(jnp.asarray(x), jnp.asarray(w))
    assert_close(np.asarray(jax.jit(rows_matmul)(x, w)), x, w)


# One row over bfloat16 weights: channels from one to past a task (64) with an 8-channel block's rest, inputs
# from a vector's rest alone (3) to whole vectors plus a rest (19, 1537) and the model's.
@pytest.mark.parametrize("n,k", [(1, 3), (13, 19), (100, 576), (71, 1537), (3072, 576)])
def test_one_row_over_bfloat16_weights_matches_float64(n, k):
    x, w = products(1, n, k, seed=n + k)
    w16 = jnp.asarray(w, jnp.bfloat16)
    assert native_matmul_applies(jnp.asarray(x), w16)
    # The weight is exact in bf16 once rounded: the kernel must then be as close as a float32 dot of it.
    assert_close(np.asarray(jax.jit(rows_matmul)(x, w16)), x, np.asarray(w16.astype(jnp.float32)))


def test_a_model_sized_product_splits_across_threads_and_matches():
    x, w = products(16, 3072, 576)  # w_gate_up's shape: tasks on the caller and XLA's pool threads
    assert_close(np.asarray(jax.jit(rows_matmul)(x, w)), x, w)


def test_it_lowers_to_the_custom_call_only_where_it_applies():
    x, w = products(MAX_ROWS[F32], 8, 16)
    assert TARGETS[F32] in jax.jit(rows_matmul).lower(x, w).as_text()
    assert TARGETS[BF16] in jax.jit(rows_matmul).lower(x[:1], jnp.asarray(w, jnp.bfloat16)).as_text()
    assert not native_matmul_applies(jnp.zeros((MAX_ROWS[F32] + 1, 16)), jnp.asarray(w)), "more rows keep XLA's dot"
    assert not native_matmul_applies(jnp.asarray(x[:2]), jnp.asarray(w, jnp.bfloat16)), "bf16: one row only"
    assert not native_matmul_applies(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    assert not native_matmul_applies(jnp.asarray(x), jnp.zeros((8, 15))), "K must agree"


def test_the_benchmark_checks_and_prints_every_path(capsys):
    from tools import bench_cpu_matmul

    bench_cpu_matmul.main(["--quick", "--rows", "3,16"])
    lines = capsys.readouterr().out.splitlines()
    for rows in (3, 16):
        rows_lines = [line for line in lines if line.startswith(f"rows {rows:2d} ")]
        pattern = (r"xla .* native .* bf16 .* q4_1 .* q4_1-avx .* native \d+\.\d+x  bf16 \d+\.\d+x  q4_1 \d+\.\d+x"
                   r"  q4_1-avx \d+\.\d+x$")
        assert len(rows_lines) == 6 and all(re.search(pattern, line) for line in rows_lines), rows_lines
