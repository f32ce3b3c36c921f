"""Where every array lives on the device mesh: logical axis names mapped to mesh axes, in one table.

Each parameter declares the logical axis names of its dimensions (what a dimension *is*: model/loader.py's
`param_specs`); `LOGICAL_RULES` maps those to mesh axes (where it is split), so trying another split is
a change to that table alone. Tensor parallelism splits attention by KV head (each device keeps whole GQA
groups, so attention needs no communication), the MLP by its hidden dimension, and the LM head by
vocabulary; everything else is replicated. Layer code never mentions sharding: parameters arrive placed,
and XLA's partitioner inserts the two all-reduces per layer (after `wo` and after `w_down`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from xlkernels.kv_quant import Pages, QuantizedPages

TP_AXIS = "tp"

Axes = tuple[str | None, ...]

# The paged KV cache, [Hkv, P, PS, D] per layer: split by KV head like the attention weights, so each
# device attends over its own heads' pages.
KV_CACHE_AXES: Axes = ("kv_heads", None, None, "head_dim")
# Scales of quantized pages, [Hkv, halves, P, PS / halves] (xlkernels.kv_quant): split with their pages.
KV_SCALE_AXES: Axes = ("kv_heads", None, None, None)

# Logical axis -> mesh axis (None = replicated), in flax's `logical_axis_rules` format. The embedding
# table stays whole ("vocab_in") so a token lookup is a local gather, not a collective.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("kv_heads", TP_AXIS),
    ("q_heads", TP_AXIS),
    ("ffn", TP_AXIS),
    ("vocab", TP_AXIS),
    ("vocab_in", None),
    ("embed", None),
    ("head_dim", None),
    ("norm", None),
)


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the first `tp` devices, axis "tp".

    Axes are `Auto` (jax now defaults to `Explicit`) so jitted layer code stays sharding-agnostic.
    """
    available = list(devices) if devices is not None else jax.devices()
    if tp < 1 or tp > len(available):
        raise ValueError(f"tp={tp} needs between 1 and {len(available)} devices (found {len(available)})")
    return jax.make_mesh((tp,), (TP_AXIS,), (AxisType.Auto,), devices=available[:tp])


def logical_to_spec(axes: Axes) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `LOGICAL_RULES`."""
    rules = dict(LOGICAL_RULES)
    unknown = [axis for axis in axes if axis is not None and axis not in rules]
    if unknown:
        raise ValueError(f"logical axes {unknown} have no rule in LOGICAL_RULES")
    return PartitionSpec(*(rules[axis] if axis is not None else None for axis in axes))


def sharding_for(path: str, shape: Sequence[int], mesh: Mesh, axes: Axes) -> NamedSharding:
    """The NamedSharding of the array at `path` (named in errors) whose dimensions have logical `axes`.

    Refuses a split that does not divide evenly, naming what to change.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{path}: shape {tuple(shape)} does not match logical axes {axes}")
    spec = logical_to_spec(axes)
    for size, logical, mesh_axis in zip(shape, axes, spec, strict=True):
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            what = "num_key_value_heads" if logical == "kv_heads" else f"its {logical!r} dimension"
            parts = mesh.shape[mesh_axis]
            raise ValueError(f"cannot shard {path}: {what} ({size}) is not divisible by {mesh_axis}={parts}")
    return NamedSharding(mesh, spec)


# Attention inputs in `xlkernels`' layout: q [B, T, Hq, D] split by query head, the page pools
# [Hkv, P, PS, D] by KV head (each device keeps whole GQA groups), every index table replicated.
ATTENTION_Q_AXES: Axes = (None, None, "q_heads", "head_dim")
# The qkv matmul's output [B, T, Hkv, G+2, D], split with its weight's KV heads.
QKV_AXES: Axes = (None, None, "kv_heads", None, "head_dim")


def shard_by_kv_head(attend: Callable[..., jax.Array], mesh: Mesh) -> Callable[..., jax.Array]:
    """`attend` (the `xlkernels` attention contract) run on each device's own heads under `shard_map`.

    XLA's partitioner cannot look inside a custom kernel (a Pallas call), so given sharded pages it
    would gather every device's KV cache around each call; per device, attention needs only its own
    heads, which is what this runs. The XLA attention runs under it too: it gathers one KV head at a
    time (`xlkernels.xla_attention`), which the partitioner would otherwise serve by moving each head's
    pages between devices.
    """
    q_spec = logical_to_spec(ATTENTION_Q_AXES)
    replicated = PartitionSpec()

    def sharded(q, k_pages, v_pages, block_tables, q_positions, kv_lens, *, scale: float, shared=None):
        def local(q, k_pages, v_pages, block_tables, q_positions, kv_lens, shared):
            return attend(q, k_pages, v_pages, block_tables, q_positions, kv_lens, scale=scale, shared=shared)

        kv_spec = pool_spec(k_pages)
        return jax.shard_map(
            local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, replicated, replicated, replicated, replicated),
            out_specs=q_spec, check_vma=False,
        )(q, k_pages, v_pages, block_tables, q_positions, kv_lens, shared)

    return sharded


def pool_spec(pages: Pages) -> PartitionSpec | QuantizedPages:
    """The PartitionSpec (a pytree of them, for quantized pages) that splits a page pool by KV head."""
    if isinstance(pages, QuantizedPages):
        return QuantizedPages(logical_to_spec(KV_CACHE_AXES), logical_to_spec(KV_SCALE_AXES), pages.kind)
    return logical_to_spec(KV_CACHE_AXES)


def shard_rope_write(rope_write: Callable[..., tuple], mesh: Mesh) -> Callable[..., tuple]:
    """`rope_write` (`xlkernels.rope_kv`: the rotation and the cache writes) on each device's own KV heads under
    `shard_map`, as `shard_by_kv_head` runs attention: the qkv slab and the pools are split by KV head already."""
    qkv_spec, q_spec, replicated = logical_to_spec(QKV_AXES), logical_to_spec(ATTENTION_Q_AXES), PartitionSpec()

    def sharded(qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid, *, dtype, qkv_scale=None):
        def local(qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid, qkv_scale):
            return rope_write(qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid, dtype=dtype,
                              qkv_scale=qkv_scale)

        kv_spec = pool_spec(k_pages)
        return jax.shard_map(
            local, mesh=mesh, out_specs=(q_spec, kv_spec, kv_spec), check_vma=False,
            in_specs=(qkv_spec, replicated, replicated, kv_spec, kv_spec, replicated, replicated, replicated,
                      None if qkv_scale is None else logical_to_spec(QKV_AXES[2:])),
        )(qkv, cos, sin, k_pages, v_pages, block_tables, positions, valid, qkv_scale)

    return sharded
