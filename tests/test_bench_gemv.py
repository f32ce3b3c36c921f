"""tools.bench_gemv, the GPU probe of few-row matmuls over quantized weights, on a CPU.

Its candidate Pallas kernels run in interpret mode at a tiny shape and are checked against an f32
reference before anything is timed; a wrong product stops the run. Both kernels also lower for CUDA
here, so a probe sent to a lent GPU does not fail on what a CPU could have caught.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

from tools import bench_gemv


def test_quick_run_checks_and_prints_every_variant(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_gemv", "--quick", "--rows", "1,3"])
    bench_gemv.main()
    lines = capsys.readouterr().out.splitlines()
    for rows in (1, 3):
        printed = {line.split(": ", 1)[1].split("  ")[0].strip() for line in lines if f"rows {rows}:" in line}
        labels = {"bf16 dot", "fp8 xla fused", "int8 xla fused", "fp8 xla fused [K,N]",
                  "fp8 pallas n=64 k=256 splits=2 [K,N]", "int8 pallas n=64 k=256 splits=2 [K,N]",
                  "bf16 xla reduce", "fp8 xla reduce", "int8 xla reduce"}  # reductions: up to 4 rows
        if rows == 1:
            labels |= {"fp8 pallas-row n=64 k=256 splits=2 [K,N]", "bf16 pallas-row n=64 k=256 splits=2 [K,N]",
                       "fp8 xla reduce parts=2", "fp8 xla reduce parts=4", "fp8 words reduce"}
        assert printed == labels


def test_check_stops_a_wrong_product():
    x = jax.random.normal(jax.random.key(0), (1, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (64, 32), jnp.float32)
    values, scale = bench_gemv.quantize(w, "int8")  # [32, 64]: the engine's layout
    bench_gemv.check("fused", bench_gemv.fused, x, (values, scale), "int8")
    with pytest.raises(SystemExit, match="relative error"):
        bench_gemv.check("wrong", lambda x, v, s: bench_gemv.fused(x, v, s) * 1.5, x, (values, scale), "int8")
    bench_gemv.check("fused [K,N]", bench_gemv.fused_kn, x, (values.T, scale), "int8kn")


def test_e4m3_words_decode_every_code_exactly():
    codes = jnp.array([c for c in range(256) if c & 0x7F != 0x7F] + [0, 0x80], jnp.uint8)  # 254 non-NaN, +-0 again
    words = jax.lax.bitcast_convert_type(codes.reshape(-1, 4), jnp.uint32)  # four bytes a word, little-endian
    even, odd = bench_gemv.e4m3_pairs_over_256(words), bench_gemv.e4m3_pairs_over_256(words >> 8)  # [W, 2] each
    decoded = jnp.stack([even[:, 0], odd[:, 0], even[:, 1], odd[:, 1]], axis=-1).reshape(-1).astype(jnp.float32)
    want = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32) / 256
    assert jnp.array_equal(decoded, want)
    assert float(jnp.min(jnp.abs(want[want != 0]))) == 2.0**-9 / 256  # subnormals included


@pytest.mark.parametrize("hot", [False, True])
def test_hot_run_prints_the_one_row_candidates(monkeypatch, capsys, hot):
    monkeypatch.setattr(sys, "argv", ["bench_gemv", "--quick", "--rows", "1", "--no-pallas"] + ["--hot"] * hot)
    bench_gemv.main()  # every variant is checked against the f32 product before it is timed
    out = capsys.readouterr().out
    assert all(f"rows 1: {label} " in out for label in ("fp8 xla reduce parts=4", "fp8 words reduce"))


@pytest.mark.parametrize("one_row, weights", [(False, jnp.float8_e4m3fn), (True, jnp.float8_e4m3fn),
                                              (True, jnp.bfloat16)])
def test_candidate_kernels_lower_for_cuda(one_row, weights):
    args = (jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 512), weights),
            jax.ShapeDtypeStruct((512,), jnp.float32))
    gemv = jax.jit(lambda x, v, s: bench_gemv.quantized_gemv(x, v, s, block_n=128, block_k=128, k_splits=4,
                                                             one_row=one_row))
    text = gemv.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
