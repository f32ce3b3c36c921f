"""Our Flax decoder over the paged cache against transformers' PyTorch models, family by family.

Each variant is a tiny random checkpoint in one family's exact Hugging Face layout; the oracle is
transformers' own class for that family. InternLM2 has none (its modelling code ships with the
checkpoint and is never run), so its checkpoint is converted from a transformers Llama, which is then
its oracle. Logits must match at every position of chunked prefill and decode, and greedy generation
must give the same tokens as `generate`.

Dynamic NTK RoPE changes its frequencies with the sequence's length at each forward, and keys already
cached keep theirs, so its oracle runs the same calls as we do (two prompt chunks, then one token at a
time) over transformers' KV cache, across the trained length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM, empty_cache
from model.loader import load_params
from tests.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow  # the long tier: `pytest -m "not slow"` leaves it out

PAGE_SIZE = 4
NUM_TOKENS = 23
# A prompt of 14 in two chunks of 7, each crossing page boundaries and ending mid-page (the second starts
# mid-page): chunks of one length and single tokens are two programs to compile per variant, not three.
PROMPT_CHUNKS = [(0, 7), (7, 14)]
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}

VARIANTS = {
    # name: (family, checkpoint options, dtype, absolute logit tolerance)
    "llama-f32-gqa2-untied": ("llama", dict(num_heads=4, num_kv_heads=2), "float32", 2e-4),
    "llama-f32-mha-tied-odd-vocab": ("llama", dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True,
                                                   vocab_size=251), "float32", 2e-4),
    "llama-f32-mqa-bias": ("llama", dict(num_heads=4, num_kv_heads=1, attention_bias=True, mlp_bias=True),
                           "float32", 2e-4),
    "llama-f32-llama3-rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32}),
                              "float32", 2e-4),
    "llama-f32-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "float32", 2e-4),
    "llama-f32-dynamic-rope": ("llama", dict(rope_scaling=DYNAMIC, max_position_embeddings=16), "float32", 2e-4),
    "llama-bf16": ("llama", dict(torch_dtype="bfloat16"), "bfloat16", 0.08),
    "mistral-f32": ("mistral", dict(num_heads=4, num_kv_heads=1, rope_theta=1e6), "float32", 2e-4),
    # Qwen2.5-0.5B's shape in small: q/k/v biased, o not, tied embeddings, a window its layers do not use
    "qwen2-f32-tied": ("qwen2", dict(tie_word_embeddings=True, sliding_window=32, use_sliding_window=False),
                       "float32", 2e-4),
    "qwen3-f32-qknorm": ("qwen3", dict(head_dim=32, num_heads=4, num_kv_heads=2), "float32", 2e-4),
    "qwen3-bf16-bias": ("qwen3", dict(head_dim=32, attention_bias=True, torch_dtype="bfloat16"), "bfloat16", 0.08),
    # InternLM2.5's RoPE (dynamic NTK, top-level rope_scaling.type) and biased packed wqkv, GQA 4/2
    "internlm2-f32-dynamic-bias": ("internlm2", dict(rope_scaling=DYNAMIC, max_position_embeddings=16,
                                                     attention_bias=True, rope_theta=1e6), "float32", 2e-4),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    family, options, dtype, atol = VARIANTS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), family, **options)
    oracle = path / "llama-oracle" if family == "internlm2" else path
    torch_dtype = getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch_dtype).eval()
    config = ModelConfig.from_pretrained(path)
    assert config.family == family
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


def transformers_logits(hf, tokens, calls):
    """transformers' logits for `tokens`, run as the given (start, end) forwards over its KV cache."""
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        return np.concatenate([
            hf(torch.tensor([tokens[start:end]]), cache=cache, use_cache=True).logits[0].float().numpy()
            for start, end in calls
        ])


def test_prefill_chunks_and_decode_steps_match_transformers(variant):
    config, params, hf, dtype, atol = variant
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, size=NUM_TOKENS).tolist()
    calls = PROMPT_CHUNKS + [(i, i + 1) for i in range(PROMPT_CHUNKS[-1][1], NUM_TOKENS)]
    # One forward over all tokens is the stronger oracle (chunking must not matter), except for
    # dynamic NTK, where the frequencies depend on each forward's length by design.
    dynamic = config.rope.rope_type == "dynamic"
    want = transformers_logits(hf, tokens, calls if dynamic else [(0, NUM_TOKENS)])

    model = CausalLM(config, dtype=dtype)
    cache = empty_cache(config, num_pages=16, page_size=PAGE_SIZE, dtype=dtype)
    table = [9, 3, 12, 5, 1, 7, 14, 2]  # scattered pages: the cache is really paged
    got = []
    for start, end in calls:
        logits, cache = run_chunk(model, params, cache, tokens[start:end], start, table)
        got.append(logits)
    got = np.concatenate(got)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if dtype == jnp.float32 else 0.9)


# bf16 rounding differs between XLA and torch, so greedy paths may part on near-ties: f32 variants only.
@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if VARIANTS[v][2] == "float32"), indirect=True)
def test_greedy_generation_matches_transformers(variant):
    config, params, hf, dtype, _ = variant
    prompt = np.random.default_rng(2).integers(0, config.vocab_size, size=PROMPT_CHUNKS[-1][1]).tolist()
    new_tokens = NUM_TOKENS - len(prompt)
    # An EOS id outside the vocabulary: the random model may well pick a real one, and both must then
    # carry on alike.
    greedy = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=config.vocab_size,
                              pad_token_id=0)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt):].tolist()

    model = CausalLM(config, dtype=dtype)
    cache = empty_cache(config, num_pages=16, page_size=PAGE_SIZE, dtype=dtype)
    table = [2, 4, 6, 8, 10, 12, 14, 15]
    for start, end in PROMPT_CHUNKS:
        logits, cache = run_chunk(model, params, cache, prompt[start:end], start, table)
    got = [int(logits[-1].argmax())]
    while len(got) < new_tokens:
        logits, cache = run_chunk(model, params, cache, got[-1:], len(prompt) + len(got) - 1, table)
        got.append(int(logits[-1].argmax()))
    assert got == want
