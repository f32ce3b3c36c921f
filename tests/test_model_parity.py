"""Our Flax decoder over the paged cache against transformers' PyTorch Llama: logits at every step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM, empty_cache
from model.loader import load_params
from tests.checkpoints import make_llama_checkpoint

PAGE_SIZE = 4

VARIANTS = {
    # name: (checkpoint options, dtype, absolute logit tolerance)
    "f32-gqa2-untied": (dict(num_heads=4, num_kv_heads=2), "float32", 2e-4),
    "f32-mha-tied-odd-vocab": (dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True, vocab_size=251),
                               "float32", 2e-4),
    "f32-mqa-bias": (dict(num_heads=4, num_kv_heads=1, attention_bias=True, mlp_bias=True), "float32", 2e-4),
    "f32-llama3-rope": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
                        "float32", 2e-4),
    "f32-linear-rope": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "float32", 2e-4),
    "bf16": (dict(torch_dtype="bfloat16"), "bfloat16", 0.08),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    options, dtype, atol = VARIANTS[request.param]
    path = make_llama_checkpoint(tmp_path_factory.mktemp(request.param), **options)
    torch_dtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    config = ModelConfig.from_pretrained(path)
    params = load_params(path, config, getattr(jnp, dtype))
    return config, params, hf, getattr(jnp, dtype), atol


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens, batch, cache):
    return model.apply({"params": params}, tokens, batch, cache)


def run_chunk(model, params, cache, tokens, start, table):
    """Run one row of `tokens` starting at position `start`; returns (logits [T, V], cache)."""
    n = len(tokens)
    batch = AttentionBatch(
        positions=jnp.arange(start, start + n, dtype=jnp.int32)[None],
        valid=jnp.ones((1, n), bool),
        kv_lens=jnp.asarray([start + n], jnp.int32),
        block_tables=jnp.asarray([table], jnp.int32),
    )
    logits, cache = forward(model, params, jnp.asarray([tokens], jnp.int32), batch, cache)
    return np.asarray(logits[0]), cache


def test_prefill_chunks_and_decode_steps_match_transformers(variant):
    config, params, hf, dtype, atol = variant
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=23).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0].float().numpy()

    model = CausalLM(config, dtype=dtype)
    cache = empty_cache(config, num_pages=16, page_size=PAGE_SIZE, dtype=dtype)
    table = [9, 3, 12, 5, 1, 7, 14, 2]  # scattered pages: the cache is really paged
    # A prompt of 13 in two chunks (7 + 6, crossing page boundaries), then 10 single-token decode steps.
    got = []
    for start, end in [(0, 7), (7, 13)] + [(i, i + 1) for i in range(13, 23)]:
        logits, cache = run_chunk(model, params, cache, tokens[start:end], start, table)
        got.append(logits)
    got = np.concatenate(got)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if dtype == jnp.float32 else 0.9)
