"""The engine's step with the Pallas kernels lowers for CUDA, on a CPU.

Interpret mode, which runs the Pallas kernels in every other CPU test, accepts programs that Triton's
lowering refuses: a chain of ref indexers in the quantized-KV kernels passed every CPU test and failed every
quantized-KV run on the H100. Lowering needs no GPU (only compiling does), so the step the engine runs on a
GPU is lowered here with every KV page format and weight format, for decode, prefill and a shared-prefix
decode step: the kernels as the model calls them, the Pallas RMSNorm and the cache writes with them.
What only Triton's compiler sees (register pressure, unsupported conversions) still needs the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig
from model.llama import CausalLM, empty_cache
from model.loader import init_random_params
from model.weight_quant import NATIVE_FP8_MIN_ROWS, target_platform
from serving.engine.runner import ROW_FIELDS, step
from xlkernels.kv_quant import quantize_pages
from xlkernels.pallas_decode import paged_decode_attention

CONFIG = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=256)
NUM_SLOTS, PAGES_PER_SEQ = 4, 4


def lower_step_for_cuda(config: ModelConfig, params: dict, kv_format: str | None, rows: int, tokens: int,
                        shared_prefix: bool = False, packed: int | None = None, decode: int = 0) -> str:
    """The step's StableHLO, lowered for CUDA from abstract inputs (nothing is allocated or run)."""
    cache = jax.eval_shape(lambda: empty_cache(config, 8, 16, jnp.bfloat16, kv_format=kv_format))
    seen = jax.ShapeDtypeStruct((NUM_SLOTS, config.vocab_size), jnp.bool_)
    last = jax.ShapeDtypeStruct((NUM_SLOTS,), jnp.int32)
    token_grid = jax.ShapeDtypeStruct((rows, tokens), jnp.int32)
    row_table = jax.ShapeDtypeStruct((rows, ROW_FIELDS.width + PAGES_PER_SEQ), jnp.int32)
    model = CausalLM(config, dtype=jnp.bfloat16, attention_backend="pallas")
    run = jax.jit(functools.partial(step, model, shared_prefix=shared_prefix, packed=packed, decode=decode))
    return run.trace(params, cache, seen, last, token_grid, row_table).lower(lowering_platforms=("cuda",)).as_text()


def lower_gpu_step(config: ModelConfig, kv_format: str | None, rows: int, tokens: int, **step_options) -> str:
    """`lower_step_for_cuda` with the weights and matmuls a GPU has (fp8 stored as e4m3, not the CPU's bytes)."""
    with target_platform("cuda"):
        params = jax.eval_shape(lambda: init_random_params(config, jnp.bfloat16, 0))
        return lower_step_for_cuda(config, params, kv_format, rows, tokens, **step_options)


def triton_calls(text: str) -> int:
    """Pallas kernels (Triton custom calls) in lowered StableHLO."""
    return text.count("custom_call @__gpu$xla.gpu.triton")


@pytest.mark.parametrize("kv_format", [None, "int8", "int4", "fp8"])
@pytest.mark.parametrize("weight_quant", [None, "int8", "fp8"])
def test_decode_and_prefill_steps_lower_for_gpus(kv_format, weight_quant):
    config = dataclasses.replace(CONFIG, weight_quant=weight_quant)
    for rows, tokens in ((2, 1), (2, 16)):  # the decode kernel, the prefill kernel
        text = lower_gpu_step(config, kv_format, rows, tokens)
        assert triton_calls(text) >= config.num_layers  # an attention kernel a layer at least, not an XLA fallback


def test_a_large_fp8_step_runs_its_layers_matmuls_in_fp8_and_a_small_one_converts_the_weights():
    """fp8 weights on a GPU: from NATIVE_FP8_MIN_ROWS tokens a step's four matmuls a layer are fp8 x fp8 dots
    (Hopper's fp8 GEMM); a one-row decode step's convert the weight inside a bf16 dot instead."""
    config = dataclasses.replace(CONFIG, weight_quant="fp8")
    fp8_dots = {rows: len(re.findall(r"dot_general.*\(tensor<[0-9x]+xf8E4M3FN>, tensor<[0-9x]+xf8E4M3FN>\)",
                                     lower_gpu_step(config, None, rows, 1)))
                for rows in (1, NATIVE_FP8_MIN_ROWS)}
    assert fp8_dots == {1: 0, NATIVE_FP8_MIN_ROWS: 4 * config.num_layers}


@pytest.mark.parametrize("kv_format", [None, "int8"])
def test_a_mixed_step_lowers_with_the_decode_and_the_prefill_kernel(kv_format):
    """A mixed step (4 decoding rows beside packed prompt rows of 16) runs the decode kernel on its decoding
    rows and the prefill kernel on its prompt rows."""
    def kernels(**shape) -> set[str]:
        return set(re.findall(r'name = "xlserve_paged_(decode|prefill)', lower_gpu_step(CONFIG, kv_format, **shape)))

    assert kernels(rows=8, tokens=16, packed=4 + 32, decode=4) == {"decode", "prefill"}
    assert kernels(rows=4, tokens=16, packed=32) == {"prefill"}


