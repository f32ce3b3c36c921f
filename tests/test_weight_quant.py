"""Weights quantized at load (`--weight-quant int8|fp8`), Hugging Face FP8 checkpoints, the CPU's
matmul weights stored inputs-last, and bfloat16 weights under float32 activations on CPU (`--weight-quant bf16`).

The point to prove is that the dequantization never builds a bf16 (or f32) copy of a weight: it is read
off the compiled decode step's memory analysis (its temporaries stay below the smallest weight matrix's
bf16 size and below 10% of one layer's bf16 weights) and off its HLO (no float array of a weight's shape).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.llama import CausalLM, empty_cache
from model.loader import (
    SCALE_SUFFIX,
    checkpoint_tensors,
    fp8_checkpoint,
    init_random_params,
    load_params,
    param_shardings,
    param_specs,
)
from model.sharding import logical_to_spec, make_mesh
from model.weight_quant import (
    NATIVE_FP8_MIN_ROWS,
    NATIVE_MIN_ROWS,
    ROWS_LEFT_MIN_ROWS,
    InputsLastWeight,
    Scaled,
    column_block,
    compiler_options,
    linear,
    matmul_strategy,
    quantize_weight,
    stored_shape,
    stored_weight,
    target_platform,
)
from serving.engine.runner import ROW_FIELDS, step
from tests.checkpoints import make_llama_checkpoint
from xlkernels.cpu_matmul import MAX_ROWS, TARGETS

F32_ROWS_MATMUL, BF16_ROW_MATMUL = TARGETS[jnp.dtype(jnp.float32)], TARGETS[jnp.dtype(jnp.bfloat16)]

# Big enough that a weight dwarfs the step's activations: a decode row of E = 1024 against matrices of 1-8M.
WIDE = ModelConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_layers=2, num_heads=16,
                   num_kv_heads=4, head_dim=64, max_position_embeddings=64)


def compiled_decode_step(config: ModelConfig, dtype: jnp.dtype = jnp.bfloat16):
    """The engine's step (serving.engine.runner.step) for one decode row, compiled on this backend."""
    params = init_random_params(config, dtype, 0)
    cache = empty_cache(config, 4, 16, dtype)
    seen, last = jnp.zeros((1, config.vocab_size), bool), jnp.zeros((1,), jnp.int32)
    tokens, rows = jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, ROW_FIELDS.width + 2), jnp.int32)
    run = jax.jit(functools.partial(step, CausalLM(config, dtype=dtype)))
    return run.lower(params, cache, seen, last, tokens, rows).compile()


@pytest.mark.parametrize("kind", ["int8", "fp8", "bf16", "q4_1"])
def test_the_decode_step_builds_no_dequantized_copy_of_a_weight(kind):
    """bf16 (float32 activations): no float32 copy of a weight either, the head's included; nor GGUF blocks
    (float32 activations), which the native kernel decodes in registers."""
    config = dataclasses.replace(WIDE, weight_quant=kind)
    compiled = compiled_decode_step(config, jnp.float32 if kind in ("bf16", "q4_1") else jnp.bfloat16)
    layer = [s for s in param_specs(config) if s.path.startswith(("layers_0/", "lm_head/")) and s.quant]
    assert {s.path.rsplit("/", 1)[1] for s in layer} == {"wqkv", "wo", "w_gate_up", "w_down"} | (
        {"kernel"} if kind == "bf16" else set())
    bf16_bytes = {s.path: math.prod(s.shape) * 2 for s in layer}
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < min(bf16_bytes.values()), (temp, bf16_bytes)
    assert temp < 0.1 * sum(bf16_bytes.values())
    hlo = materialized(compiled.as_text())
    for spec in layer:  # no float array shaped like a whole weight: as declared, as stored, as [K, N] or [N, K]
        k = math.prod(spec.shape[: spec.in_dims])
        n = math.prod(spec.shape) // k
        for shape in (spec.shape, stored_shape(spec.shape, spec.in_dims), (k, n), (n, k)):
            dims = ",".join(map(str, shape))
            widened = "(f32|f16)" if kind == "bf16" else "(f32|bf16|f16)"  # bf16's own values are bf16 arrays
            assert not re.search(rf"\b{widened}\[{dims}\]", hlo), f"a float copy of {spec.path} {shape}"


