"""Tiny random Hugging Face checkpoints, written by transformers itself, for tests to load and compare.

`make_checkpoint` saves a random model of one family (Llama, Mistral, Qwen2, Qwen3) with a fixed seed
through transformers' own class for it. InternLM2 has no class in transformers (its modelling code
ships with the checkpoint and is never run here), so its checkpoint is a transformers Llama converted
into InternLM2's layout and config (`llama_to_internlm2`): the Llama it came from is its oracle.
`make_llama_checkpoint` is the Llama case; `llama_checkpoint_fixture` wraps it as a session-scoped
pytest fixture. `make_scripted_checkpoint` makes a Llama whose answer is fixed in advance (a bigram
table in its embeddings and LM head), for tests that need a model to write given text.
`rewrite_rope_format` turns a saved config.json into each RoPE style found in the wild.
"""

from __future__ import annotations

import json
import math
import shutil
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


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "internlm2")


def make_checkpoint(
    directory: str | Path,
    family: str = "llama",
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
    **family_options: Any,
) -> Path:
    """Save a random model of `family` (and its generation_config.json) into `directory`; returns it.

    `rope_scaling` is a transformers RoPE dict without rope_theta, e.g. {"rope_type": "llama3", ...}.
    `shard_size` (bytes or "20KB") splits the weights into `model-0000x-of-0000y.safetensors` + index.
    `family_options` go to that family's config class (e.g. `sliding_window` for Mistral and Qwen2).
    For internlm2, `attention_bias` becomes InternLM2's `bias` (all four projections, as Llama's).
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if family == "internlm2":
        directory = Path(directory)
        llama = make_checkpoint(
            directory / "llama-oracle", "llama", vocab_size=vocab_size, hidden_size=hidden_size,
            num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings,
            rope_theta=rope_theta, rope_scaling=rope_scaling, attention_bias=attention_bias,
            torch_dtype=torch_dtype, max_position_embeddings=max_position_embeddings, seed=seed,
            generation_config=generation_config,
        )
        return llama_to_internlm2(llama, directory)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    # Qwen2 has no bias switches: q/k/v always carry one, o_proj never; Mistral none at all.
    biases = {"llama": dict(attention_bias=attention_bias, mlp_bias=mlp_bias),
              "qwen3": dict(attention_bias=attention_bias)}.get(family, {})
    if family == "mistral":
        family_options.setdefault("sliding_window", None)
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={**(rope_scaling or {"rope_type": "default"}), "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        **biases,
        **family_options,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model)
    model.to(getattr(torch, torch_dtype))
    model.config.dtype = torch_dtype
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=shard_size or "10GB")
    if generation_config is not None:
        GenerationConfig(**generation_config).save_pretrained(directory)
    return directory


def make_llama_checkpoint(directory: str | Path, **options: Any) -> Path:
    """`make_checkpoint` for a `LlamaForCausalLM`."""
    return make_checkpoint(directory, "llama", **options)


def make_scripted_checkpoint(directory: str | Path, script: list[int], *, vocab_size: int,
                             hidden_size: int = 64) -> Path:
    """A Llama checkpoint that answers any prompt with the token ids of `script`, then repeats its last.

    Every layer's weights are zero, so each position's hidden state is its token's embedding and the
    model is a bigram table: a token outside the script is followed by `script[0]`, `script[i]` by
    `script[i + 1]`, and the last by itself. Each script token's embedding is a direction of its own
    (one more for every other token), and the LM head maps each direction to the next token with a
    logit of ~80 against 0 for the rest, so sampling at any temperature follows the script.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if len(set(script)) != len(script) or len(script) >= hidden_size:
        raise ValueError("script tokens must be distinct, and fewer than hidden_size")
    directory = make_llama_checkpoint(directory, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=1)
    tensors = {name: torch.zeros_like(t) for name, t in load_file(directory / "model.safetensors").items()}
    for name in tensors:
        if name.endswith("norm.weight"):
            tensors[name] += 1
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    other = len(script)  # the direction of every token outside the script
    embed[:, other] = 1
    for i, token in enumerate(script):
        embed[token] = 0
        embed[token, i] = 1
    for previous, token in zip([other, *range(len(script))], [*script, script[-1]], strict=True):
        head[token, previous] = 10  # a unit direction is sqrt(hidden_size) = 8 after the final RMSNorm
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def llama_to_internlm2(llama: str | Path, directory: str | Path) -> Path:
    """Rewrite a saved Llama checkpoint as InternLM2 would ship it; returns `directory`.

    Weights get InternLM2's names, with q/k/v packed into `wqkv` as InternLM2 groups them: for each KV
    head, its G query heads, then its key head, then its value head. config.json gets InternLM2's
    architecture, `auto_map` (which names remote code that xlserve must never need), `bias`, and RoPE
    as published InternLM2 checkpoints write it (top-level `rope_theta`, `rope_scaling.type`).
    """
    import torch
    from safetensors.torch import load_file, save_file

    llama, directory = Path(llama), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((llama / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv_heads
    renames = {
        "model.embed_tokens.weight": "model.tok_embeddings.weight",
        "lm_head.weight": "output.weight",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
    }
    tensors = load_file(llama / "model.safetensors")
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            q, k, v = (tensors[name.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj"))
            tail = q.shape[1:]
            packed = torch.cat(
                [q.reshape(kv_heads, group, head_dim, *tail), k.reshape(kv_heads, 1, head_dim, *tail),
                 v.reshape(kv_heads, 1, head_dim, *tail)],
                dim=1,
            )
            converted[name.replace("self_attn.q_proj", "attention.wqkv")] = packed.reshape(-1, *tail).contiguous()
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        converted[name] = tensor
    save_file(converted, directory / "model.safetensors", metadata={"format": "pt"})

    rope = dict(config.pop("rope_parameters", None) or {})
    rope_type = rope.pop("rope_type", "default")
    internlm2 = {
        key: config[key]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                    "tie_word_embeddings", "bos_token_id", "eos_token_id", "dtype")
    }
    internlm2.update(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        auto_map={
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        bias=config["attention_bias"],
        rope_theta=rope.pop("rope_theta"),
        rope_scaling=None if rope_type == "default" else {"type": rope_type, **rope},
        attn_implementation="eager",
    )
    (directory / "config.json").write_text(json.dumps(internlm2, indent=2))
    if (llama / "generation_config.json").is_file():
        shutil.copy(llama / "generation_config.json", directory / "generation_config.json")
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