@pytest.mark.parametrize("kv_format", [None, "int8"])
def test_plain_pages_take_the_rotation_and_the_cache_writes_in_one_kernel_a_layer(kv_format):
    """xlkernels.pallas_rope_kv: a decode or prefill step over bf16 pages turns q and k and writes k and v in one
    kernel a layer (no page scatter left); quantized pages (and packed steps) keep XLA's rotation and scatters."""
    def fused_kernels_and_page_scatters(**shape) -> tuple[int, int]:
        text = lower_gpu_step(CONFIG, kv_format, **shape)
        assert text.count('name = "xlserve_rope_write"') <= 1  # one kernel, in the jitted function each layer calls
        # A page write scatters [Hkv, tokens, D] rows into [Hkv, P, PS, D] at (page, slot): dims 1 and 2.
        page_scatters = re.findall(r'stablehlo.scatter"\([^)]*\) <\{[^}]*inserted_window_dims = \[1, 2\]', text)
        return text.count("call @rope_write_pallas("), len(page_scatters)

    layers = CONFIG.num_layers
    for shape in (dict(rows=2, tokens=1), dict(rows=2, tokens=16)):
        assert fused_kernels_and_page_scatters(**shape) == ((layers, 0) if kv_format is None else (0, 2 * layers))
    assert fused_kernels_and_page_scatters(rows=4, tokens=16, packed=32) == (0, 2 * layers)


@pytest.mark.parametrize("kv_format", [None, "int8", "int4", "fp8"])
def test_a_shared_prefix_decode_step_lowers_for_gpus(kv_format):
    text = lower_gpu_step(CONFIG, kv_format, rows=8, tokens=1, shared_prefix=True)
    assert triton_calls(text) >= CONFIG.num_layers


def lowered_decode_kernel(rows: int, page_size: int, kv_format: str | None) -> str:
    """The decode kernel lowered for CUDA: `rows` rows, 8 query and 2 KV heads of 64, one-page tables (one split
    a row, so the kernel is the program's only one: no merge)."""
    pages = jax.eval_shape(lambda: quantize_pages(jnp.zeros((2, 8, page_size, 64), jnp.bfloat16), kv_format))
    q = jax.ShapeDtypeStruct((rows, 1, 8, 64), jnp.bfloat16)
    tables, positions = jax.ShapeDtypeStruct((rows, 1), jnp.int32), jax.ShapeDtypeStruct((rows, 1), jnp.int32)
    lens = jax.ShapeDtypeStruct((rows,), jnp.int32)
    traced = paged_decode_attention.trace(q, pages, pages, tables, positions, lens, scale=0.125)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("page_size, kv_format, warps", [(64, None, 4), (64, "fp8", 1), (64, "int8", 1),
                                                         (16, "fp8", 4)])
def test_the_decode_kernel_runs_one_warp_a_program_over_quantized_one_page_blocks(page_size, kv_format, warps):
    """`default_num_warps`: one warp over quantized pages read a page a block (64-token pages), four otherwise."""
    text = lowered_decode_kernel(4, page_size, kv_format)
    assert re.findall(r"num_warps = (\d+)", text) == [str(warps)]


@pytest.mark.parametrize("rows, kv_format, stages", [(4, None, 3), (511, None, 3), (512, None, 1), (512, "fp8", 3)])
def test_the_decode_kernel_runs_one_pipeline_stage_over_bf16_pages_in_a_full_grid(rows, kv_format, stages):
    """`default_num_stages`: one stage over bf16 pages once the grid has STAGES_ONE_MIN_PROGRAMS programs (here
    rows x 2 KV heads x one split), three below it and over quantized pages."""
    text = lowered_decode_kernel(rows, 64, kv_format)
    assert re.findall(r"num_stages = (\d+)", text) == [str(stages)]


def test_an_int8_head_is_reduced_at_one_row_and_converted_block_by_block_in_fp8_layers_native_steps():
    """--lm-head-quant int8 under fp8 layers: at one row the head's product is a reduction over its int8 values
    (no dot); from NATIVE_FP8_MIN_ROWS rows the step compiles without Triton's GEMMs, where XLA could not fuse the
    convert into the dot, so the head converts one block of GPU_BLOCK_ELEMENTS at a time in a loop (never a bf16
    copy of the whole head); in between, the convert is an operand of the dot, which Triton's GEMM fuses."""
    config = dataclasses.replace(CONFIG, vocab_size=65536, hidden_size=1024, weight_quant="fp8", head_quant="int8")

    def head_converts_and_dots(rows: int) -> tuple[set[str], set[str]]:
        text = lower_gpu_step(config, None, rows=rows, tokens=1)
        converts = set(re.findall(r"\(tensor<(\d+)x1024xi8>\) -> tensor<\d+x1024x(?:bf16|f32)>", text))
        dots = set(re.findall(r"dot_general.*\(tensor<[0-9x]+xbf16>, tensor<(\d+)x1024xbf16>\)", text))
        return converts, dots

    assert head_converts_and_dots(1) == ({"65536"}, set())
    assert head_converts_and_dots(4) == ({"65536"}, {"65536"})
    assert head_converts_and_dots(NATIVE_FP8_MIN_ROWS) == ({"32768"}, {"32768"})


@pytest.mark.parametrize("weight_quant, warps", [(None, {"4"}), ("fp8", {"4", "8"})])
def test_the_add_rms_norm_kernel_runs_eight_warps_over_a_quantized_products_sums(weight_quant, warps):
    """`pallas_rms_norm.SCALED_NUM_WARPS`: in a one-row step over quantized weights the norms after wo and w_down
    read those products' f32 sums and scales (`Scaled`) with 8 warps; the first layer's norm (no delta) and
    every norm over bf16 weights run 4."""
    text = lower_gpu_step(dataclasses.replace(CONFIG, weight_quant=weight_quant), None, rows=1, tokens=1)
    assert set(re.findall(r'name = "xlserve_add_rms_norm", num_stages = 1 : i32, num_warps = (\d+)', text)) == warps
