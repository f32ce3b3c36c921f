"""The Llama-family decoder in Flax, reading and writing a paged KV cache.

Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 and InternLM2/2.5 are this one decoder with options from
`ModelConfig`: q/k/v and output biases, per-head q/k RMSNorm before RoPE (Qwen3), tied embeddings,
and every RoPE recipe (dynamic NTK's frequencies are computed per row from its sequence length).

One forward serves prefill chunks and decode steps alike: a batch is `[B, T]` tokens where row b holds
T consecutive tokens of one sequence starting at `positions[b, 0]`; decode is T=1. A packed step
(`AttentionBatch.packed_index`) runs its matmuls over only the valid tokens, packed as `[1, N]`, and
lays them out as `[B, T]` just around attention. Each layer writes the new keys/values into its pages
first and then attends over the pages, so chunked prefill and cached prefixes need no special case.
Layers are separate modules with their own parameters (unrolled, not `lax.scan`): on the H100 that ran
2.4x faster per decode step, because each layer's weights and cache are separate buffers XLA can
stream and update in place.

Each parameter's shape and initializer are read from its one declaration (model/loader.py's
`param_specs`, through `declared_param`), which also gives its sharding and checkpoint source.

Shapes use: B batch rows, T tokens per row, E embed, Hq query heads, Hkv KV heads, G = Hq/Hkv,
D head_dim, F ffn, V vocab, P pages, PS page size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.config import ModelConfig
from model.loader import INITIALIZERS, SCALE_SUFFIX, param_spec
from model.rope import attention_scaling, dynamic_inv_frequencies, inv_frequencies
from model.sharding import (
    KV_CACHE_AXES,
    KV_SCALE_AXES,
    make_mesh,
    shard_by_kv_head,
    shard_rope_write,
    sharding_for,
)
from model.weight_quant import (
    InputsLastWeight,
    Scaled,
    Weight,
    compiler_options,
    has_scales,
    is_block_format,
    linear,
    stored_inputs_last,
    values_shape,
)
from xlkernels import get_paged_attention, write_kv_pages
from xlkernels.cpu_blocks import dequantize_blocks, lanes_applies, take_block_rows
from xlkernels.kv_quant import Pages, QuantizedPages, empty_pages, rotation, token_head_bytes
from xlkernels.rms_norm import get_add_rms_norm, rms_norm
from xlkernels.rope_kv import get_rope_write, rotate
from xlkernels.shared_prefix import SharedPrefix

# Per-layer paged cache: (k_pages, v_pages), each [Hkv, P, PS, D], or quantized per token and KV head
# (`--quant-policy`, xlkernels.kv_quant). The whole cache is a list over layers.
LayerCache = tuple[Pages, Pages]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionBatch:
    """Where each token of the step sits in its sequence and in the cache."""

    positions: jax.Array  # i32[B, T] absolute position of each token
    valid: jax.Array  # bool[B, T] False for padding tokens (never written, never attended from)
    kv_lens: jax.Array  # i32[B] tokens in the cache after this step (start + valid tokens)
    block_tables: jax.Array  # i32[B, pages_per_seq] page ids of each row
    # Decode steps (T == 1) only: rows grouped by shared leading pages, for the Pallas kernels to read those
    # pages once per tile of rows; a hint about how to attend, never a change to the result.
    shared: SharedPrefix | None = None
    # Packed steps: i32[N] the flat index (b * T + t) of each of the N tokens the matmuls compute, the
    # step's valid tokens in order, then indices past B * T (padding). The model's activations are then
    # [1, N, ...] and only attention sees the [B, T] layout. None: the activations are [B, T, ...].
    packed_index: jax.Array | None = None
    # Mixed steps (packed only): a [D, 1] batch of decoding rows, which are the model's first D rows; the
    # fields above are its other rows'. Their tokens (first of each of the D rows) lead the packed stream
    # ([1, D + N, ...]); a row not valid in it is padding, computed and dropped.
    decode: AttentionBatch | None = None

    @property
    def num_decode_rows(self) -> int:
        """D: the rows of a mixed step's `decode` batch (0 for any other step)."""
        return 0 if self.decode is None else self.decode.positions.shape[0]


def pack(x: jax.Array, index: jax.Array) -> jax.Array:
    """[B, T, ...] -> [1, N, ...]: the tokens at `index` (flat b * T + t); zeros where it points past B * T."""
    flat = x.reshape(-1, *x.shape[2:])
    return jnp.take(flat, index, axis=0, mode="fill", fill_value=0)[None]


