"""The decoder's parameters, declared once, and Hugging Face checkpoints loaded into them (safetensors
here; GGUF files reach the same path through `model.gguf`, which names and lays out their tensors as HF does).

Each parameter is one `ParamSpec` (jax-llm-examples' `ArrayInfo`, plus where the checkpoint keeps it):
its path in the pytree, its shape, its logical axes, its random initializer, the HF tensors it is built
from with a free host-side reshape of each, and a small `fuse` function (transpose / concatenate) that
runs on the device. Everything else is derived from `param_specs`: the shapes (`param_shapes`), the
shardings (`param_shardings`, through model/sharding.py's `LOGICAL_RULES`), the Flax modules' parameter
shapes and initializers (`param_spec`, read by model/llama.py), random weights (`init_random_params`)
and loading (`load_params`), so none of them can disagree about the layout.

Loading streams one parameter at a time: the checkpoint is memory-mapped (host memory stays about one
tensor, however large the model), every device receives only its own slice of each raw tensor, and the
transposes and the cast to the serving dtype run on the device, where they are cheap (on the host they
ran at ~0.3 GB/s).

safetensors' own numpy reader cannot return bfloat16, so the (simple, documented) file format is read
directly: an 8-byte little-endian header length, a JSON header of name -> dtype/shape/byte range, then
the raw little-endian bytes, which numpy maps in place (bfloat16 through `ml_dtypes`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding

from model.config import INDEX_FILE, SINGLE_FILE, ModelConfig
from model.sharding import Axes, make_mesh, sharding_for
from model.weight_quant import (
    BLOCK_FORMATS,
    SCALED_FORMATS,
    block_bytes_shape,
    current_platform,
    has_scales,
    is_block_format,
    storage_dtype,
    stored_inputs_last,
    stored_shape,
    stored_weight,
    values_shape,
)

Params = dict[str, Any]

SAFETENSORS_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
# Stored values that mean something only with their scale (Hugging Face FP8 checkpoints, `fp8_checkpoint`).
SCALED_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
# A quantized parameter's scales live beside it in the pytree under its name plus this.
SCALE_SUFFIX = "_scale"
# Buffers some older checkpoints saved although transformers recomputes them.
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# How many names an error message lists before it only counts the rest.
MAX_LISTED = 20
# Scale of random weights, as transformers' default initializer_range.
RANDOM_INIT_STD = 0.02
# How a parameter's random values are drawn, by the name a `ParamSpec` gives.
INITIALIZERS: dict[str, jax.nn.initializers.Initializer] = {
    "normal": jax.nn.initializers.normal(RANDOM_INIT_STD),
    "ones": jax.nn.initializers.ones,  # norm scales: a random model's norms start as the identity
}
Init = Literal["normal", "ones"]


class CheckpointTensor(Protocol):
    """One tensor of a checkpoint under its Hugging Face name and in its HF layout, read on demand."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int:
        """Bytes in the file (start-up progress counts them)."""
        ...

    def read(self) -> np.ndarray:
        """The tensor as a host array (float32, bfloat16 or float16); the device casts it."""
        ...


def block_source(tensor: CheckpointTensor, kind: str) -> bool:
    """Whether `tensor` is stored in GGUF blocks of `kind` (a GGUF file's `model.gguf.GGUFTensor`), which a
    parameter in that format takes as they are (`read_blocks`), rather than quantizing the floats again."""
    return getattr(tensor, "block_format", None) == kind


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str  # safetensors' code: BF16, F16, F32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.numpy_dtype.itemsize

    @property
    def numpy_dtype(self) -> np.dtype:
        return {**SAFETENSORS_DTYPES, **SCALED_DTYPES}[self.dtype]

    def read(self) -> np.ndarray:
        """A read-only view of the mapped file: no copy until a device asks for its bytes."""
        return np.memmap(self.file, self.numpy_dtype, mode="r", offset=self.offset, shape=self.shape)


