"""GGUF checkpoints (llama.cpp's and Ollama's one-file format) as a model source.

A GGUF file holds a model's config, its tokenizer (with the chat template) and its weights, most of them
quantized in blocks (Q4_1, Q8_0, the K-quants, ...). It is read with the `gguf` package, llama.cpp's own
reader; each weight is dequantized on the host to float32 by that package and handed to `model.loader`
under its Hugging Face name and in its HF layout, so fusing, the cast to the serving dtype and sharding
are the safetensors path's. The quantization saves disk and download, not compute: the model runs at
the serving dtype like any other checkpoint.

Read: the Llama-family architectures the decoder runs, as llama.cpp names them: `llama` (Llama 2/3,
Mistral, SmolLM and the rest llama.cpp converts as llama), `qwen2` and `qwen3`. llama.cpp stores a
`llama` model's query and key rows interleaved for its RoPE kernel; they are put back in HF's order
here, as transformers' GGUF loader does. Anything else is refused with what is wrong named: another
architecture, RoPE frequency tensors or scaling this decoder does not run, a tensor it has no place for,
a value type the `gguf` package cannot dequantize, a truncated or non-GGUF file.

The tokenizer is built from the same metadata by transformers' GGUF converter (`serving.text.tokenizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from model.config import ModelConfig

MAGIC = b"GGUF"
SUFFIX = ".gguf"
# llama.cpp's architecture name -> the transformers class whose config.json the metadata stands for
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Tensors outside the layers, by GGUF name -> HF name
MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# A layer's tensors (`blk.{i}.` + GGUF name) -> HF name (after `model.layers.{i}.`)
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
# Why some tensors llama.cpp writes have no place here, for the error that names them.
UNSUPPORTED_TENSORS = {
    "rope_freqs.weight": "per-frequency RoPE factors (llama.cpp's form of Llama 3.1's RoPE scaling)",
}
# The float types the weights may be stored in, besides the block-quantized ones.
FLOAT_TYPES = {GGMLQuantizationType.F32: "float32", GGMLQuantizationType.F16: "float16",
               GGMLQuantizationType.BF16: "bfloat16"}
# The block types a weight keeps as they are in the file (`--weight-quant q4_0|q4_1|q8_0`), by format name.
BLOCK_TYPES = {GGMLQuantizationType.Q4_0: "q4_0", GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}
# RoPE scaling types (`{arch}.rope.scaling.type`) the decoder runs as the metadata describes them.
ROPE_SCALING = ("none", "linear")
_REQUIRED = object()  # `_metadata`'s default: the key must be there


def find_gguf_file(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file `path` stands for: a file (any file: Hugging Face checkpoints are folders), or a folder
    without config.json that holds exactly one `*.gguf` file. None: not a GGUF checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); pass the one to serve")
    return files[0] if files else None


def gguf_model_config(file: Path) -> ModelConfig:
    """The model's config from the file's metadata, as config.json would give it."""
    reader = read_gguf(file)
    arch = _metadata(reader, file, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{file} holds a {arch!r} model; xlserve reads GGUF files of the Llama-family "
                         f"architectures {', '.join(ARCHITECTURES)}")

    def field(key: str, default: Any = _REQUIRED) -> Any:
        value = _metadata(reader, file, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ValueError(f"{file}: {arch}.{key} differs between layers ({value}); xlserve needs one value")
        return value

    heads, hidden = field("attention.head_count"), field("embedding_length")
    head_dim = field("attention.key_length", None) or hidden // heads
    rotated = field("rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise ValueError(f"{file}: RoPE rotates {rotated} of each head's {head_dim} dimensions; xlserve rotates "
                         "whole heads")
    names = {tensor.name for tensor in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    special = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    hf_config = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": field("vocab_size", None) or (len(tokens.data) if tokens is not None else None),
        "hidden_size": hidden,
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon", None),
        "max_position_embeddings": field("context_length"),
        "rope_theta": field("rope.freq_base", None),
        "rope_scaling": _rope_scaling(field("rope.scaling.type", "none"), field("rope.scaling.factor", None), file),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _metadata(reader, file, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": [_metadata(reader, file, key) for key in special if key in reader.fields],
        "torch_dtype": _weights_dtype(reader),
    }
    config = ModelConfig.from_hf_dict({key: value for key, value in hf_config.items() if value is not None})
    # A head's inputs to the output projection must be whole blocks of 32 to keep it in blocks (model/loader.py
    # fuses that projection per head).
    embedding = next((tensor for tensor in reader.tensors if tensor.name == "token_embd.weight"), None)
    return dataclasses.replace(config, checkpoint_blocks=_layer_blocks(reader) if head_dim % 32 == 0 else None,
                               embedding_blocks=None if embedding is None else BLOCK_TYPES.get(embedding.tensor_type))


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor under its HF name: `read` dequantizes it into HF's layout (a `loader.CheckpointTensor`)."""

    tensor: ReaderTensor
    shape: tuple[int, ...]  # HF's order: GGUF lists dimensions fastest-varying first
    interleaved_heads: int | None = None  # a llama q/k projection's heads, whose rows llama.cpp interleaved

    @property
    def nbytes(self) -> int:
        return int(self.tensor.n_bytes)

    @property
    def block_format(self) -> str | None:
        """The weight format (`weight_quant.BLOCK_FORMATS`) whose bytes this tensor's are, or None."""
        return BLOCK_TYPES.get(self.tensor.tensor_type)

    def read(self) -> np.ndarray:
        values = dequantize(self.tensor.data, self.tensor.tensor_type).reshape(self.shape)
        return self._hf_rows(values)

    def read_blocks(self) -> np.ndarray:  # u8[out, in / 32 * block bytes]
        """The tensor's blocks as stored (only where `block_format`), each output channel's in HF's order."""
        return self._hf_rows(np.asarray(self.tensor.data).reshape(self.shape[0], -1))

    def _hf_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.interleaved_heads is None else _deinterleave_rotary(rows, self.interleaved_heads)


