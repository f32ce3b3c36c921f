"""Quantized KV pages (`--quant-policy`): the cache write, the page budget, every attention path over
quantized pages (XLA, the reference, and the Pallas kernels in interpret mode; test_gpu_lowering.py lowers
them for CUDA), and an engine on int4 pages (prefix caching and preemption give the tokens a fresh
computation gives).

Two comparisons per path. Against the reference over the *same* quantized pages the kernels must agree to
float rounding: they dequantize through the scores and probabilities, the reference element by element.
Against the reference over the unquantized pages the error is the format's own, bounded here (unit-variance
random keys and values, so these are worst cases: real keys are smoother):
    int8  max |out - out_f32| < 0.03     int4  < 0.5     fp8  < 0.12
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.llama import kv_bytes_per_token
from serving import pipeline
from serving.request import GenerationConfig
from tests.conftest import TINY_ENGINE_OPTIONS
from tests.test_kernels_pallas import make_problem, make_shared_problem, reference_f32
from xlkernels import paged_attention_reference, paged_attention_xla
from xlkernels.kv_quant import (
    KV_FORMATS,
    QuantizedPages,
    as_float,
    dequantize,
    kv_format,
    quantize,
    quantize_pages,
    write_tokens,
)
from xlkernels.pallas_decode import paged_decode_attention
from xlkernels.pallas_prefill import paged_prefill_attention
from xlkernels.pallas_shared_prefix import shared_prefix_decode_attention
from xlkernels.shared_prefix import SharedPrefix, plan_shared_prefix

KINDS = ["int8", "int4", "fp8"]
FORMAT_ERROR = {"int8": 0.03, "int4": 0.5, "fp8": 0.12}  # max |out - out of unquantized pages|, see docstring
SAME_PAGES_TOLERANCE = 2e-5  # f32 kernels vs the reference over the same quantized pages


def test_policies_are_lmdeploys_values():
    assert [kv_format(p) for p in ("0", "8", "4", "fp8")] == [None, "int8", "int4", "fp8"]
    assert kv_format(8) == "int8"
    assert set(KV_FORMATS) == {"0", "4", "8", "fp8"}
    with pytest.raises(ValueError, match="quant_policy"):
        kv_format("16")


@pytest.mark.parametrize("kind", KINDS)
def test_per_token_scales_bound_the_rounding_error(kind):
    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32) * np.array([0.01, 1, 300])[:, None,
                                                                                                            None]
    values, scale = quantize(jnp.asarray(x), kind)
    assert scale.shape == (3, 5) and scale.dtype == jnp.bfloat16
    back = np.asarray(values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None])
    amax = np.abs(x).max(-1, keepdims=True)
    # Half a step of the grid (amax / qmax) for the integers; fp8 keeps 3 mantissa bits: 1/16 relative.
    bound = {"int8": amax / 127 / 2, "int4": amax / 7 / 2, "fp8": np.abs(x) / 16 + amax / 448 / 2**9}[kind]
    assert (np.abs(back - x) <= bound * 1.01 + 1e-12).all()
    zeros, zero_scale = quantize(jnp.zeros((2, 8)), kind)  # a zero vector: scale 0, no NaN
    assert not np.asarray(zeros.astype(jnp.float32)).any() and not np.asarray(zero_scale).any()


def test_int4_tokens_sharing_a_byte_survive_one_step_and_separate_steps():
    """Token t and t + PS/2 of a page share each byte: written together (one prefill chunk) or one per step
    (decode), both nibbles must hold their own token."""
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.standard_normal((2, 3, 8, 16)), jnp.float32)  # Hkv 2, 3 pages of 8 tokens
    at_once = quantize_pages(pages, "int4")
    assert isinstance(at_once, QuantizedPages) and at_once.data.shape == (2, 3, 4, 16) and at_once.shape == pages.shape
    one_by_one = quantize_pages(jnp.zeros_like(pages), "int4")
    for token in np.random.default_rng(2).permutation(24):
        page, offset = divmod(int(token), 8)
        one_by_one = write_tokens(one_by_one, pages[:, page, offset][:, None], jnp.array([page]), jnp.array([offset]))
    np.testing.assert_array_equal(np.asarray(dequantize(one_by_one)), np.asarray(dequantize(at_once)))
    np.testing.assert_allclose(np.asarray(dequantize(at_once)), np.asarray(pages), atol=np.abs(pages).max() / 7)
    dropped = write_tokens(at_once, pages[:, 0, :1] * 5, jnp.array([3]), jnp.array([0]))  # page 3: out of range
    np.testing.assert_array_equal(np.asarray(dropped.data), np.asarray(at_once.data))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_same_memory_holds_twice_the_pages_with_int8_and_four_times_with_int4(head_dim):
    """Bytes per token, scales included, against bf16 pages: the KV budget divides by these."""
    config = ModelConfig(vocab_size=32, hidden_size=8 * head_dim, intermediate_size=64, num_layers=3, num_heads=8,
                         num_kv_heads=2, head_dim=head_dim, max_position_embeddings=64)
    bf16 = kv_bytes_per_token(config, jnp.bfloat16)
    budget, page_size = 1 << 30, 64
    pages = {kind: budget // (kv_bytes_per_token(config, jnp.bfloat16, kind) * page_size) for kind in KINDS}
    base = budget // (bf16 * page_size)
    assert pages["int8"] / base >= 1.9 and pages["fp8"] == pages["int8"]  # 2 bytes of scale per D (+2) bytes
    assert pages["int4"] / base >= 3.7
    assert kv_bytes_per_token(config, jnp.bfloat16, "int8") == 2 * 3 * 2 * (head_dim + 2)


def quantized(args: tuple, kind: str) -> tuple:
    q, k_pages, v_pages, *rest = args
    return (q, quantize_pages(k_pages, kind), quantize_pages(v_pages, kind), *rest)


def check_quantized(out, args: tuple, qargs: tuple, real: np.ndarray, kind: str) -> None:
    """`out` (attention over the quantized pages `qargs`) against the reference over the same pages, and
    within the format's error of the reference over the unquantized pages `args`."""
    scale = args[0].shape[-1] ** -0.5
    got = np.asarray(out.astype(jnp.float32))[real]
    same = np.asarray(paged_attention_reference(*qargs, scale=scale))[real]
    np.testing.assert_allclose(got, same, atol=SAME_PAGES_TOLERANCE, rtol=SAME_PAGES_TOLERANCE)
    assert np.abs(got - reference_f32(args, scale)[real]).max() < FORMAT_ERROR[kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_q", [1, 5])
def test_xla_attention_over_quantized_pages(kind, num_q):
    args, real = make_problem(0, starts=[0, 7, 22, -1], num_q=num_q, num_heads=8, num_kv_heads=2, head_dim=64,
                              page_size=8, pages_per_seq=4, dtype=jnp.float32)
    qargs = quantized(args, kind)
    out = paged_attention_xla(*qargs, scale=64**-0.5, chunk_tokens=16)
    check_quantized(out, args, qargs, real, kind)


def decode_case() -> tuple:
    """(args, real rows, call) of the decode kernel's problem; `call(*args, interpret=...)` runs it."""
    args, real = make_problem(1, starts=[31, 2, 9, -1], num_q=1, num_heads=16, num_kv_heads=4, head_dim=64,
                              page_size=8, pages_per_seq=8, dtype=jnp.float32)
    return args, real, functools.partial(paged_decode_attention, scale=64**-0.5, k_splits=2, pages_per_block=2)


def prefill_case() -> tuple:
    args, real = make_problem(3, starts=[3, 16, -1], num_q=5, num_heads=8, num_kv_heads=2, head_dim=64, page_size=8,
                              pages_per_seq=4, dtype=jnp.float32)
    return args, real, functools.partial(paged_prefill_attention, scale=64**-0.5, pages_per_block=2)


def shared_prefix_case() -> tuple:
    args, real = make_shared_problem(6, [(6, 3)], 1, 8, 2, 64, 8, 6, jnp.float32)
    tables, lens = np.asarray(args[3]), np.asarray(args[5])
    plan = plan_shared_prefix(tables[real], lens[real], page_size=8, tile_size=4, max_tiles=2)
    padding = (np.array([2], np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32))
    plan = [jnp.asarray(np.concatenate([part, pad])) for part, pad in zip(plan, padding, strict=True)]
    shared = SharedPrefix.from_rows(*plan, num_tiles=2, tile_size=4)
    assert int((np.asarray(shared.tile_len) > 0).sum()) >= 1, "the case must exercise the prefix pass"
    return args, real, lambda *a, **kw: shared_prefix_decode_attention(*a, shared, scale=64**-0.5, **kw)


PALLAS_CASES = {"decode": decode_case, "prefill": prefill_case, "shared_prefix": shared_prefix_case}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", PALLAS_CASES)
def test_pallas_kernels_over_quantized_pages(kernel, kind):
    args, real, call = PALLAS_CASES[kernel]()
    qargs = quantized(args, kind)
    check_quantized(call(*qargs, interpret=True), args, qargs, real, kind)


def test_a_plain_pool_passes_through():
    pages = jnp.ones((1, 2, 4, 8))
    assert quantize_pages(pages, None) is pages and as_float(pages) is pages
    assert dataclasses.is_dataclass(quantize_pages(pages, "fp8"))


@pytest.fixture(scope="module")
def int4_pipe(tiny_llama):
    """The tiny model serving int4 pages (the read-modify-write cache path) from 24 pages of 16 tokens, in two
    step shapes: decode 8 rows, prefill 2 rows of 64 tokens (its prompts are 40 tokens)."""
    options = dict(TINY_ENGINE_OPTIONS, decode_batch_buckets=(8,), prefill_row_buckets=(2,),
                   prefill_token_buckets=(64,), quant_policy="4")
    pipe = pipeline(str(tiny_llama), **options)
    yield pipe
    pipe.close()


def generate(engine, prompt: list[int], request_id: str) -> tuple[list[int], int]:
    """Greedy tokens of one request and the prompt tokens it took from the prefix cache."""
    tokens, cached, done = [], [0], threading.Event()

    def sink(out):
        tokens.extend(out.new_token_ids)
        cached[0] = max(cached[0], out.num_cached_tokens)
        if out.finished:
            done.set()

    engine.submit(engine.make_request(prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True), request_id), sink)
    assert done.wait(60)
    return tokens, cached[0]


def test_prefix_caching_and_preemption_are_unchanged_over_int4_pages(int4_pipe):
    """A page is quantized token by token when written, so reusing a cached page, or recomputing a
    preempted sequence into other pages, gives the same tokens as computing it afresh."""
    engine = int4_pipe.engine
    assert engine.kv_format == "int4" and engine.quantization_name == "int4 KV"
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 500, 40).tolist()  # two full pages of 16, then 8 tokens
    first, cached_first = generate(engine, prompt, "int4-first")
    again, cached_again = generate(engine, prompt, "int4-again")
    assert cached_first == 0 and cached_again == 32 and again == first

    prompts = [rng.integers(3, 500, 40).tolist() for _ in range(8)]  # 8 x (40 + 40) tokens > 24 pages
    greedy = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    solo = [int4_pipe(p, greedy).token_ids for p in prompts]
    before = engine.scheduler.num_preemptions
    together = int4_pipe(prompts, [greedy] * 8)
    assert engine.scheduler.num_preemptions > before, "the test must actually preempt"
    assert [r.token_ids for r in together] == solo
