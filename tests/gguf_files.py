"""GGUF files written from the tests' tiny Hugging Face checkpoints, as llama.cpp's converter lays them out,
and the logits of a GGUF file as xlserve and as transformers compute them.

`write_gguf` reads a checkpoint of tests/checkpoints.py and writes it with the `gguf` package's writer:
the config as `{arch}.*` metadata, 2-D weights block-quantized (Q8_0 by default), norms in F32, a
`llama` model's query and key rows interleaved the way llama.cpp's RoPE wants them, and optionally the
demo model's byte-level BPE tokenizer with a ChatML template. Tests read the result with xlserve and with
transformers' own GGUF loader, which are then compared: the tensor names come from `model.gguf`, so an
error there shows as a disagreement with transformers, not as a pass.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from configs.demo import CHATML_TEMPLATE, EOS, IM_END, IM_START, SPECIAL_TOKENS, build_tokenizer
from model.config import ModelConfig
from model.gguf import LAYER_TENSORS, MODEL_TENSORS
from model.llama import AttentionBatch, CausalLM, empty_cache
from model.loader import load_params
from serving.engine.engine import kv_page_dtype

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3"}
GGUF_NAMES = {hf: ggml for ggml, hf in MODEL_TENSORS.items()}
GGUF_LAYER_NAMES = {hf: ggml for ggml, hf in LAYER_TENSORS.items()}
PAGE_SIZE = 4


def demo_vocab_size() -> int:
    """The demo tokenizer's size: a checkpoint to carry that tokenizer needs this vocabulary."""
    return build_tokenizer().get_vocab_size(with_added_tokens=True)


def write_gguf(checkpoint: Path, file: Path, *, weight_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
               tokenizer: bool = True, architecture: str | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write `checkpoint` as one GGUF file. `architecture` overrides the one its config implies (for files of
    other architectures); `extra_tensors` are added under their GGUF names as F32."""
    config = json.loads((checkpoint / "config.json").read_text())
    arch = architecture or GGUF_ARCH[config["architectures"][0]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(file), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer:
        _add_tokenizer(writer)
    for name, values in load_file(str(checkpoint / "model.safetensors")).items():
        ggml_name = _gguf_name(name)
        if arch == "llama" and ggml_name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            values = _interleave_rotary(values, heads if ".attn_q." in ggml_name else kv_heads)
        if values.ndim == 2:
            writer.add_tensor(ggml_name, gguf.quants.quantize(values.astype(np.float32), weight_type),
                              raw_dtype=weight_type)
        else:
            writer.add_tensor(ggml_name, values.astype(np.float32))
    for ggml_name, values in (extra_tensors or {}).items():
        writer.add_tensor(ggml_name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file


def our_logits(file: Path, tokens: list[int], weight_quant: str | None = None) -> np.ndarray:
    """f32[T, V]: xlserve's loader and decoder, float32 (over weights stored as `weight_quant`, and KV pages as the
    engine would store them with it), every position of one prefill."""
    config = dataclasses.replace(ModelConfig.from_pretrained(file), weight_quant=weight_quant)
    params = load_params(file, config, jnp.float32)
    model = CausalLM(config, dtype=jnp.float32)
    n, pages = len(tokens), -(-len(tokens) // PAGE_SIZE)
    batch = AttentionBatch(positions=jnp.arange(n, dtype=jnp.int32)[None], valid=jnp.ones((1, n), bool),
                           kv_lens=jnp.asarray([n], jnp.int32),
                           block_tables=jnp.arange(1, pages + 1, dtype=jnp.int32)[None])
    cache = empty_cache(config, pages + 1, PAGE_SIZE, kv_page_dtype(jnp.float32, weight_quant, None, "cpu"))  # served
    forward = jax.jit(lambda p, c: model.apply({"params": p}, jnp.asarray([tokens], jnp.int32), batch, c))
    logits, _ = forward(params, cache)
    return np.asarray(logits[0])


def transformers_logits(file: Path, tokens: list[int], hf=None) -> np.ndarray:
    """f32[T, V]: transformers' GGUF loader (or the model `hf` it loaded already) and its decoder, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = hf or AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def _interleave_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k row order -> llama.cpp's (the inverse of `model.gguf._deinterleave_rotary`)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _add_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The demo model's byte-level BPE as llama.cpp writes a GPT-2-style vocabulary."""
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[IM_START])
    writer.add_eos_token_id(vocab[IM_END])
    writer.add_pad_token_id(vocab[EOS])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