def gguf_tensors(file: Path) -> dict[str, GGUFTensor]:
    """Every weight of the file under its HF name, checked to be placeable and dequantizable before any is read."""
    reader = read_gguf(file)
    config = gguf_model_config(file)
    llama = _metadata(reader, file, "general.architecture") == "llama"
    tensors, problems = {}, []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            why = UNSUPPORTED_TENSORS.get(tensor.name, "no tensor of the decoder has that name")
            problems.append(f"{tensor.name}: {why}")
            continue
        if not _dequantizable(tensor):
            problems.append(f"{tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot "
                            "dequantize to floats")
            continue
        heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}.get(name.split(".")[-2]) if llama else None
        tensors[name] = GGUFTensor(tensor, tuple(int(d) for d in reversed(tensor.shape.tolist())), heads)
    if problems:
        raise ValueError(f"{file} has tensors xlserve cannot load:\n  " + "\n  ".join(problems))
    return tensors


def read_gguf(file: Path) -> GGUFReader:
    """The file's reader (cached: the config and the weights of one load read the same file once)."""
    with open(file, "rb") as handle:
        magic = handle.read(len(MAGIC))
    if magic != MAGIC:
        raise ValueError(f"{file} is not a GGUF file (it begins with {magic!r}, not {MAGIC!r}); xlserve loads a "
                         "Hugging Face checkpoint folder or a .gguf file")
    stat = file.stat()
    return _reader(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


class _PlainViewReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map. The reader slices its map once per metadata
    value (some 150k times for a 49k-token vocabulary), and a slice of an `np.memmap` costs several times
    a plain view's: this reads SmolLM2's file in a third of the time, to the same fields and tensors."""

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, mapped: np.ndarray) -> None:
        self._plain_data = mapped.view(np.ndarray)  # the same mapped bytes; the view keeps the map alive

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list]:
        """The reader's parts of one metadata value, built faster for the long arrays (the vocabulary, its
        merges, scores and token types) of a file in the host's byte order: the same parts (a length and
        the bytes of each string, a one-element array per number), sliced straight from the map instead of
        through the reader's general per-element path (~5 us an element)."""
        array = GGUFValueType.ARRAY
        if GGUFValueType(raw_type) != array or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item = GGUFValueType(int(item_type[0]))
        offs, parts = orig_offs + 12, [item_type, count]
        if item == GGUFValueType.STRING:
            data = self._plain_data
            raw = memoryview(data)
            for _ in range(int(count[0])):
                size = int.from_bytes(raw[offs : offs + 8], "little")
                if offs + 8 + size > len(data):
                    raise ValueError(f"a string at byte {offs} runs past the end of the file")
                parts += (data[offs : offs + 8].view(np.uint64), data[offs + 8 : offs + 8 + size])
                offs += 8 + size
            return offs - orig_offs, parts, list(range(3, len(parts), 2)), [array, item]
        scalar = self.gguf_scalar_to_np.get(item)
        if scalar is None:  # arrays of arrays: the reader's own path
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, scalar, count[0])
        if len(values) != count[0]:
            raise ValueError(f"an array of {count[0]} values at byte {offs} runs past the end of the file")
        parts += (values[i : i + 1] for i in range(len(values)))
        return 12 + values.nbytes, parts, list(range(2, len(parts))), [array, item]


