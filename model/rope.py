"""Rotary position embedding settings and the frequencies they give, as transformers computes them.

`RopeConfig` is the checkpoint's RoPE recipe, already normalised by `model.config` from whichever
form the `config.json` uses. A field left `None` means "transformers' default for this type", so the
defaults live here next to the formulas that use them. Frequencies are computed in float64 and
rounded once to float32: transformers computes them in float32 and lands within a couple of ulps.

Dynamic NTK (InternLM2, some Llama 2 fine-tunes) is the one recipe whose frequencies depend on the
sequence: past the trained length L the base grows with the sequence's length. transformers recomputes
the frequencies at every forward from that call's longest position; keys already in the cache keep the
rotation they were written with. `dynamic_inv_frequencies` is the same rule per row inside the jitted
step, from each row's sequence length after the step, so a decode step or a prefill chunk rotates its
tokens exactly as a transformers forward over the same tokens with the same cache would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import jax

ROPE_TYPES = frozenset({"default", "linear", "dynamic", "llama3", "yarn"})

# transformers' yarn defaults for a missing beta_fast / beta_slow
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE recipe. `original_max_position_embeddings` is always filled for llama3 and yarn."""

    theta: float
    rope_type: str
    factor: float = 1.0
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn, dynamic
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: None = derived from factor
    truncate: bool = True  # yarn: round the correction range to whole dimensions (gpt-oss turns it off)

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE type {self.rope_type!r}; xlserve knows {', '.join(sorted(ROPE_TYPES))}"
            )
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.theta}")
        if self.factor <= 0:
            raise ValueError(f"RoPE factor must be positive, got {self.factor}")
        needed = {
            "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",),
            "dynamic": ("original_max_position_embeddings",),
        }.get(self.rope_type, ())
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.rope_type} RoPE needs {', '.join(missing)}")
        if self.rope_type == "llama3" and self.low_freq_factor == self.high_freq_factor:
            raise ValueError("llama3 RoPE needs low_freq_factor != high_freq_factor")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `scale` times (DeepSeek's mscale variant)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _base_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, float64."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3_frequencies(
    inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float, old_context: int
) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by factor, blend smoothly in between."""
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, max_positions: int) -> float:
    """The dimension whose wavelength fits `num_rotations` times into `max_positions`."""
    return (dim * math.log(max_positions / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))


def _yarn_frequencies(rope: RopeConfig, inv_freq: np.ndarray, head_dim: int, original: int) -> np.ndarray:
    """YaRN: interpolate low frequencies (divide by factor), extrapolate high ones, ramp in between."""
    beta_fast = rope.beta_fast or YARN_BETA_FAST  # transformers treats 0 as unset too
    beta_slow = rope.beta_slow or YARN_BETA_SLOW
    low = _yarn_correction_dim(beta_fast, head_dim, rope.theta, original)
    high = _yarn_correction_dim(beta_slow, head_dim, rope.theta, original)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the original frequency is kept
    return (inv_freq / rope.factor) * (1 - extrapolation) + inv_freq * extrapolation


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """f32[head_dim // 2]: the angle per position of each rotated pair (HF's rotate-half layout).

    For dynamic NTK these are the frequencies of sequences within the trained length; longer ones
    take `dynamic_inv_frequencies`.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}")
    inv_freq = _base_frequencies(rope.theta, head_dim)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_frequencies(
            inv_freq,
            rope.factor,
            rope.low_freq_factor,
            rope.high_freq_factor,
            rope.original_max_position_embeddings,
        )
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_frequencies(rope, inv_freq, head_dim, rope.original_max_position_embeddings)
    return inv_freq.astype(np.float32)


def dynamic_inv_frequencies(rope: RopeConfig, head_dim: int, seq_lens: jax.Array) -> jax.Array:
    """Dynamic NTK: f32[B, head_dim // 2] for sequences of `seq_lens` i32[B] tokens, traceable.

    transformers' rule: a sequence of s > L tokens rotates with base theta * (factor * s / L -
    (factor - 1)) ** (d / (d - 2)); shorter ones with theta itself. Computed in float32, as transformers
    does (its sequence length is a tensor there).
    """
    import jax.numpy as jnp  # here: the rest of this module is config-time math the server's process reads

    if rope.rope_type != "dynamic":
        raise ValueError(f"dynamic_inv_frequencies needs dynamic RoPE, got {rope.rope_type!r}")
    original = rope.original_max_position_embeddings
    length = jnp.maximum(seq_lens, original).astype(jnp.float32)
    base = rope.theta * (rope.factor * length / original - (rope.factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / base[:, None] ** exponents


def attention_scaling(rope: RopeConfig) -> float:
    """The factor transformers multiplies cos and sin by: 1.0 except for yarn."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    return yarn_mscale(rope.factor)
