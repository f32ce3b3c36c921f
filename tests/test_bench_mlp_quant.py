"""tools.bench_mlp_quant, the GPU probe of a fused silu(gate) * up -> e4m3 kernel, on a CPU: the candidate runs in
interpret mode against XLA's row scaling (the tool stops on a difference), and lowers for CUDA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import bench_mlp_quant

E4M3_STEP_AT_MAX = 32.0  # one e4m3 step near 448: where two roundings of the hidden may land either side


def test_quick_run_checks_and_times_every_chunk(capsys):
    bench_mlp_quant.main(["--quick", "--rows", "3", "--chunks", "64,128"])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("rows 3: xla ") and "pallas 64 " in line and "pallas 128 " in line


def test_the_candidate_scales_each_row_as_xla_does():
    gate_up = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 200)) * 3, jnp.bfloat16)
    gate_up = gate_up.at[2].set(0)  # an all-zero row keeps scale 1, as the engine's
    q, scale = bench_mlp_quant.silu_mul_fp8(gate_up, chunk=64, interpret=True)
    want_q, want_scale = bench_mlp_quant.xla_quantized(gate_up)
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (4, 1) and float(scale[2, 0]) == 1.0
    np.testing.assert_allclose(np.asarray(scale), np.asarray(want_scale), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(q.astype(jnp.float32)), np.asarray(want_q.astype(jnp.float32)),
                               atol=E4M3_STEP_AT_MAX, rtol=0.07)


@pytest.mark.parametrize("rows", [1, 512])
def test_the_candidate_lowers_for_cuda(rows):
    lowered = bench_mlp_quant.silu_mul_fp8.trace(jax.ShapeDtypeStruct((rows, 2, 14336), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