@functools.lru_cache(maxsize=1)
def _reader(file: str, size: int, mtime_ns: int) -> GGUFReader:
    """The reader, with its failures (it raises whatever numpy did where the bytes ran out) said plainly."""
    try:
        return _PlainViewReader(file)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as error:
        raise ValueError(f"{file} is not a readable GGUF file: it is truncated or malformed ({size} bytes; the "
                         f"gguf reader says: {error})") from error


def _metadata(reader: GGUFReader, file: Path, key: str, default: Any = _REQUIRED) -> Any:
    """A metadata value as a Python value; without `default`, a missing key is an error naming it."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{file} has no {key} in its metadata")
        return default
    return field.contents()


def _rope_scaling(kind: str, factor: float | None, file: Path) -> dict | None:
    if kind not in ROPE_SCALING:
        raise ValueError(f"{file}: RoPE scaling {kind!r} in GGUF metadata is not supported (supported: "
                         f"{', '.join(ROPE_SCALING)})")
    return {"rope_type": "linear", "factor": factor} if kind == "linear" else None


def _weights_dtype(reader: GGUFReader) -> str:
    """The dtype the model is served at by default on accelerators: the file's own float type when it is
    unquantized, else bfloat16 (what quantized files are made from)."""
    types = {tensor.tensor_type for tensor in reader.tensors if len(tensor.shape) > 1}
    if len(types) == 1 and next(iter(types)) in FLOAT_TYPES:
        return FLOAT_TYPES[next(iter(types))]
    return "bfloat16"


def _layer_blocks(reader: GGUFReader) -> str | None:
    """The block format every matmul weight of the layers is stored in, if they share one of BLOCK_TYPES."""
    types = {tensor.tensor_type for tensor in reader.tensors
             if LAYER_TENSOR.fullmatch(tensor.name) and tensor.name.endswith(".weight") and len(tensor.shape) > 1}
    return BLOCK_TYPES.get(next(iter(types))) if len(types) == 1 else None


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in MODEL_TENSORS:
        return MODEL_TENSORS[gguf_name]
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_TENSORS:
        return None
    return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"


def _dequantizable(tensor: ReaderTensor) -> bool:
    """Whether the gguf package can dequantize this tensor's type (tried on its first row, not read whole)."""
    if tensor.tensor_type in FLOAT_TYPES:
        return True
    try:
        dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], tensor.tensor_type)
    except NotImplementedError:
        return False
    return True


def _deinterleave_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> HF's. Within each head HF keeps the two halves that RoPE rotates
    together apart ([first half, second half]); llama.cpp interleaves them (row 2i from the first half,
    2i + 1 from the second)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