def materialized(hlo: str) -> str:
    """The HLO's instructions that write buffers: every one outside fusions, and each fusion's root (inside a
    fusion, an element-wise convert of a whole table that a slice then reads computes only the slice)."""
    blocks = hlo.split("\n\n")
    return "\n".join(line for block in blocks for line in block.splitlines()
                     if not block.lstrip().startswith("%fused") or "ROOT" in line)


def test_the_memory_check_catches_a_weight_sized_temporary():
    """The control: converting the whole weight before the dot (what XLA:CPU does with the fused form) shows
    up in the memory analysis as a temporary of at least the weight's bf16 size."""
    values, scale = quantize_weight(jax.random.normal(jax.random.key(0), (512, 4096)), "int8", 1)
    weight, x = InputsLastWeight(values, scale, 1), jnp.ones((1, 512), jnp.bfloat16)
    temp = {strategy: jax.jit(functools.partial(linear, strategy=strategy)).lower(x, weight).compile()
            .memory_analysis().temp_size_in_bytes for strategy in ("fused", "blocked")}
    assert temp["fused"] >= 512 * 4096 * 2 > 4 * temp["blocked"]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_matmuls_match_the_float_weights_within_the_formats_rounding(kind):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((6, 8, 40)), jnp.float32)  # in_dims 2: K = 48 inputs, 40 outputs
    x = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    values, scale = quantize_weight(w, kind, 2)
    assert values.shape == (40, 6, 8) == stored_shape(w.shape, 2) and scale.shape == (40,)  # inputs last
    want = x @ w.reshape(48, 40)
    for strategy in ("fused", "reduce", "blocked") + (("native",) if kind == "fp8" else ()):
        got = linear(x, InputsLastWeight(values, scale, 2), in_dims=2, strategy=strategy)
        relative = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        # the native dot also rounds the activations to e4m3 (3 mantissa bits), row by row
        assert relative < {"int8": 0.02, "fp8": 0.06, "native": 0.12}[kind if strategy != "native" else strategy], (
            strategy, relative)
    assert column_block(3072, 576) == 96 and column_block(7, 10**9) == 1


def test_a_one_row_product_can_leave_its_scale_to_the_consumer():
    """`keep_scale`: the one-row reduction's f32 sums and the weight's scale (`Scaled`), with no multiply or cast
    after the sum (XLA would run them as a kernel of their own), which give exactly the product's own output;
    other strategies and unquantized weights come back in the activations' dtype."""
    rng = np.random.default_rng(1)
    values, scale = quantize_weight(jnp.asarray(rng.standard_normal((48, 40)), jnp.float32), "int8", 1)
    weight, x = InputsLastWeight(values, scale), jnp.asarray(rng.standard_normal((1, 48)), jnp.bfloat16)
    unscaled = linear(x, weight, strategy="reduce", keep_scale=True)
    assert isinstance(unscaled, Scaled) and unscaled.total.dtype == jnp.float32 and unscaled.total.shape == (1, 40)
    np.testing.assert_array_equal(np.asarray(unscaled.rounded(jnp.bfloat16), np.float32),
                                  np.asarray(linear(x, weight, strategy="reduce"), np.float32))
    assert linear(x, weight, strategy="fused", keep_scale=True).dtype == jnp.bfloat16
    assert linear(x, jnp.asarray(rng.standard_normal((48, 40)), jnp.bfloat16), keep_scale=True).dtype == jnp.bfloat16
    hlo = jax.jit(lambda x, w: linear(x, w, strategy="reduce", keep_scale=True).total).lower(x, weight).as_text()
    after_the_sum = hlo.split("stablehlo.reduce", 1)[1].split("return", 1)[0]
    assert "multiply" not in after_the_sum and "convert" not in after_the_sum, hlo


