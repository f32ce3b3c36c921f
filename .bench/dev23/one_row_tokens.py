"""Greedy tokens of a tiny llama with fp8 weights computed as on a GPU, one row at a time (the 'reduce' path)."""
import sys, tempfile
from pathlib import Path
import jax.numpy as jnp, numpy as np
from tools.quant_quality import Variant, greedy_tokens
from serving.engine.engine import with_weight_quant
from model.loader import load_params
from model.config import ModelConfig
from tests.checkpoints import make_checkpoint
with tempfile.TemporaryDirectory() as scratch:
    path = make_checkpoint(Path(scratch) / "llama", "llama", vocab_size=512, max_position_embeddings=256)
    variant = Variant.parse("w-fp8-gpu")
    with variant.arithmetic():
        config = with_weight_quant(ModelConfig.from_pretrained(path), "fp8")
        params = load_params(path, config, jnp.dtype(jnp.bfloat16))
        prompt = np.random.default_rng(0).integers(0, 512, 20).tolist()
        print(greedy_tokens(config, params, None, variant, [prompt], 64, "bfloat16"))
