"""GGUF's block formats (q4_0, q4_1, q8_0) as the CPU stores and multiplies them (xlkernels/cpu_blocks.py,
model/weight_quant.py): the bytes are the `gguf` package's own (or the same bytes in the lanes layout, on a CPU
with AVX-512 and without AMX), both decodes (XLA's, and the native kernel's in registers) give exactly its
float32 weights, and the native products are those weights' float32 products for any number of rows, padded
tiles included.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from model.weight_quant import BLOCKS_DECODE_MIN_ROWS, InputsLastWeight, linear, quantize_blocks, stored_weight
from xlkernels.cpu_blocks import (
    BLOCK_BYTES,
    HEADER_BYTES,
    blocks_decode,
    blocks_matmul,
    blocks_native_applies,
    dequantize_blocks,
    from_lanes,
    lanes_applies,
    take_block_rows,
    to_lanes,
)
from xlkernels.native_build import cpu_has_avx512, cpu_has_bf16_tiles

TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


def weights(rows: int, inputs: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, inputs)).astype(np.float32)
    w[0, :32] = 0.0  # a block of zeros: scale 0, as a pruned channel has
    w[1, :32] = 3.0  # a constant block: q4_1's range is 0
    return w


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_blocks_are_the_gguf_packages_bytes_and_decode_to_its_floats(kind):
    w = weights(48, 256)
    ours = np.asarray(jax.jit(quantize_blocks, static_argnums=1)(jnp.asarray(w), kind))
    theirs = quantize(w, TYPES[kind])
    assert ours.shape == (48, 256 // 32 * BLOCK_BYTES[kind]) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)
    assert blocks_native_applies(jnp.zeros((1, 256), jnp.float32)), "the native kernels must build here"
    for decode in (dequantize_blocks, blocks_decode):  # XLA's, the native kernel's
        decoded = np.asarray(jax.jit(decode, static_argnums=1)(jnp.asarray(theirs), kind))
        np.testing.assert_array_equal(decoded, dequantize(theirs, TYPES[kind]))


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, 256])
def test_native_products_are_the_float32_products_of_the_files_weights(kind, rows):
    """Tiles of 16 rows, the last one padded (3 -> 4, 17 -> 16 + 1, 40 -> 16 + 16 + 8), several tasks of
    channels; the weight [2, 72, 320] contracts as one [144, 320] matrix, as w_gate_up does. A long prompt
    chunk's rows (256) multiply the weight decoded whole by the kernel, through XLA's dot, on a CPU without
    AMX tiles."""
    assert blocks_native_applies(jnp.zeros((rows, 320), jnp.float32)), "the native kernels must build here"
    w = weights(144, 320, seed=rows)
    blocks = quantize(w, TYPES[kind]).reshape(2, 72, -1)
    exact = dequantize(blocks.reshape(144, -1), TYPES[kind]).astype(np.float64)  # the file's f32 weights
    x = np.random.default_rng(rows + 1).standard_normal((rows, 320)).astype(np.float32)
    product = jax.jit(lambda x, values: linear(x, InputsLastWeight(values, None, 1, kind)))
    got = np.asarray(product(x, blocks))
    assert got.shape == (rows, 2, 72) and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(rows, 144), x.astype(np.float64) @ exact.T, atol=2e-4, rtol=1e-5)
    hlo = product.lower(x, blocks).compile().as_text()
    if rows < BLOCKS_DECODE_MIN_ROWS or cpu_has_bf16_tiles():
        assert f"xlserve_blocks_matmul_{kind}" in hlo
        assert not re.search(r"f32\[(2,72,320|144,320|320,144)\]", hlo), "a float32 copy of the weight"
    else:
        assert f"xlserve_blocks_decode_{kind}" in hlo and re.search(rf"f32\[{rows},144\]\S* dot\(", hlo)


def unit_blocks(kind: str, n: int) -> np.ndarray:
    """Blocks for a weight [n, 32] whose channel c is 1.0 at input c and 0 elsewhere: scale 1, minimum 0."""
    code = {"q4_0": (9, 8), "q4_1": (1, 0), "q8_0": (1, 0)}[kind]  # (the code of 1.0, of 0.0)
    codes = np.where(np.eye(n, 32, dtype=bool), *code).astype(np.uint8)
    head = np.frombuffer(np.float16(1.0).tobytes() + (np.float16(0.0).tobytes() if kind == "q4_1" else b""), np.uint8)
    body = codes if kind == "q8_0" else codes[:, :16] | codes[:, 16:] << 4
    return np.concatenate([np.broadcast_to(head, (n, head.size)), body], axis=1)


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("tiles", [False, True])
def test_both_forms_of_the_kernel_give_the_float32_products(kind, tiles):
    """The AVX form and the tile form (AMX: codes times each input's three bfloat16 parts; where the CPU has no
    tiles the kernel keeps to AVX). A unit weight gives every input back bit for bit, all 24 bits of its
    significand (so no part of it is lost). Random weights against float64 products of the file's weights,
    for row tiles whole, padded and several (prompt chunks), channel tiles whole and partial (72 = 4 x 16 + 8)
    and tasks of several channel tiles (1,040 channels), with inputs spread over 2^-20 .. 2^10: float32
    sums' error, except that the tiles apply Q4_1's minimum to each block's sum of inputs, which rounds
    against |minimum| x sum |x| rather than sum |x w| (measured up to 3.8e-6 of it, against 2.6e-7)."""
    assert blocks_native_applies(jnp.zeros((1, 64), jnp.float32)), "the native kernels must build here"
    rng = np.random.default_rng(7)
    product = jax.jit(lambda x, blocks: blocks_matmul(x, blocks, kind, tiles))
    x = (rng.uniform(1, 2, (20, 32)) * 2.0 ** rng.integers(-30, 30, (20, 32))).astype(np.float32)
    assert np.mean(np.asarray(x.view(np.uint32) & 0xFF, bool)) > 0.9, "most inputs need their third part"
    np.testing.assert_array_equal(np.asarray(product(x, unit_blocks(kind, 24))), x[:, :24])
    bound = 1e-5 if tiles and kind == "q4_1" else 1e-6
    for rows, n, k in [(16, 72, 64), (9, 1040, 96), (1, 40, 32), (40, 136, 128), (300, 96, 64)]:
        blocks = quantize(weights(n, k, seed=rows), TYPES[kind])
        exact = dequantize(blocks, TYPES[kind]).astype(np.float64)
        x = (rng.standard_normal((rows, k)) * 2.0 ** rng.integers(-20, 11, (rows, k))).astype(np.float32)
        got = np.asarray(product(x, blocks))
        expected = x.astype(np.float64) @ exact.T
        assert got.shape == (rows, n)
        assert np.all(np.abs(got - expected) <= bound * (np.abs(x.astype(np.float64)) @ np.abs(exact).T)), (rows, n, k)


def test_floats_are_quantized_into_blocks_as_a_parameter_is_stored():
    """A float weight [in, *out] stored as blocks: inputs last, each output channel's inputs whole blocks."""
    w = np.random.default_rng(0).standard_normal((64, 2, 40)).astype(np.float32)  # [in, 2, out]
    (values,) = stored_weight(jnp.asarray(w), np.dtype(np.float32), "q8_0", in_dims=1)
    assert values.shape == (2, 40, 2 * 34) and values.dtype == jnp.uint8
    expected = quantize(np.moveaxis(w, 0, -1).reshape(80, 64), GGMLQuantizationType.Q8_0).reshape(2, 40, -1)
    np.testing.assert_array_equal(np.asarray(values), expected)
    with pytest.raises(ValueError, match="not whole blocks"):
        stored_weight(jnp.ones((48, 8)), np.dtype(np.float32), "q4_1", in_dims=1)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_the_lanes_layout_regroups_the_files_bytes(kind):
    """Each group of 16 channels' bytes, block by block: the 16 scales (and minimums), then byte j of the 16
    channels' codes together; back again unchanged; XLA's decode of it gives the file's float32 weights, and
    a row gathered from it (the embedding's lookup) is the file's row."""
    blocks = quantize(weights(48, 96), TYPES[kind])  # 3 groups of 16 channels, 3 blocks each
    lanes = np.asarray(to_lanes(jnp.asarray(blocks), kind))
    size, header = BLOCK_BYTES[kind], HEADER_BYTES[kind]
    assert lanes.shape == blocks.shape and sorted(lanes.ravel()) == sorted(blocks.ravel())
    group = lanes[16:32].reshape(3, 16 * size)  # group 1, as [block][16 x bytes]
    channel, block = 16 + 5, 2
    file_block = blocks[channel, block * size:(block + 1) * size]
    assert group[block, 2 * 5:2 * 5 + 2].tolist() == file_block[:2].tolist()  # its scale
    if kind == "q4_1":
        assert group[block, 32 + 2 * 5:32 + 2 * 5 + 2].tolist() == file_block[2:4].tolist()  # its minimum
    assert group[block, 16 * header + 5::16].tolist() == file_block[header:].tolist()  # its codes, byte by byte
    np.testing.assert_array_equal(np.asarray(from_lanes(jnp.asarray(lanes), kind)), blocks)
    expected = dequantize(blocks, TYPES[kind])
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize_blocks, static_argnums=(1, 2))(lanes, kind, True)),
                                  expected)
    tokens = jnp.asarray([[0, 21, 47], [16, 15, 2]])
    np.testing.assert_array_equal(np.asarray(take_block_rows(jnp.asarray(lanes), tokens, kind, True)),
                                  blocks[np.asarray(tokens)])


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_the_lanes_form_gives_the_float32_products(kind):
    """The lanes form, for any number of rows (one, a few with two sums a row, tiles of 16, the last padded,
    prompt chunks): a unit weight gives every input back bit for bit; random weights are within float32
    sums' error of float64 products of the file's weights, for inputs spread over 2^-20 .. 2^10."""
    assert blocks_native_applies(jnp.zeros((1, 64), jnp.float32)) and cpu_has_avx512(), "the lanes form must run here"
    rng = np.random.default_rng(11)
    product = jax.jit(lambda x, lanes: blocks_matmul(x, lanes, kind, lanes=True))
    x = (rng.uniform(1, 2, (20, 32)) * 2.0 ** rng.integers(-30, 30, (20, 32))).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(product(x, to_lanes(unit_blocks(kind, 32), kind))), x)
    for rows, n, k in [(1, 32, 64), (2, 48, 96), (3, 16, 32), (5, 64, 64), (8, 1040, 96), (16, 144, 128),
                       (17, 96, 64), (40, 32, 320), (300, 48, 64)]:
        blocks = quantize(weights(n, k, seed=rows), TYPES[kind])
        exact = dequantize(blocks, TYPES[kind]).astype(np.float64)
        x = (rng.standard_normal((rows, k)) * 2.0 ** rng.integers(-20, 11, (rows, k))).astype(np.float32)
        got = np.asarray(product(x, to_lanes(blocks, kind)))
        expected = x.astype(np.float64) @ exact.T
        assert got.shape == (rows, n)
        assert np.all(np.abs(got - expected) <= 1e-6 * (np.abs(x.astype(np.float64)) @ np.abs(exact).T)), (rows, n, k)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_a_parameter_is_stored_in_lanes_where_they_multiply_fastest(kind):
    """Where the CPU has AVX-512 and no AMX tiles, a block weight whose last output dimension is whole groups
    of 16 is stored in the lanes layout, and `linear` multiplies it there: the same products as the file's
    layout. Elsewhere (AMX: the tile form reads the file's layout) the file's bytes stay as they are."""
    here = cpu_has_avx512() and not cpu_has_bf16_tiles()
    assert lanes_applies((2, 48, 68)) == here and not lanes_applies((2, 40, 68))
    w = np.random.default_rng(3).standard_normal((64, 2, 48)).astype(np.float32)  # [in, 2, out]
    (values,) = stored_weight(jnp.asarray(w), np.dtype(np.float32), kind, in_dims=1)
    file_bytes = quantize(np.moveaxis(w, 0, -1).reshape(96, 64), TYPES[kind]).reshape(2, 48, -1)
    np.testing.assert_array_equal(np.asarray(values), to_lanes(file_bytes, kind) if here else file_bytes)
    exact = dequantize(file_bytes.reshape(96, -1), TYPES[kind]).astype(np.float64)
    product = jax.jit(lambda x, v: linear(x, InputsLastWeight(v, None, 1, kind, here)))
    for rows in (5, BLOCKS_DECODE_MIN_ROWS):  # a prompt chunk's rows too: the lanes form decodes nothing whole
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        got = np.asarray(product(x, values)).reshape(rows, 96)
        np.testing.assert_allclose(got, x.astype(np.float64) @ exact.T, atol=2e-4, rtol=1e-5)
        if here:
            assert f"xlserve_blocks_decode_{kind}" not in product.lower(x, values).compile().as_text()