def unpack(x: jax.Array, index: jax.Array, layout: tuple[int, int]) -> jax.Array:
    """[1, N, ...] -> [B, T, ...] = layout: each token back at `index`, zeros elsewhere (padding drops)."""
    flat = jnp.zeros((layout[0] * layout[1], *x.shape[2:]), x.dtype)
    return flat.at[index].set(x[0], mode="drop").reshape(*layout, *x.shape[2:])


def write_views(q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache,
                batch: AttentionBatch) -> tuple[LayerCache, list[tuple[jax.Array, AttentionBatch]]]:
    """Write the step's keys and values into their pages; the queries as the rows attention reads, each with its
    batch: one view, or a packed step's tokens laid out as [B, T] (and a mixed step's decoding rows as [D, 1])."""
    if batch.packed_index is None:
        views = [((q, k, v), batch)]
    else:
        d = batch.num_decode_rows
        views = [(tuple(a[0, :d, None] for a in (q, k, v)), batch.decode)] if d else []
        views.append((tuple(unpack(a[:, d:], batch.packed_index, batch.positions.shape) for a in (q, k, v)), batch))
    # Every view writes before any attends: a write after a read of the pages would make XLA copy the pool.
    for (_, k_rows, v_rows), rows in views:
        cache = write_kv_pages(*cache, k_rows, v_rows, rows.block_tables, rows.positions, rows.valid)
    return cache, [(q_rows, rows) for (q_rows, _, _), rows in views]


