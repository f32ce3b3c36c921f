"""Tiny random Hugging Face checkpoints, written by transformers itself, for tests to load and compare.

`make_llama_checkpoint` saves a `LlamaForCausalLM` with a fixed seed; `llama_checkpoint_fixture` wraps
it as a session-scoped pytest fixture (`tiny_llama = llama_checkpoint_fixture(num_layers=1)` in a test
module). `rewrite_rope_format` turns a saved config.json into each RoPE style found in the wild.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest

# The three ways a config.json spells RoPE:
#   "rope_parameters"   transformers 5: {"rope_parameters": {"rope_type": ..., "rope_theta": ..., ...}}
#   "rope_scaling"      published ones (Llama 3.1, Qwen2.5): top-level rope_theta, rope_scaling.rope_type
#   "rope_scaling_type" older ones (Llama 2 era): top-level rope_theta, rope_scaling.type
RopeStyle = Literal["rope_parameters", "rope_scaling", "rope_scaling_type"]
ROPE_STYLES: tuple[RopeStyle, ...] = ("rope_parameters", "rope_scaling", "rope_scaling_type")

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
# generation_config.json adds an end-of-turn id and sampling defaults, as Llama 3 Instruct's does
GENERATION_CONFIG = {
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": [EOS_TOKEN_ID, 3],
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
}


def make_llama_checkpoint(
    directory: str | Path,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 96,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    torch_dtype: str = "float32",
    max_position_embeddings: int = 256,
    seed: int = 0,
    shard_size: int | str | None = None,
    generation_config: Mapping[str, Any] | None = GENERATION_CONFIG,
) -> Path:
    """Save a random `LlamaForCausalLM` (and its generation_config.json) into `directory`; returns it.

    `rope_scaling` is a transformers RoPE dict without rope_theta, e.g. {"rope_type": "llama3", ...}.
    `shard_size` (bytes or "20KB") splits the weights into `model-0000x-of-0000y.safetensors` + index.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={**(rope_scaling or {"rope_type": "default"}), "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _randomize(model)
    model.to(getattr(torch, torch_dtype))
    model.config.dtype = torch_dtype
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=shard_size or "10GB")
    if generation_config is not None:
        GenerationConfig(**generation_config).save_pretrained(directory)
    return directory


def _randomize(model: Any) -> None:
    """Weights that make every mapping mistake visible: transformers' init (std 0.02, norms exactly 1,
    biases 0) gives near-uniform logits and would hide swapped norms or dropped biases."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:  # [out, in] (the embedding is [vocab, hidden]): unit-scale activations and logits
                param.copy_(torch.randn_like(param) / math.sqrt(param.shape[1]))


def rewrite_rope_format(directory: str | Path, style: RopeStyle) -> None:
    """Rewrite `directory/config.json` so its RoPE settings use `style`, keeping their meaning."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters", None) or config.pop("rope_scaling", None) or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", config.pop("rope_theta", None))
    config.pop("rope_scaling", None)
    if style == "rope_parameters":
        config["rope_parameters"] = {**rope, "rope_theta": theta}
    elif style in ("rope_scaling", "rope_scaling_type"):
        config["rope_theta"] = theta
        if rope["rope_type"] == "default":
            config["rope_scaling"] = None  # how published unscaled checkpoints say it
        elif style == "rope_scaling":
            config["rope_scaling"] = rope
        else:
            config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    else:
        raise ValueError(f"unknown RoPE style {style!r}; choose from {ROPE_STYLES}")
    path.write_text(json.dumps(config, indent=2))


def llama_checkpoint_fixture(**options: Any) -> Any:
    """A session-scoped pytest fixture yielding the path of a checkpoint built with `options`."""

    @pytest.fixture(scope="session")
    def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return make_llama_checkpoint(tmp_path_factory.mktemp("llama"), **options)

    return checkpoint
