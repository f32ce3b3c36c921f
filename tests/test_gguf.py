"""GGUF checkpoints: config, tokenizer and weights from one file, against transformers reading the same file.

The files are the tests' tiny checkpoints written by tests/gguf_files.py (Q8_0 weights, llama.cpp's q/k
row order for `llama`); transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) is the
oracle for the dequantized weights. The real model (SmolLM2-135M's Q4_1 file) is checked in
tests/test_real_model.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from configs.demo import CHATML_TEMPLATE, build_tokenizer
from model.config import ModelConfig
from model.gguf import _PlainViewReader, find_gguf_file
from model.loader import load_params
from serving.text.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint
from tests.gguf_files import demo_vocab_size, our_logits, transformers_logits, write_gguf
from xlkernels.cpu_blocks import from_lanes, lanes_applies

VARIANTS = {
    # llama: q/k rows interleaved in the file, GQA, untied; qwen2: q/k/v biases, tied; qwen3: per-head q/k norms
    "llama": ("llama", dict(num_heads=4, num_kv_heads=2)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    # (transformers reads no head_dim from a qwen3 file: it takes Qwen3Config's 128, as every Qwen3 has)
    "qwen3": ("qwen3", dict(head_dim=128, num_heads=4, num_kv_heads=2)),
}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


def make_gguf(directory: Path, family: str, **options) -> Path:
    checkpoint = make_checkpoint(directory / f"{family}-hf", family, vocab_size=demo_vocab_size(), **options)
    return write_gguf(checkpoint, directory / f"{family}.gguf")


@pytest.fixture(scope="module")
def llama_gguf(gguf_dir) -> Path:
    return make_gguf(gguf_dir, *VARIANTS["llama"][:1], **VARIANTS["llama"][1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_reading_the_same_file(variant, gguf_dir):
    family, options = VARIANTS[variant]
    file = make_gguf(gguf_dir, family, **options)
    config = ModelConfig.from_pretrained(file)
    assert config.family == family
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=19).tolist()
    np.testing.assert_allclose(our_logits(file, tokens), transformers_logits(file, tokens), atol=2e-4, rtol=0)


def test_config_comes_from_the_metadata(llama_gguf):
    config = ModelConfig.from_pretrained(llama_gguf)
    source = ModelConfig.from_pretrained(llama_gguf.parent / "llama-hf")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "rope", "tie_word_embeddings", "attention_bias"):
        assert getattr(config, field) == getattr(source, field), field
    assert config.rms_norm_eps == pytest.approx(source.rms_norm_eps)  # stored as float32
    vocab = build_tokenizer().get_vocab(with_added_tokens=True)
    assert config.bos_token_id == vocab["<|im_start|>"] and config.eos_token_ids == (vocab["<|im_end|>"],)
    assert config.torch_dtype == "bfloat16"  # quantized: served in bf16 on accelerators, f32 on CPU


def test_tokenizer_and_chat_template_come_from_the_metadata(llama_gguf):
    tokenizer = Tokenizer.from_pretrained(str(llama_gguf))
    source = build_tokenizer()
    text = "hello world, the model said: <|im_end|> ünïcode"
    assert tokenizer.encode(text, add_special_tokens=False) == source.encode(text).ids
    assert tokenizer.decode(source.encode(text).ids, skip_special_tokens=False) == text
    assert tokenizer.chat_template == CHATML_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_folder_holding_one_gguf_file_is_that_file(llama_gguf, tmp_path):
    shutil.copy(llama_gguf, tmp_path / "model.gguf")
    assert find_gguf_file(tmp_path) == tmp_path / "model.gguf"
    assert find_gguf_file(llama_gguf.parent / "llama-hf") is None  # config.json: a Hugging Face checkpoint
    shutil.copy(llama_gguf, tmp_path / "other.gguf")
    with pytest.raises(ValueError, match=r"several GGUF files \(model.gguf, other.gguf\)"):
        find_gguf_file(tmp_path)


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model.safetensors is not a GGUF file \(it begins with b'\\x08"):
        ModelConfig.from_pretrained(file)


def test_a_truncated_file_is_named(llama_gguf, tmp_path):
    data = llama_gguf.read_bytes()
    for cut in (len(data) // 2, 100):  # in the tensor data; in the metadata
        truncated = tmp_path / f"cut-{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut-{cut}.gguf is not a readable GGUF file: it is truncated"):
            load_params(truncated, ModelConfig.from_pretrained(truncated), jnp.float32)


def test_another_architecture_is_named(gguf_dir):
    checkpoint = gguf_dir / "llama-hf"
    file = write_gguf(checkpoint, gguf_dir / "gpt2.gguf", architecture="gpt2", tokenizer=False)
    with pytest.raises(ValueError, match=r"holds a 'gpt2' model; xlserve reads GGUF files of the Llama-family"):
        ModelConfig.from_pretrained(file)


def test_tensors_without_a_place_are_named(gguf_dir, llama_gguf):
    checkpoint = gguf_dir / "llama-hf"
    file = write_gguf(checkpoint, gguf_dir / "freqs.gguf", tokenizer=False,
                      extra_tensors={"rope_freqs.weight": np.ones(8), "blk.0.attn_sinks.weight": np.ones(4)})
    config = ModelConfig.from_pretrained(file)
    with pytest.raises(ValueError, match=r"(?s)rope_freqs.weight: per-frequency RoPE factors.*"
                                         r"blk.0.attn_sinks.weight: no tensor of the decoder has that name"):
        load_params(file, config, jnp.float32)


def test_missing_metadata_is_named(gguf_dir):
    import gguf

    file = gguf_dir / "bare.gguf"
    writer = gguf.GGUFWriter(str(file), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"bare.gguf has no llama.attention.head_count in its metadata"):
        ModelConfig.from_pretrained(file)



def test_the_metadata_reads_as_the_gguf_packages_own_reader_reads_it(llama_gguf, tmp_path):
    """`_PlainViewReader` builds the long arrays' parts its own faster way: the same fields, parts and
    values as gguf's reader, and a file cut inside its vocabulary is named as truncated."""
    ours, theirs = _PlainViewReader(str(llama_gguf)), GGUFReader(str(llama_gguf))
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.tokens" in ours.fields
    for name, field in ours.fields.items():
        other = theirs.fields[name]
        assert (field.offset, field.data, field.types) == (other.offset, other.data, other.types), name
        assert field.contents() == other.contents(), name
        assert [(p.dtype, p.tolist()) for p in field.parts] == [(p.dtype, p.tolist()) for p in other.parts], name
    tokens = ours.fields["tokenizer.ggml.tokens"]
    cut = tmp_path / "cut-in-vocabulary.gguf"
    cut.write_bytes(llama_gguf.read_bytes()[: tokens.offset + 64])
    with pytest.raises(ValueError, match="cut-in-vocabulary.gguf is not a readable GGUF file: it is truncated"):
        ModelConfig.from_pretrained(cut)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_a_files_own_blocks_are_kept_as_they_are_and_give_its_float32_logits(kind, gguf_dir, llama_gguf):
    """`--weight-quant` of the file's own block format (the CPU's default for it under --dtype float32): each
    layer's matmul weights are the file's bytes (regrouped in the lanes layout on a CPU with AVX-512 and without
    AMX), q/k rows back in HF's order and fused as the float weights
    are, so the logits are the float32 model's up to the order of float32 sums. A head size that is not
    whole blocks of 32 keeps the file from that default."""
    weight_type = GGMLQuantizationType[kind.upper()]
    checkpoint = make_checkpoint(gguf_dir / f"blocks-{kind}-hf", "llama", vocab_size=demo_vocab_size(),
                                 num_heads=4, num_kv_heads=2, head_dim=32)
    file = write_gguf(checkpoint, gguf_dir / f"blocks-{kind}.gguf", weight_type=weight_type)
    config = ModelConfig.from_pretrained(file)
    assert config.checkpoint_blocks == kind
    params = load_params(file, dataclasses.replace(config, weight_quant=kind), jnp.float32)
    reader = GGUFReader(file)
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    stored = np.asarray(params["layers_1"]["mlp"]["w_down"])  # in the lanes layout where this CPU multiplies it so
    np.testing.assert_array_equal(from_lanes(stored, kind) if lanes_applies(stored.shape) else stored,
                                  np.asarray(down.data))
    assert params["layers_1"]["attn"]["wqkv"].dtype == jnp.uint8
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=19).tolist()
    np.testing.assert_allclose(our_logits(file, tokens, kind), our_logits(file, tokens), atol=2e-5, rtol=0)
    assert ModelConfig.from_pretrained(llama_gguf).checkpoint_blocks is None  # heads of 16