def rope_tables(batch: AttentionBatch, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin f32[B, T, 1, D/2] for the batch's positions, with yarn's attention scaling folded in."""
    if config.rope.rope_type == "dynamic":  # [B, 1, D/2]: each row's frequencies follow its length
        inv_freq = dynamic_inv_frequencies(config.rope, config.head_dim, batch.kv_lens)[:, None, :]
    else:
        inv_freq = jnp.asarray(inv_frequencies(config.rope, config.head_dim), jnp.float32)
    angles = batch.positions.astype(jnp.float32)[..., None] * inv_freq
    scaling = attention_scaling(config.rope)

    def tables(angles: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (jnp.cos(angles) * scaling)[:, :, None, :], (jnp.sin(angles) * scaling)[:, :, None, :]

    if jax.default_backend() != "cpu":
        return tables(angles)
    # On CPU, computed once a step behind a conditional XLA cannot see through: fused into their consumers,
    # XLA:CPU recomputed the cosines and sines for every query and key head of every layer (SmolLM2's 16-row
    # decode step: ~3 ms of its ~30). An optimization barrier is gone before fusion there.
    return jax.lax.cond(jnp.all(angles == angles), tables, lambda a: tables(a + jnp.nan), angles)


def declared_param(module: nn.Module, name: str) -> Weight:
    """The parameter `name` of `module` (which has `config` and `dtype`), with the shape and initializer that
    model/loader.py's `param_specs` declares for its path. Flax checks each parameter it is given against
    that shape whenever the model is traced; the values come from the loader or `init_random_params`.
    A matmul weight stored inputs-last (quantized, or any on CPU: model/weight_quant.py) comes back as an
    `InputsLastWeight` (its values, and scales if quantized), for `linear`."""
    spec = param_spec(module.config, "/".join((*module.path, name)))
    if not spec.in_dims or not stored_inputs_last(spec.quant):
        return module.param(name, INITIALIZERS[spec.init], spec.shape, module.dtype)
    blocks = spec.quant if is_block_format(spec.quant) else None
    values = module.param(name, INITIALIZERS[spec.init], values_shape(spec.shape, spec.in_dims, spec.quant),
                          module.dtype)
    scale = None if not has_scales(spec.quant) else module.param(
        name + SCALE_SUFFIX, INITIALIZERS["ones"], spec.shape[spec.in_dims:], jnp.float32)
    lanes = blocks is not None and lanes_applies(values.shape)
    return InputsLastWeight(values, scale, spec.in_dims, blocks, lanes)


class RMSNorm(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, declared_param(self, "scale"), self.config.rms_norm_eps)


class AddRMSNorm(nn.Module):
    """The residual add and the next branch's RMSNorm, one kernel on the Pallas backend (xlkernels.rms_norm).
    Same parameter ("scale") as RMSNorm, so checkpoints load either way."""

    config: ModelConfig
    dtype: jnp.dtype
    backend: str

    @nn.compact
    def __call__(self, x: jax.Array, delta: jax.Array | Scaled | None) -> tuple[jax.Array, jax.Array]:
        """(x + delta, normed); a `Scaled` delta is scaled and rounded inside the kernel."""
        scale = declared_param(self, "scale")
        delta, delta_scale = delta if isinstance(delta, Scaled) else (delta, None)
        return get_add_rms_norm(self.backend)(x, delta, scale, self.config.rms_norm_eps, delta_scale)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention_backend: str
    mesh: Mesh | None = None  # with tensor parallelism, custom kernels run per device (shard_by_kv_head, ...)

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], cache: LayerCache, batch: AttentionBatch
    ) -> tuple[jax.Array | Scaled, LayerCache]:
        cfg = self.config
        group, head_dim = cfg.q_per_kv, cfg.head_dim
        wqkv = declared_param(self, "wqkv")  # [E, Hkv, G+2, D]
        wo = declared_param(self, "wo")  # [Hq, D, E]

        cos, sin = rope
        # Quantized pages hold keys and values turned by a Hadamard rotation (xlkernels.kv_quant, "Outlier
        # channels"); the query turns with them and the output turns back, so attention is unchanged.
        turn = rotation(head_dim) if isinstance(cache[0], QuantizedPages) else None
        fused_rope = batch.packed_index is None and turn is None and not cfg.qk_norm
        # [B, T, Hkv, G+2, D]; a quantized weight's one-row product unscaled (`Scaled`) where the rope kernel
        # scales and rounds it (a bias is added to the rounded product, as before)
        qkv = linear(x, wqkv, keep_scale=fused_rope and not cfg.attention_bias)
        if cfg.attention_bias:
            qkv = qkv + declared_param(self, "bqkv")
        if fused_rope:
            # The rotations and the cache writes: one kernel on the Pallas backend (xlkernels.rope_kv).
            rope_write = get_rope_write(self.attention_backend)
            if self.mesh is not None and self.mesh.size > 1:
                rope_write = shard_rope_write(rope_write, self.mesh)
            qkv, qkv_scale = qkv if isinstance(qkv, Scaled) else (qkv, None)
            q, k_pages, v_pages = rope_write(qkv, cos, sin, *cache, batch.block_tables, batch.positions, batch.valid,
                                             dtype=self.dtype, qkv_scale=qkv_scale)
            cache, views = (k_pages, v_pages), [(q, batch)]
        else:
            batch_size, num_tokens = x.shape[:2]
            q = qkv[:, :, :, :group].reshape(batch_size, num_tokens, cfg.num_heads, head_dim)
            k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]  # [B, T, Hkv, D]
            if cfg.qk_norm:  # Qwen3 normalises each head over head_dim, before the rotation
                q = RMSNorm(cfg, self.dtype, name="q_norm")(q)
                k = RMSNorm(cfg, self.dtype, name="k_norm")(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if turn is not None:
                q, k, v = (jnp.einsum("...d,de->...e", a, turn.astype(a.dtype)) for a in (q, k, v))
            cache, views = write_views(q, k, v, cache, batch)
        attend = get_paged_attention(self.attention_backend)
        if self.mesh is not None and self.mesh.size > 1:
            attend = shard_by_kv_head(attend, self.mesh)
        outs = [attend(q_rows, *cache, rows.block_tables, rows.positions, rows.kv_lens, scale=head_dim**-0.5,
                       shared=rows.shared) for q_rows, rows in views]
        if batch.packed_index is None:
            out = outs[0]
        else:
            out = jnp.concatenate([*(o[None, :, 0] for o in outs[:-1]), pack(outs[-1], batch.packed_index)], axis=1)
        if turn is not None:
            out = jnp.einsum("...d,de->...e", out, turn.astype(out.dtype))
        # Contracts (Hq, D) as one [Hq * D] dim; a quantized weight's one-row product stays unscaled (`Scaled`):
        # the next add + RMSNorm kernel scales and rounds it.
        out = linear(out.reshape(*out.shape[:2], -1), wo, in_dims=2, keep_scale=not cfg.attention_out_bias)
        if cfg.attention_out_bias:  # Llama and InternLM2 bias it with q/k/v; Qwen2 biases only q/k/v
            out = out + declared_param(self, "bo")
        return out, cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | Scaled:
        w_gate_up = declared_param(self, "w_gate_up")  # [E, 2, F]
        gate_up = linear(x, w_gate_up)  # [B, T, 2, F]: one GEMM streams both weights
        if self.config.mlp_bias:
            gate_up = gate_up + declared_param(self, "b_gate_up")
        hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
        # [F, E]; a quantized weight's one-row product stays unscaled (`Scaled`): the next add + RMSNorm scales it
        out = linear(hidden, declared_param(self, "w_down"), keep_scale=not self.config.mlp_bias)
        if self.config.mlp_bias:
            out = out + declared_param(self, "b_down")
        return out


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention_backend: str
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, E] the residual stream, still without `delta`
        delta: jax.Array | Scaled | None,  # [B, T, E] the previous layer's MLP output (None before the first)
        rope: tuple[jax.Array, jax.Array],
        cache: LayerCache,
        batch: AttentionBatch,
    ) -> tuple[jax.Array, jax.Array | Scaled, LayerCache]:  # (stream, this layer's MLP output, cache)
        """One layer. Each residual add is deferred to the norm that reads the sum (one fused kernel), so
        the layer returns its MLP output unadded: the next layer's first norm, or the final one, adds it."""
        cfg, backend = self.config, self.attention_backend
        x, h = AddRMSNorm(cfg, self.dtype, backend, name="attn_norm")(x, delta)
        attn_out, cache = Attention(cfg, self.dtype, backend, self.mesh, name="attn")(h, rope, cache, batch)
        x, h = AddRMSNorm(cfg, self.dtype, backend, name="mlp_norm")(x, attn_out)
        return x, MLP(self.config, self.dtype, name="mlp")(h), cache


class CausalLM(nn.Module):
    """Llama-family causal LM over a paged cache. Returns logits and the updated cache."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.bfloat16
    attention_backend: str = "xla"
    mesh: Mesh | None = None  # the parameters' mesh: needed only to run custom kernels under tensor parallelism

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # i32[B, T]
        batch: AttentionBatch,
        cache: list[LayerCache],
        logits_index: jax.Array | None = None,  # i32[B]: one position per row, or None for every position
        with_hidden: bool = False,  # also return the final norm's output at `logits_index` (embeddings)
    ) -> tuple[jax.Array, list[LayerCache]] | tuple[jax.Array, list[LayerCache], jax.Array]:
        """f32[B, V] logits (or f32[B, T, V]) and the new cache; with `with_hidden`, also the hidden state the LM
        head reads at `logits_index`, [B, E] in the activations' dtype."""
        cfg = self.config
        embed = Embed(cfg, self.dtype, name="embed")
        rope = rope_tables(batch, cfg)
        if batch.packed_index is not None:  # every layer's matmuls run over the N packed tokens only
            d = batch.num_decode_rows
            decode_tokens = tokens[None, :d, 0]  # a mixed step's decoding rows: their tokens lead the stream
            tokens = pack(tokens[d:], batch.packed_index)
            rope = tuple(pack(table, batch.packed_index) for table in rope)
            if d:
                tokens = jnp.concatenate([decode_tokens, tokens], axis=1)
                rope = tuple(jnp.concatenate([table[None, :, 0], packed], axis=1)
                             for table, packed in zip(rope_tables(batch.decode, cfg), rope, strict=True))
            if logits_index is not None:  # each row's sampled token, as an index into the packed tokens
                packed_position = jnp.cumsum(batch.valid.reshape(-1)) - 1
                row_starts = jnp.arange(batch.valid.shape[0]) * batch.valid.shape[1]
                prompt_index = jnp.maximum(packed_position[row_starts + logits_index[d:]], 0) + d
                logits_index = jnp.concatenate([jnp.arange(d, dtype=prompt_index.dtype), prompt_index])
        x = embed(tokens)
        new_cache = []
        delta = None
        for i in range(cfg.num_layers):
            layer = DecoderLayer(cfg, self.dtype, self.attention_backend, self.mesh, name=f"layers_{i}")
            x, delta, layer_cache = layer(x, delta, rope, cache[i], batch)
            new_cache.append(layer_cache)
        step_rows = math.prod(x.shape[:-1])  # what the layers multiply; the head sees only the sampling rows
        sums = delta.total if isinstance(delta, Scaled) else delta  # [B, T, E]
        if logits_index is not None and batch.packed_index is not None:  # one packed token per row
            x, sums = x[0, logits_index], sums[0, logits_index]
        elif logits_index is not None:  # only the rows' sampled positions reach the LM head
            x, sums = (jnp.take_along_axis(a, logits_index[:, None, None], axis=1)[:, 0] for a in (x, sums))
        delta = delta._replace(total=sums) if isinstance(delta, Scaled) else sums
        _, x = AddRMSNorm(cfg, self.dtype, self.attention_backend, name="final_norm")(x, delta)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = LMHead(cfg, self.dtype, name="lm_head")(x, step_rows)
        if logits_index is None and batch.packed_index is not None:
            logits = unpack(logits, batch.packed_index, batch.positions.shape)
        if with_hidden:
            return logits.astype(jnp.float32), new_cache, x
        return logits.astype(jnp.float32), new_cache


class Embed(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    def setup(self) -> None:
        self.embedding = declared_param(self, "embedding")  # [V, E], or a GGUF file's blocks of it (loader.py)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if isinstance(self.embedding, InputsLastWeight):  # blocks u8[V, E / 32 * bytes]: decode the rows gathered
            table = self.embedding
            return dequantize_blocks(take_block_rows(table.values, tokens, table.blocks, table.lanes),
                                     table.blocks).astype(self.dtype)
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)  # bf16 rows widen (--weight-quant bf16)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits f32[..., V] from the tied embedding.

        On CPU the vocabulary is split in two halves as a batch dimension: XLA:CPU's (Eigen's) contraction
        runs a [rows, E] x [E, V] product of a large V at about half the rate it runs two of V / 2 (16 rows
        of SmolLM2-135M: 14.9 ms against 8.6 ms with the transpose back; docs/perf-notes.md). On the GPU,
        the single GEMM is the better one. A bfloat16 table under float32 activations (`--weight-quant bf16`),
        or a GGUF file's blocks, is an inputs-last matmul weight [V, E] like the layers' (model/weight_quant.py).
        """
        if isinstance(self.embedding, InputsLastWeight):
            return linear(x, self.embedding).astype(jnp.float32)
        if self.embedding.dtype != self.dtype:
            return linear(x, InputsLastWeight(self.embedding, None)).astype(jnp.float32)
        if jax.default_backend() != "cpu" or self.embedding.shape[0] % 2:
            return jnp.einsum("...e,ve->...v", x, self.embedding, preferred_element_type=jnp.float32)
        halves = self.embedding.reshape(2, -1, self.embedding.shape[-1])  # [2, V/2, E]: a free reshape
        logits = jnp.einsum("...e,hve->h...v", x, halves, preferred_element_type=jnp.float32)
        return jnp.moveaxis(logits, 0, -2).reshape(*x.shape[:-1], -1)


class LMHead(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, step_rows: int) -> jax.Array:  # f32[..., V]
        """step_rows: the token rows the step's layers multiply (x holds only the rows that sample)."""
        kernel = declared_param(self, "kernel")  # [E, V], or bf16 [V, E] (--weight-quant bf16), or int8 [V, E]
        if not isinstance(kernel, InputsLastWeight):
            return jnp.einsum("...e,ev->...v", x, kernel, preferred_element_type=jnp.float32)
        if kernel.scale is None:
            return linear(x, kernel).astype(jnp.float32)
        # int8 (--lm-head-quant): logits in f32, as the unquantized head's. A program compiled without Triton's GEMMs
        # (`compiler_options`: fp8 layers' native steps) cannot fuse the convert into the dot: blocks of the head
        # then, never a bf16 copy of it.
        blocked = bool(compiler_options(step_rows, self.config.weight_quant))  # never on CPU, whose products block
        return linear(x, kernel, strategy="blocked" if blocked else None, out_dtype=jnp.float32)