def test_large_fp8_products_run_the_dot_in_fp8_and_small_ones_convert_the_weight_inside_it():
    """The accelerators' choice: from NATIVE_FP8_MIN_ROWS rows an fp8 product runs with both dot operands in
    e4m3 (Hopper's fp8 GEMM, 1.5x bf16 at 2048 rows on the H100); below, the weight is converted to the
    activations' dtype inside the dot (the fused GEMM streams it faster at few rows), and one row is a
    reduction without a dot (faster still)."""
    e4m3, rows = jnp.dtype(jnp.float8_e4m3fn), NATIVE_FP8_MIN_ROWS
    assert matmul_strategy(rows, e4m3, "gpu") == "native" and matmul_strategy(rows - 1, e4m3, "gpu") == "fused"
    assert matmul_strategy(1, e4m3, "gpu") == "reduce" == matmul_strategy(1, jnp.dtype(jnp.int8), "gpu")
    assert matmul_strategy(1, e4m3, "cpu") == "blocked"
    # A program of native fp8 products compiles without XLA's Triton GEMMs (cuBLASLt runs them).
    assert compiler_options(rows, "fp8", "gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options(rows - 1, "fp8", "gpu") == compiler_options(rows, "int8", "gpu") == {}
    assert compiler_options(rows, None, "gpu") == compiler_options(rows, "fp8", "cpu") == {}
    assert matmul_strategy(4096, jnp.dtype(jnp.int8), "gpu") == "fused"
    assert matmul_strategy(4096, e4m3, "cpu") == "blocked"
    values, scale = quantize_weight(jax.random.normal(jax.random.key(0), (64, 32)), "fp8", 1)
    weight = InputsLastWeight(jax.lax.bitcast_convert_type(values, jnp.float8_e4m3fn), scale)  # e4m3, as on a GPU
    x = jax.random.normal(jax.random.key(1), (rows, 64), jnp.bfloat16)
    want = x.astype(jnp.float32) @ (weight.values.astype(jnp.float32).T * scale)
    for strategy, operands in (("native", r"\(tensor<128x64xf8E4M3FN>, tensor<32x64xf8E4M3FN>\)"),
                               ("fused", r"\(tensor<128x64xbf16>, tensor<32x64xbf16>\)")):
        hlo = jax.jit(functools.partial(linear, strategy=strategy)).lower(x, weight).as_text()
        dots = [line for line in hlo.splitlines() if "dot_general" in line and "=" in line]
        assert len(dots) == 1 and re.search(operands, dots[0]), (strategy, dots)
        got = linear(x, weight, strategy=strategy).astype(jnp.float32)
        assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 0.12, strategy


def test_an_fp8_engine_compiles_its_large_steps_without_tritons_gemms(tiny_llama):
    """The engine's own step programs get the options (the ninth session's runner read them from a parameter
    tree that holds no quantized weight objects, so on the H100 every fp8 step still autotuned Triton GEMMs
    for minutes): an fp8 engine's runner, asked as on a GPU, turns Triton's GEMMs off from
    NATIVE_FP8_MIN_ROWS rows of its matmuls (int8 and unquantized weights: `compiler_options` above)."""
    from serving import pipeline
    from serving.engine.config import StepShape
    from tests.conftest import TINY_ENGINE_OPTIONS

    rows = NATIVE_FP8_MIN_ROWS
    # One bucket of each kind: only the runner is asked, and each fp8 program compiles the CPU's loops.
    options = dict(TINY_ENGINE_OPTIONS, decode_batch_buckets=(1,), prefill_row_buckets=(1,),
                   prefill_token_buckets=(16,), max_prefill_token_num=16)
    with pipeline(str(tiny_llama), **options, weight_quant="fp8") as pipe:
        runner = pipe.engine.runner
        with target_platform("cuda"):
            assert runner.compiler_options(StepShape(rows, 1, rows)) == {"xla_gpu_enable_triton_gemm": False}
            assert runner.compiler_options(StepShape(2, rows, 2 * rows)) == {"xla_gpu_enable_triton_gemm": False}
            assert runner.compiler_options(StepShape(rows - 1, 1, rows - 1)) == {}
        assert runner.compiler_options(StepShape(rows, 1, rows)) == {}  # on this CPU


# (The decorator went missing in 3f2babd, when a test was inserted above it.)
@pytest.mark.parametrize("rows", [1, 16, 32, ROWS_LEFT_MIN_ROWS, 256])
def test_cpu_products_put_the_weight_on_the_left_below_prompt_sizes(rows):
    """On CPU an unquantized weight is stored inputs-last and its product runs as (values @ x.T).T: the dot's
    output is [out, rows] (the orientation XLA:CPU runs ~1.7x faster at 16 rows); from NATIVE_MIN_ROWS to 16
    rows the native kernel runs it instead, with no dot; from ROWS_LEFT_MIN_ROWS (prompt chunks) the rows go
    left, [rows, out], so nothing transposes the output after. No transposed copy of the weight is ever made.
    It equals x @ w."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 2, 48)).astype(np.float32)  # [in, 2, out], like w_gate_up
    x = rng.standard_normal((rows, 80)).astype(np.float32)
    (values,) = stored_weight(jnp.asarray(w), np.dtype(np.float32), None, in_dims=1)
    assert values.shape == (2, 48, 80)
    product = jax.jit(lambda x, values: linear(x, InputsLastWeight(values, None, 1)))
    np.testing.assert_allclose(product(x, values), np.einsum("mk,kon->mon", x, w), rtol=1e-5, atol=1e-4)
    hlo = product.lower(x, values).compile().as_text()
    native = NATIVE_MIN_ROWS <= rows <= MAX_ROWS[jnp.dtype(jnp.float32)]
    assert (F32_ROWS_MATMUL in hlo) == native
    oriented = [("96", str(rows))] if rows < ROWS_LEFT_MIN_ROWS else [(str(rows), "96")]
    assert re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", hlo) == ([] if native else oriented)
    assert not re.search(r"= f32\[80,(2,48|96)\]", hlo), "a copy of the weight as [in, out]"


@pytest.mark.parametrize("rows", [1, 2, 16, 256])
def test_bf16_weights_multiply_several_rows_as_bf16_dots_and_one_row_natively(rows):
    """`--weight-quant bf16`: the weight stored inputs-last in bfloat16, no scales. Two rows or more are rounded
    to bf16 and dotted with f32 accumulation (XLA:CPU's AMX path) with the weight on the left; one row goes to
    the native kernel, without a dot. Neither widens the weight to f32. Within bf16's rounding of x @ w."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((64, 2, 48)).astype(np.float32)  # [in, 2, out], like w_gate_up
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    (values,) = stored_weight(jnp.asarray(w), np.dtype(np.float32), "bf16", in_dims=1)
    assert values.shape == (2, 48, 64) and values.dtype == jnp.bfloat16
    product = jax.jit(lambda x, values: linear(x, InputsLastWeight(values, None, 1)))
    want = np.einsum("mk,kon->mon", x, w)
    got = np.asarray(product(x, values))
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.02 * np.abs(want).max()
    hlo = product.lower(x, values).compile().as_text()
    assert (BF16_ROW_MATMUL in hlo) == (rows == 1)
    dots = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(", hlo)
    oriented = [("96", str(rows))] if rows < ROWS_LEFT_MIN_ROWS else [(str(rows), "96")]
    assert dots == ([] if rows == 1 else oriented), dots
    assert rows == 1 or re.search(rf"bf16\[{rows},64\]\S* convert\(", hlo), "the rows rounded to bf16 for the dot"
    assert not re.search(r"f32\[(2,48,64|96,64|64,96|64,2,48)\]", hlo), "a float32 copy of the weight"
    assert not re.search(r"bf16\[(64,96|64,2,48)\]", hlo), "a transposed copy of the weight"


def test_bf16_weights_include_the_embedding_and_the_head_and_keep_the_logits_close():
    """The tied embedding and an untied head are bf16 too (the head inputs-last, through `linear`); the
    model's logits over a prompt and at one row stay within bf16's rounding of the float32 model's."""
    small = dataclasses.replace(WIDE, hidden_size=256, intermediate_size=512, num_layers=1)
    for tied, rows in ((True, 5), (False, 1)):  # the head's product: a bf16 dot, then the native kernel
        config = dataclasses.replace(small, tie_word_embeddings=tied)
        bf16 = dataclasses.replace(config, weight_quant="bf16")
        leaves = {path: (shape, dtype) for s in param_specs(bf16) for path, shape, _, dtype in s.leaves(np.float32)}
        assert leaves["embed/embedding"] == ((256, 256), np.dtype(jnp.bfloat16))
        assert leaves["layers_0/attn/wo"][1] == np.dtype(jnp.bfloat16)
        assert tied or leaves["lm_head/kernel"] == ((256, 256), np.dtype(jnp.bfloat16))  # [V, E]: inputs last
        tokens = jnp.arange(rows, dtype=jnp.int32)[:, None] * 7
        logits = [forward_logits(c, init_random_params(c, jnp.float32, 0), tokens) for c in (config, bf16)]
        spread = float(jnp.abs(logits[0]).max())
        assert float(jnp.abs(logits[0] - logits[1]).max()) < 0.05 * spread, (tied, rows)


def forward_logits(config: ModelConfig, params, tokens: jax.Array) -> jax.Array:
    """f32[B, V]: the engine's step's logits for one token per row, each row the first token of its own page."""
    batch = tokens.shape[0]
    cache = empty_cache(config, batch + 1, 16, jnp.float32)
    rows = np.zeros((batch, ROW_FIELDS.width + 1), np.int32)
    rows[:, ROW_FIELDS.index("slot")] = np.arange(batch)
    rows[:, ROW_FIELDS.index("length")] = 1
    rows[:, ROW_FIELDS.width] = np.arange(batch) + 1
    seen, last = jnp.zeros((batch, config.vocab_size), bool), jnp.zeros((batch,), jnp.int32)
    run = jax.jit(functools.partial(step, CausalLM(config, dtype=jnp.float32)))
    return run(params, cache, seen, last, tokens, jnp.asarray(rows))[2]


def test_bf16_weights_are_refused_off_cpu_and_run_under_float32_activations_on_it(tiny_llama):
    from serving.engine.engine import check_weight_format, resolve_dtype, with_weight_quant

    check_weight_format("bf16", "cpu")
    check_weight_format("fp8", "gpu")
    with pytest.raises(ValueError, match="--weight-quant bf16 keeps float32 activations.*--dtype bfloat16 instead"):
        check_weight_format("bf16", "gpu")
    bf16_weights = with_weight_quant(ModelConfig.from_pretrained(str(tiny_llama)), "bf16")
    for name in ("auto", "bfloat16", "float32"):
        assert resolve_dtype(name, bf16_weights, "cpu") == jnp.float32
    assert resolve_dtype("bfloat16", ModelConfig.from_pretrained(str(tiny_llama)), "cpu") == jnp.bfloat16


def test_bf16_weights_are_the_cpus_format_for_bfloat16_and_under_auto_with_a_bf16_dot():
    """On CPU, --dtype bfloat16 means bfloat16 weights and KV pages under float32 activations (XLA:CPU's bfloat16
    arithmetic is up to 20x slower at one row); --dtype auto picks it for a bfloat16 checkpoint on a CPU with a
    bfloat16 dot instruction (AMX or AVX512-BF16)."""
    from serving.engine.engine import default_weight_format

    def checkpoint(dtype: str, blocks: str | None = None) -> ModelConfig:
        return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16, max_position_embeddings=64, torch_dtype=dtype,
                           checkpoint_blocks=blocks)

    assert default_weight_format("auto", checkpoint("bfloat16"), "cpu", bf16_dots=True) == "bf16"
    for dtype, dots in (("bfloat16", False), ("float32", True), ("float32", False)):
        assert default_weight_format("bfloat16", checkpoint(dtype), "cpu", bf16_dots=dots) == "bf16"
    for dtype, ckpt, platform, dots in (("auto", "bfloat16", "cpu", False),  # no bf16 dot: f32's products
                                         ("float32", "bfloat16", "cpu", True),  # asked for float32
                                         ("auto", "float32", "cpu", True),  # bf16 would round the weights
                                         ("auto", "bfloat16", "gpu", True),  # bf16 activations there
                                         ("bfloat16", "bfloat16", "gpu", True)):
        assert default_weight_format(dtype, checkpoint(ckpt), platform, bf16_dots=dots) is None
    # A GGUF file's own blocks, where its layers share one format: under float32, and under auto without a bf16 dot
    gguf = checkpoint("bfloat16", "q4_1")
    for dtype, dots in (("float32", True), ("float32", False), ("auto", False)):
        assert default_weight_format(dtype, gguf, "cpu", bf16_dots=dots) == "q4_1"
    for dtype in ("auto", "bfloat16"):
        assert default_weight_format(dtype, gguf, "cpu", bf16_dots=True) == "bf16"
    assert default_weight_format("auto", gguf, "gpu", bf16_dots=True) is None


def test_bf16_weights_store_the_kv_cache_in_bf16_too(tiny_llama):
    """The CPU's bf16 mode keeps its KV pages in bfloat16 (half the bytes a decode step reads, twice the pages in
    the same memory), decoded by the native kernel; quantized pages and every other weight format keep theirs.
    Greedy tokens of the tiny model stay float32 pages' tokens."""
    from serving import GenerationConfig, pipeline
    from serving.engine.engine import kv_page_dtype
    from tests.conftest import TINY_ENGINE_OPTIONS
    from xlkernels.kv_quant import BF16_BITS

    assert kv_page_dtype(jnp.float32, "bf16", None, "cpu") == BF16_BITS  # bfloat16, stored as its bits
    assert kv_page_dtype(jnp.bfloat16, None, None, "cpu") == BF16_BITS  # --dtype bfloat16 on CPU likewise
    f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
    assert kv_page_dtype(f32, None, None, "cpu") == kv_page_dtype(f32, "int8", None, "cpu") == f32
    assert kv_page_dtype(bf16, "fp8", None, "gpu") == kv_page_dtype(bf16, None, None, "gpu") == bf16  # Pallas
    assert kv_page_dtype(jnp.bfloat16, None, "int8", "cpu") == jnp.bfloat16  # quantized pages: their own format
    from model.llama import kv_bytes_per_token
    from serving.engine.engine import CPU_KV_CACHE_BYTES

    # A budget of 8.5 float32 pages (2 rows x 8 pages of a 128-token session could use 17).
    page_bytes = kv_bytes_per_token(ModelConfig.from_pretrained(str(tiny_llama)), jnp.float32) * 16
    options = dict(TINY_ENGINE_OPTIONS, decode_batch_buckets=(1, 2), prefill_row_buckets=(1,),
                   prefill_token_buckets=(16,), max_prefill_token_num=16, num_pages=None,
                   cache_max_entry_count=8.5 * page_bytes / CPU_KV_CACHE_BYTES)
    prompts, greedy = [[1, 5, 9, 11, 3] * 4, [2, 7, 4]], GenerationConfig(max_new_tokens=12, ignore_eos=True)
    results, pages = {}, {}
    for weight_quant in ("bf16", None):
        with pipeline(str(tiny_llama), **options, dtype="float32", weight_quant=weight_quant) as pipe:
            engine = pipe.engine
            k_pages = engine.runner.cache[0][0]
            assert k_pages.dtype == (BF16_BITS if weight_quant else jnp.float32)  # bf16, stored as its bits
            assert engine.quantization_name == ("bf16 weights, bf16 KV" if weight_quant else "")
            results[weight_quant] = [r.token_ids for r in pipe(prompts, greedy)]
            pages[weight_quant] = engine.num_pages
    assert pages == {"bf16": 17, None: 8}, pages  # the same budget, half the bytes a page
    assert results["bf16"] == results[None]


def test_scales_are_declared_with_their_weights_and_split_like_their_output_channels():
    config = dataclasses.replace(WIDE, weight_quant="int8")
    shardings = param_shardings(config, make_mesh(1))["layers_0"]
    for module, name in (("attn", "wqkv"), ("attn", "wo"), ("mlp", "w_gate_up"), ("mlp", "w_down")):
        spec = next(s for s in param_specs(config) if s.path == f"layers_0/{module}/{name}")
        assert shardings[module][name].spec == logical_to_spec(stored_shape(spec.axes, spec.in_dims))  # inputs last
        assert shardings[module][name + "_scale"].spec == logical_to_spec(spec.axes[spec.in_dims:])
    # Column-parallel weights split their scales; row-parallel ones (outputs: the embedding) replicate them.
    assert "tp" in str(shardings["mlp"]["w_gate_up_scale"].spec) and "tp" in str(shardings["attn"]["wqkv_scale"].spec)
    assert "tp" not in str(shardings["mlp"]["w_down_scale"].spec)
    unquantized = {s.path for s in param_specs(config) if not s.quant}
    assert {"embed/embedding", "lm_head/kernel", "layers_0/attn_norm/scale"} <= unquantized


def hf_fp8_checkpoint(source, target, block: int = 16):
    """`source` re-saved in Hugging Face's FP8 format: e4m3 matmul weights, one `weight_scale_inv` per
    block x block tile, `quantization_config` in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", name):
            rows, cols = -(-tensor.shape[0] // block), -(-tensor.shape[1] // block)
            padded = torch.zeros(rows * block, cols * block)
            padded[: tensor.shape[0], : tensor.shape[1]] = tensor.float()
            tiles = padded.reshape(rows, block, cols, block)
            scale = tiles.abs().amax(dim=(1, 3)) / 448
            quantized = (tiles / scale[:, None, :, None]).reshape(rows * block, cols * block)
            out[name] = quantized[: tensor.shape[0], : tensor.shape[1]].to(torch.float8_e4m3fn).contiguous()
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale
        else:
            out[name] = tensor
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_hugging_face_fp8_checkpoint_serves_as_fp8(tmp_path):
    from safetensors.torch import load_file

    source = make_llama_checkpoint(tmp_path / "bf16", vocab_size=96, hidden_size=64, intermediate_size=160)
    fp8 = hf_fp8_checkpoint(source, tmp_path / "fp8")
    # Each e4m3 weight is read back times its tile's scale, exactly as transformers dequantizes it.
    stored = load_file(fp8 / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tiles = stored[name.removesuffix("weight") + "weight_scale_inv"]
    want = stored[name].float() * tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)[:64, :160]
    tensors = fp8_checkpoint(checkpoint_tensors(fp8))
    assert not any(n.endswith("weight_scale_inv") for n in tensors)
    np.testing.assert_array_equal(tensors[name].read(), want.numpy())

    config = ModelConfig.from_pretrained(fp8)
    assert config.weight_quant == "fp8"
    params = load_params(fp8, config, jnp.float32)
    attn = params["layers_0"]["attn"]
    assert attn["wqkv"].dtype == jnp.uint8 and attn["wqkv_scale"].shape == attn["wqkv"].shape[:-1]  # inputs last
    # Against the bf16 model it came from: fp8's rounding, twice (tiles, then channels). A random tiny
    # model amplifies it (from the bf16 weights directly, per channel: 11% of the largest logit).
    plain = dataclasses.replace(config, weight_quant=None)
    want = forward(load_params(source, plain, jnp.float32), plain)
    assert float(jnp.abs(forward(params, config) - want).max()) < 0.25 * float(jnp.abs(want).max())


def forward(params, config: ModelConfig) -> jax.Array:
    """All-position logits of a fixed 12-token prompt (one row, one page table)."""
    from model.llama import AttentionBatch

    tokens = (jnp.arange(12, dtype=jnp.int32)[None] * 7) % config.vocab_size
    batch = AttentionBatch(positions=jnp.arange(12, dtype=jnp.int32)[None], valid=jnp.ones((1, 12), bool),
                           kv_lens=jnp.array([12], jnp.int32), block_tables=jnp.array([[1]], jnp.int32))
    logits, _ = CausalLM(config, dtype=jnp.float32).apply({"params": params}, tokens, batch,
                                                          empty_cache(config, 2, 16, jnp.float32))
    return logits


def test_other_checkpoint_quantizations_are_refused_by_name(tmp_path):
    source = make_llama_checkpoint(tmp_path / "gptq", vocab_size=96, hidden_size=64, intermediate_size=160)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        ModelConfig.from_pretrained(source)


def test_an_int8_lm_head_is_declared_with_scales_per_vocabulary_row_and_keeps_the_logits_close():
    """--lm-head-quant int8: the head's values [V, E] in int8 with f32 scales split like the vocabulary; the step's
    logits (f32, not rounded to the activations' dtype) within int8's rounding of the float head's, with the same
    top token for every row; tied heads and the CPU's weight formats are refused by name."""
    config = dataclasses.replace(WIDE, num_layers=1)
    quantized = dataclasses.replace(config, head_quant="int8")
    head = {s.path: s for s in param_specs(quantized)}["lm_head/kernel"]
    assert head.quant == "int8" and head.in_dims == 1
    assert [leaf[1:] for leaf in head.leaves(np.dtype(np.float32))] == [
        ((256, 1024), ("vocab", "embed"), np.dtype(np.int8)), ((256,), ("vocab",), np.dtype(np.float32))]
    params = init_random_params(config, jnp.float32, 0)
    values, scale = quantize_weight(params["lm_head"]["kernel"], "int8", 1)
    head_params = {**params, "lm_head": {"kernel": values, "kernel" + SCALE_SUFFIX: scale}}
    tokens = jnp.arange(4, dtype=jnp.int32)[:, None] * 7
    got, want = forward_logits(quantized, head_params, tokens), forward_logits(config, params, tokens)
    assert got.dtype == jnp.float32 and got.shape == want.shape == (4, 256)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.02 * float(jnp.abs(want).max()))
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))
    with pytest.raises(ValueError, match="ties its head to the token embedding"):
        dataclasses.replace(config, tie_word_embeddings=True, head_quant="int8")
    with pytest.raises(ValueError, match="not --weight-quant bf16"):
        dataclasses.replace(config, weight_quant="bf16", head_quant="int8")
    with pytest.raises(ValueError, match="head_quant must be one of int8"):
        dataclasses.replace(config, head_quant="fp8")


def test_an_engine_serves_an_int8_head_on_one_device_only(tiny_llama):
    """Through the engine (`--lm-head-quant int8` under fp8 layers): greedy tokens come out, and the head's values
    are int8; with --tp 2 the option is refused before anything loads."""
    from serving import GenerationConfig, pipeline
    from serving.engine.config import EngineConfig
    from serving.request import InvalidRequestError
    from tests.conftest import TINY_ENGINE_OPTIONS

    with pipeline(str(tiny_llama), **TINY_ENGINE_OPTIONS, weight_quant="fp8", lm_head_quant="int8") as pipe:
        assert pipe.engine.runner.params["lm_head"]["kernel"].dtype == jnp.int8
        out = pipe([[3, 5, 7]], GenerationConfig(max_new_tokens=6, ignore_eos=True, do_sample=False))
        assert len(out[0].token_ids) == 6
    with pytest.raises(InvalidRequestError, match="lm_head_quant is not served with --tp above 1"):
        EngineConfig(lm_head_quant="int8", tp=2)