def _expand_scale(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A stored FP8 scale broadcast to its weight: one for the tensor, one per row, or one per block of
    [ceil(rows / scale rows), ceil(cols / scale cols)] (Hugging Face's `weight_block_size`)."""
    if scale.size == 1:
        return scale.reshape(())
    if scale.shape in ((shape[0],), (shape[0], 1)):
        return scale.reshape(shape[0], *([1] * (len(shape) - 1)))
    if scale.ndim == 2 and len(shape) == 2:
        rows, cols = -(-shape[0] // scale.shape[0]), -(-shape[1] // scale.shape[1])
        return np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)[: shape[0], : shape[1]]
    raise ValueError(f"an FP8 scale of shape {list(scale.shape)} does not fit a weight of shape {list(shape)}")


@dataclass(frozen=True)
class ScaledTensor:
    """An e4m3 weight of a Hugging Face FP8 checkpoint and its scale, read back as f32 (on the host, one
    tensor at a time): the loader then quantizes it per output channel like any other weight."""

    values: TensorInfo
    scale: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes

    def read(self) -> np.ndarray:
        values = np.asarray(self.values.read(), np.float32)
        return values * _expand_scale(np.asarray(self.scale.read(), np.float32), values.shape)


# Scales of an FP8 checkpoint: of a weight (`weight_scale_inv`: Hugging Face's FP8 format, which multiplies
# despite its name; `weight_scale`: compressed-tensors'), and static activation scales, which weight-only
# serving does not use.
FP8_SCALE_NAMES = ("weight_scale_inv", "weight_scale")
IGNORED_FP8_TENSORS = ("input_scale",)


def fp8_checkpoint(tensors: Mapping[str, CheckpointTensor]) -> dict[str, CheckpointTensor]:
    """The checkpoint's tensors with each e4m3 weight paired with its scale (`ScaledTensor`) and the scale
    tensors themselves left out; a checkpoint with no e4m3 tensor comes back as it is."""
    if not any(isinstance(t, TensorInfo) and t.dtype in SCALED_DTYPES for t in tensors.values()):
        return dict(tensors)
    paired: dict[str, CheckpointTensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(FP8_SCALE_NAMES + IGNORED_FP8_TENSORS):
            continue
        if isinstance(tensor, TensorInfo) and tensor.dtype in SCALED_DTYPES:
            base = name.removesuffix("weight")
            scale = next((tensors[base + s] for s in FP8_SCALE_NAMES if base + s in tensors), None)
            if scale is None or not isinstance(scale, TensorInfo):
                raise ValueError(f"{name} is {tensor.dtype} but the checkpoint has no {base}weight_scale_inv")
            tensor = ScaledTensor(tensor, scale)
        paired[name] = tensor
    return paired


@dataclass(frozen=True)
class Source:
    """One HF tensor feeding a parameter."""

    name: str
    shape: tuple[int, ...]  # as stored in the checkpoint
    view: tuple[int, ...]  # a reshape of it that costs nothing on the host
    axes: Axes  # logical axes of `view`, so each device is sent only its slice


def _same(x: jax.Array) -> jax.Array:
    return x


@dataclass(frozen=True)
class ParamSpec:
    """One parameter, declared once: everything the model, the sharding, random init and loading need.

    Every parameter has the serving dtype, which is an argument of loading, not a declaration, unless it
    is stored quantized (`quant`): then it is int8 or fp8 values of `shape` plus f32 scales, one per output
    channel, at `scale_path` (model/weight_quant.py), split over the mesh like the channels they scale.
    A matmul weight (`in_dims`) is stored inputs-last where `weight_quant.stored_inputs_last` says so; in a
    GGUF block format (q4_0, q4_1, q8_0) it is u8 bytes whose last input dimension counts bytes.
    """

    path: str  # in the pytree, which is the Flax modules' path: "layers_3/attn/wqkv"
    shape: tuple[int, ...]
    axes: Axes  # logical axis names of `shape`; model/sharding.py's LOGICAL_RULES place them on the mesh
    init: Init  # how `init_random_params` (and flax's `init`) draw it: a key of INITIALIZERS
    sources: tuple[Source, ...]  # the HF tensors it is built from
    fuse: Callable[..., jax.Array] = _same  # the sources' views -> `shape`, on the device
    in_dims: int = 0  # a matmul weight: its leading dims are the inputs it contracts (0: not quantizable)
    quant: str | None = None  # stored as int8 or fp8 with scales, or as bf16 (ModelConfig.weight_quant)

    @property
    def scale_path(self) -> str:
        return self.path + SCALE_SUFFIX

    def leaves(self, dtype: np.dtype) -> list[tuple[str, tuple[int, ...], Axes, np.dtype]]:
        """(path, shape, axes, dtype) of each array the parameter is stored as: itself, or values and scales."""
        if self.quant is not None:
            dtype = storage_dtype(self.quant)
        if not self.in_dims or not stored_inputs_last(self.quant):
            return [(self.path, self.shape, self.axes, dtype)]
        values = (self.path, values_shape(self.shape, self.in_dims, self.quant), stored_shape(self.axes, self.in_dims),
                  dtype)
        if not has_scales(self.quant):
            return [values]
        return [values, (self.scale_path, self.shape[self.in_dims:], self.axes[self.in_dims:], np.dtype(np.float32))]


# ----- fusing, on the device ---------------------------------------------------------------------------


def _transpose(x: jax.Array) -> jax.Array:  # HF Linear [out, in] -> [in, out]
    return x.T


def _fuse_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[Hkv, G, D, E], [Hkv, 1, D, E] x2 -> [E, Hkv, G + 2, D]: each KV head's queries, key, value."""
    return jnp.concatenate([q, k, v], axis=1).transpose(3, 0, 1, 2)


def _fuse_qkv_bias(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[Hkv, G, D], [Hkv, 1, D] x2 -> [Hkv, G + 2, D]."""
    return jnp.concatenate([q, k, v], axis=1)


def _packed_qkv(qkv: jax.Array) -> jax.Array:
    """InternLM2's wqkv viewed [Hkv, G + 2, D, E] -> [E, Hkv, G + 2, D]."""
    return qkv.transpose(3, 0, 1, 2)


def _heads_first(o: jax.Array) -> jax.Array:
    """o_proj [E, Hq, D] -> [Hq, D, E]."""
    return o.transpose(1, 2, 0)


def _stack_gate_up(gate: jax.Array, up: jax.Array) -> jax.Array:
    """[F, E] x2 -> [E, 2, F] (index 0 = gate)."""
    return jnp.stack([gate, up]).transpose(2, 0, 1)


def _stack(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jnp.stack([gate, up])


@functools.cache
def _assembler(
    fuse: Callable[..., jax.Array], dtype: np.dtype, shardings: tuple[NamedSharding, ...], quant: str | None,
    in_dims: int, platform: str,
) -> Callable[[Sequence[jax.Array]], tuple[jax.Array, ...]]:
    """fuse + cast (or quantize, into values and scales) as one jitted function whose outputs land exactly in
    `shardings`: the weight is quantized as it is placed, never held at full precision beside its values.

    Cached so each distinct (fuse, dtype, shardings, quant) is built once; jit then compiles once per shape,
    so all layers share a handful of compilations. `platform` (`weight_quant.current_platform`, which sets the
    stored dtype) is part of the key: jit's own cache would reuse a trace made for another platform.
    """
    return jax.jit(lambda raw: stored_weight(fuse(*raw), dtype, quant, in_dims), out_shardings=shardings)


# ----- the layout --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFNames:
    """Where one family keeps each weight in its checkpoint; `{i}` is the layer, `{p}` weight/bias."""

    embed: str
    final_norm: str
    lm_head: str
    attn_norm: str
    mlp_norm: str
    o: str
    gate: str
    up: str
    down: str
    q: str = ""  # separate q/k/v projections (Llama layout) ...
    k: str = ""
    v: str = ""
    qkv: str = ""  # ... or one packed [Hkv * (G + 2) * D, E] projection (InternLM2)
    q_norm: str = ""
    k_norm: str = ""


_LLAMA_NAMES = HFNames(
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
    attn_norm="model.layers.{i}.input_layernorm.weight",
    mlp_norm="model.layers.{i}.post_attention_layernorm.weight",
    q="model.layers.{i}.self_attn.q_proj.{p}",
    k="model.layers.{i}.self_attn.k_proj.{p}",
    v="model.layers.{i}.self_attn.v_proj.{p}",
    o="model.layers.{i}.self_attn.o_proj.{p}",
    q_norm="model.layers.{i}.self_attn.q_norm.weight",
    k_norm="model.layers.{i}.self_attn.k_norm.weight",
    gate="model.layers.{i}.mlp.gate_proj.{p}",
    up="model.layers.{i}.mlp.up_proj.{p}",
    down="model.layers.{i}.mlp.down_proj.{p}",
)
# InternLM2's remote modelling code names (read here, never run): w1 = gate, w3 = up, w2 = down.
_INTERNLM2_NAMES = HFNames(
    embed="model.tok_embeddings.weight",
    final_norm="model.norm.weight",
    lm_head="output.weight",
    attn_norm="model.layers.{i}.attention_norm.weight",
    mlp_norm="model.layers.{i}.ffn_norm.weight",
    qkv="model.layers.{i}.attention.wqkv.{p}",
    o="model.layers.{i}.attention.wo.{p}",
    gate="model.layers.{i}.feed_forward.w1.{p}",
    up="model.layers.{i}.feed_forward.w3.{p}",
    down="model.layers.{i}.feed_forward.w2.{p}",
)
FAMILY_NAMES = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES,
    "internlm2": _INTERNLM2_NAMES,
}


def param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the decoder, in checkpoint order (embedding, layers, head)."""
    E, F, V, D = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    Hq, Hkv, G = config.num_heads, config.num_kv_heads, config.q_per_kv
    names = FAMILY_NAMES[config.family]

    def stored(path: str, name: str, shape: tuple[int, ...], axes: Axes, init: Init = "normal") -> ParamSpec:
        """A parameter kept as the checkpoint stores it."""
        return ParamSpec(path, shape, axes, init, (Source(name, shape, shape, axes),))

    def transposed(path: str, name: str, shape: tuple[int, ...], axes: Axes) -> ParamSpec:
        """A Linear's weight, stored [out, in] and used [in, out]."""
        return ParamSpec(path, shape, axes, "normal", (Source(name, shape[::-1], shape[::-1], axes[::-1]),),
                         _transpose)

    def qkv(path: str, i: int, suffix: str) -> ParamSpec:
        # HF orders query rows by head, and query head h belongs to KV head h // G: viewing the rows as
        # [Hkv, G, D] puts each GQA group together, and a split over KV heads is a split over rows.
        # InternLM2's packed rows are already [Hkv, G + 2, D]: each group's queries, key, value.
        weight = suffix == "weight"
        tail, tail_axes = ((E,), ("embed",)) if weight else ((), ())
        view_axes: Axes = ("kv_heads", None, "head_dim", *tail_axes)
        # The weight's embedding dimension trails in the checkpoint and leads in ours.
        shape, axes = (*tail, Hkv, G + 2, D), (*tail_axes, "kv_heads", None, "head_dim")
        if names.qkv:
            packed = Source(names.qkv.format(i=i, p=suffix), ((Hq + 2 * Hkv) * D, *tail), (Hkv, G + 2, D, *tail),
                            view_axes)
            return ParamSpec(path, shape, axes, "normal", (packed,), _packed_qkv if weight else _same,
                             in_dims=int(weight))
        sources = tuple(
            Source(template.format(i=i, p=suffix), (heads * D, *tail), (Hkv, heads // Hkv, D, *tail), view_axes)
            for template, heads in ((names.q, Hq), (names.k, Hkv), (names.v, Hkv))
        )
        return ParamSpec(path, shape, axes, "normal", sources, _fuse_qkv if weight else _fuse_qkv_bias,
                         in_dims=int(weight))

    def gate_up(path: str, i: int, suffix: str) -> ParamSpec:
        weight = suffix == "weight"
        view, view_axes = ((F, E), ("ffn", "embed")) if weight else ((F,), ("ffn",))
        shape, axes = ((E, 2, F), ("embed", None, "ffn")) if weight else ((2, F), (None, "ffn"))
        sources = tuple(Source(template.format(i=i, p=suffix), view, view, view_axes)
                        for template in (names.gate, names.up))
        return ParamSpec(path, shape, axes, "normal", sources, _stack_gate_up if weight else _stack,
                         in_dims=int(weight))

    def layer(i: int) -> list[ParamSpec]:
        ours = f"layers_{i}"
        weight = functools.partial(str.format, i=i, p="weight")
        bias = functools.partial(str.format, i=i, p="bias")
        specs = [
            stored(f"{ours}/attn_norm/scale", weight(names.attn_norm), (E,), ("norm",), "ones"),
            qkv(f"{ours}/attn/wqkv", i, "weight"),
            ParamSpec(f"{ours}/attn/wo", (Hq, D, E), ("q_heads", "head_dim", "embed"), "normal",
                      (Source(weight(names.o), (E, Hq * D), (E, Hq, D), ("embed", "q_heads", "head_dim")),),
                      _heads_first, in_dims=2),
            stored(f"{ours}/mlp_norm/scale", weight(names.mlp_norm), (E,), ("norm",), "ones"),
            gate_up(f"{ours}/mlp/w_gate_up", i, "weight"),
            dataclasses.replace(transposed(f"{ours}/mlp/w_down", weight(names.down), (F, E), ("ffn", "embed")),
                                in_dims=1),
        ]
        if config.qk_norm:
            specs.append(stored(f"{ours}/attn/q_norm/scale", weight(names.q_norm), (D,), ("head_dim",), "ones"))
            specs.append(stored(f"{ours}/attn/k_norm/scale", weight(names.k_norm), (D,), ("head_dim",), "ones"))
        if config.attention_bias:
            specs.append(qkv(f"{ours}/attn/bqkv", i, "bias"))
        if config.attention_out_bias:
            specs.append(stored(f"{ours}/attn/bo", bias(names.o), (E,), ("embed",)))
        if config.mlp_bias:
            specs.append(gate_up(f"{ours}/mlp/b_gate_up", i, "bias"))
            specs.append(stored(f"{ours}/mlp/b_down", bias(names.down), (E,), ("embed",)))
        return specs

    specs = [stored("embed/embedding", names.embed, (V, E), ("vocab_in", "embed"))]
    for i in range(config.num_layers):
        specs += layer(i)
    specs.append(stored("final_norm/scale", names.final_norm, (E,), ("norm",), "ones"))
    if not config.tie_word_embeddings:
        specs.append(transposed("lm_head/kernel", names.lm_head, (E, V), ("embed", "vocab")))
    # --weight-quant: the layers' matmul weights (the embedding and the LM head stay in the serving dtype,
    # as in Hugging Face's FP8 checkpoints: they hold a few percent of an 8B model's bytes and most of its
    # sensitivity to rounding).
    # The GGUF block formats likewise (a GGUF file's own blocks, taken as they are: `block_source`).
    if config.weight_quant in SCALED_FORMATS or config.weight_quant in BLOCK_FORMATS:
        specs = [dataclasses.replace(s, quant=config.weight_quant) if s.in_dims else s for s in specs]
    # A tied embedding that the GGUF file stores in blocks too (SmolLM2's Q8_0: a fifth of its float32 bytes) stays
    # in them, inputs-last as the head's weight [V, E]; the lookup decodes the rows it gathers.
    if config.weight_quant in BLOCK_FORMATS and config.embedding_blocks and config.tie_word_embeddings:
        embedding = transposed("embed/embedding", names.embed, (E, V), ("embed", "vocab_in"))
        specs[0] = dataclasses.replace(embedding, in_dims=1, quant=config.embedding_blocks)
    # bf16 (CPU): every matmul weight in bfloat16, the embedding and the head too (a fifth of SmolLM2-135M's
    # bytes; bf16 is no coarser for them than for the layers), the head inputs-last as the layers' weights
    elif config.weight_quant == "bf16":
        head = {"embed/embedding": 0, "lm_head/kernel": 1}
        specs = [dataclasses.replace(s, quant="bf16", in_dims=head.get(s.path, s.in_dims))
                 if s.in_dims or s.path in head else s for s in specs]
    # --lm-head-quant: the head too, one scale per vocabulary row (ModelConfig.head_quant)
    if config.head_quant is not None:
        specs = [dataclasses.replace(s, quant=config.head_quant, in_dims=1) if s.path == "lm_head/kernel" else s
                 for s in specs]
    return specs


@functools.cache
def _specs_by_path(config: ModelConfig) -> dict[str, ParamSpec]:
    return {spec.path: spec for spec in param_specs(config)}


def param_spec(config: ModelConfig, path: str) -> ParamSpec:
    """The declaration of the parameter at `path`, e.g. "layers_3/attn/wqkv"."""
    specs = _specs_by_path(config)
    if path not in specs:
        raise ValueError(f"no parameter {path!r} is declared for this config (model/loader.py param_specs)")
    return specs[path]


def param_shapes(config: ModelConfig, dtype: jax.typing.DTypeLike = jnp.float32) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s (no memory)."""
    dtype = _float_dtype(dtype)
    return _nest((path, jax.ShapeDtypeStruct(shape, leaf_dtype))
                 for spec in param_specs(config) for path, shape, _, leaf_dtype in spec.leaves(dtype))


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """The parameter pytree as the `NamedSharding` each parameter's logical axes give on `mesh`."""
    return _nest((path, sharding_for(path, shape, mesh, axes))
                 for spec in param_specs(config) for path, shape, axes, _ in spec.leaves(np.dtype(np.float32)))


# ----- loading -----------------------------------------------------------------------------------------


def load_params(
    path: str | os.PathLike[str],
    config: ModelConfig,
    dtype: jax.typing.DTypeLike,
    mesh: Mesh | None = None,
    on_loaded: Callable[[int, int, int, int], None] | None = None,
) -> Params:
    """Read a local checkpoint (safetensors, or a GGUF file) into the fused layout, cast to `dtype`, placed
    on `mesh` (one device when None). Everything is checked against `config` before the first byte is read.

    on_loaded: called after each parameter is on the device with the checkpoint tensors read so far, of
    how many, and their bytes so far, of how many (start-up progress).
    """
    from model.gguf import find_gguf_file, gguf_tensors  # imported here: model.gguf builds on this module

    gguf_file = find_gguf_file(path)
    tensors = gguf_tensors(gguf_file) if gguf_file is not None else fp8_checkpoint(checkpoint_tensors(path))
    return place_params(tensors, config, dtype, mesh, on_loaded)


def place_params(
    tensors: Mapping[str, CheckpointTensor],
    config: ModelConfig,
    dtype: jax.typing.DTypeLike,
    mesh: Mesh | None = None,
    on_loaded: Callable[[int, int, int, int], None] | None = None,
) -> Params:
    """`load_params` from a checkpoint's tensors, whatever file format holds them."""
    dtype = _float_dtype(dtype)
    mesh = mesh or make_mesh(1)
    specs = param_specs(config)
    _check_tensors(tensors, specs, config)
    shardings = _flatten(param_shardings(config, mesh))
    sizes = {s.name: tensors[s.name].nbytes for spec in specs for s in spec.sources}
    done, done_bytes = 0, 0
    flat = {}
    for spec in specs:
        as_blocks = is_block_format(spec.quant) and all(block_source(tensors[s.name], spec.quant) for s in spec.sources)
        raw = [_read_source(tensors[s.name], s, spec.quant if as_blocks else None, mesh) for s in spec.sources]
        paths = [path for path, *_ in spec.leaves(dtype)]
        placed = _assembler(spec.fuse, dtype, tuple(shardings[p] for p in paths), spec.quant, spec.in_dims,
                            current_platform())(raw)
        flat.update(zip(paths, placed, strict=True))
        # Transfers are asynchronous: without this wait every raw tensor could be in flight at once,
        # doubling device memory; with it the extra is one parameter's raw copy.
        jax.block_until_ready(placed)
        if on_loaded is not None:
            done += len(spec.sources)
            done_bytes += sum(sizes[s.name] for s in spec.sources)
            on_loaded(done, len(sizes), done_bytes, sum(sizes.values()))
    return _nest(flat.items())


def _read_source(tensor: CheckpointTensor, source: Source, blocks: str | None, mesh: Mesh) -> jax.Array:
    """One source tensor on the devices in its view: its floats, or its GGUF blocks of format `blocks` (the
    view's last, input, dimension in bytes)."""
    view = source.view if blocks is None else block_bytes_shape(source.view, blocks)
    host = tensor.read() if blocks is None else tensor.read_blocks()
    return _place(host.reshape(view), sharding_for(source.name, view, mesh, source.axes))


def _place(tensor: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The mapped tensor on `sharding`'s devices, each of this process's devices given only its own slice.

    Slicing the memory map reads only those bytes from the file, so with a mesh over several hosts each
    process reads its own shards and no others (`jax.device_put` would refuse devices of other processes).
    """
    return jax.make_array_from_callback(tensor.shape, sharding, lambda index: np.asarray(tensor[index]))


def checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder: `model.safetensors`, or the shards its index names."""
    directory = Path(path)
    if (directory / SINGLE_FILE).is_file():
        return _as_causal_lm(_read_header(directory / SINGLE_FILE))
    index_file = directory / INDEX_FILE
    if not index_file.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    weight_map = json.loads(index_file.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file} has no weight_map")
    tensors: dict[str, TensorInfo] = {}
    for file_name in sorted(set(weight_map.values())):
        for name, info in _read_header(directory / file_name).items():
            if name in tensors:
                raise ValueError(
                    f"tensor {name} is stored twice, in {tensors[name].file.name} and {file_name}"
                )
            tensors[name] = info
    misplaced = [
        name for name, file in weight_map.items() if name not in tensors or tensors[name].file.name != file
    ]
    if misplaced:
        raise ValueError(
            f"{index_file} places tensors where its files do not hold them: {_listing(misplaced)}"
        )
    return _as_causal_lm(tensors)


def _as_causal_lm(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """A bare decoder's tensors (transformers' `*Model` saved on its own, as embedding models such as
    Qwen3-Embedding ship, whatever their config names) under the causal LM's names: "model." before each."""
    if any(name.startswith("model.") for name in tensors) or not any(name.startswith("layers.") for name in tensors):
        return tensors
    return {f"model.{name}": info for name, info in tensors.items()}


def _read_header(file: Path) -> dict[str, TensorInfo]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing")
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    data_start = 8 + header_size
    return {
        name: TensorInfo(file, entry["dtype"], tuple(entry["shape"]), data_start + entry["data_offsets"][0])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _check_tensors(tensors: Mapping[str, CheckpointTensor], specs: list[ParamSpec], config: ModelConfig) -> None:
    """Refuse a checkpoint that does not match `config`, listing every problem at once."""
    expected = {source.name: source for spec in specs for source in spec.sources}
    # A tied checkpoint may still carry its LM head; transformers ignores it then, and so do we.
    ignored = {FAMILY_NAMES[config.family].lm_head} if config.tie_word_embeddings else set()
    present = {name for name in tensors if not IGNORED_TENSORS.search(name) and name not in ignored}
    problems = []
    if missing := sorted(expected.keys() - present):
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected := sorted(present - expected.keys()):
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    for name in sorted(expected.keys() & present):
        info, shape = tensors[name], expected[name].shape
        if info.shape != shape:
            problems.append(f"{name} has shape {list(info.shape)}, the model config implies {list(shape)}")
        if isinstance(info, TensorInfo) and info.dtype not in SAFETENSORS_DTYPES:
            problems.append(f"{name} is {info.dtype}; only {', '.join(SAFETENSORS_DTYPES)} checkpoints load")
    if problems:
        raise ValueError("checkpoint does not match its config:\n  " + "\n  ".join(problems))


# ----- random weights ------------------------------------------------------------------------------------


def init_random_params(
    config: ModelConfig, dtype: jax.typing.DTypeLike, seed: int, mesh: Mesh | None = None
) -> Params:
    """Random parameters in the loaded layout, generated on the devices already sharded (benchmarks at
    real shapes without a download), each drawn by its declared initializer."""
    dtype = _float_dtype(dtype)
    shardings = _flatten(param_shardings(config, mesh or make_mesh(1)))
    specs = param_specs(config)
    # XLA's RngBitGenerator compiles in a fraction of threefry's time; these weights need no quality.
    # One key per parameter, in the pytree's leaf order (so a seed gives the same weights, quantized or not).
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), len(specs))
    leaf_order = list(_flatten(_nest((spec.path, 0) for spec in specs)))
    flat = {}
    for spec in specs:
        key = keys[leaf_order.index(spec.path)]
        paths = [path for path, *_ in spec.leaves(dtype)]
        generate = _generator(spec.init, spec.shape, dtype, tuple(shardings[p] for p in paths), spec.quant,
                              spec.in_dims, current_platform())
        flat.update(zip(paths, generate(key), strict=True))
    return _nest(flat.items())


# One compiled generator per distinct (initializer, shape, dtype, shardings, quant, platform: see `_assembler`):
# a handful, however many layers. A quantized parameter is drawn and quantized on the device, like a loaded one.
@functools.cache
def _generator(
    init: Init, shape: tuple[int, ...], dtype: np.dtype, shardings: tuple[NamedSharding, ...], quant: str | None,
    in_dims: int, platform: str,
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    initializer = INITIALIZERS[init]
    # Quantized weights are drawn in f32 for their scales; others in the serving dtype, as no f32 copy is needed.
    draw_dtype = dtype if quant is None else jnp.float32
    return jax.jit(lambda key: stored_weight(initializer(key, shape, draw_dtype), dtype, quant, in_dims),
                   out_shardings=shardings)


# ----- small helpers -------------------------------------------------------------------------------------


def _float_dtype(dtype: jax.typing.DTypeLike) -> np.dtype:
    resolved = jnp.dtype(dtype)
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"parameters need a floating dtype, got {resolved}")
    return resolved


def _nest(items: Iterable[tuple[str, Any]]) -> Params:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: Params = {}
    for path, value in items:
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flatten(tree: Params) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(entry.key) for entry in path): leaf for path, leaf in flat}


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