def empty_cache(
    config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype, mesh: Mesh | None = None,
    kv_format: str | None = None,
) -> list[LayerCache]:
    """The preallocated paged cache: one (k, v) pair of zeroed [Hkv, P, PS, D] pools per layer (in `dtype`,
    or quantized: `kv_format` int8, int4 or fp8), created on the devices already split by KV head (never
    materialised on the host)."""
    shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    mesh = mesh or make_mesh(1)
    layout = jax.eval_shape(lambda: empty_pages(kv_format, shape, dtype))
    if isinstance(layout, QuantizedPages):
        sharding = QuantizedPages(sharding_for("kv_cache", layout.data.shape, mesh, KV_CACHE_AXES),
                                  sharding_for("kv_cache_scale", layout.scale.shape, mesh, KV_SCALE_AXES), kv_format)
    else:
        sharding = sharding_for("kv_cache", shape, mesh, KV_CACHE_AXES)
    zeros = jax.jit(lambda: empty_pages(kv_format, shape, dtype), out_shardings=sharding)
    return [(zeros(), zeros()) for _ in range(config.num_layers)]


def kv_bytes_per_token(config: ModelConfig, dtype: jnp.dtype, kv_format: str | None = None) -> int:
    """Cache bytes one token occupies across all layers (K and V), scales included when quantized."""
    return 2 * config.num_layers * config.num_kv_heads * token_head_bytes(kv_format, config.head_dim, dtype)
