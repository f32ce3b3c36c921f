"""Per-request sampling inside jit: one compiled function serves any mix of greedy and sampled rows.

Order of operations (that of transformers and vLLM): repetition penalty on the raw logits, banned ids
set to -inf, then greedy rows take the argmax; sampled rows divide by their temperature and keep only
the tokens that pass top-k, then top-p (on the distribution renormalised after top-k), then min-p,
and draw with the Gumbel-max trick from a key that depends only on the row's seed and step, so a
request gets the same tokens whatever batch or row it runs in.

Top-k and top-p are thresholds on the scaled logits, found exactly and without sorting the vocabulary.
A threshold is the largest float t that satisfies a monotone predicate (at least k logits >= t; at least
p of the mass >= t). A radix search over the 32-bit keys whose order is the float order finds it: each
pass tests 15 values per row and fixes 4 bits, 8 passes in all, unrolled. The search runs over each
searching row's whole vocabulary, so it is exact for any distribution, with control flow fixed at
trace time: a device-side conditional or a loop with a data-dependent trip count makes XLA:GPU read a
value back to the host every step, which stalls the dispatch of the next step (docs/perf-notes.md).
Its cost grows with the rows searched, so the host picks how many: every row (`SEARCH`), or, when few
rows of a large batch use top-k or top-p, only those rows gathered into `_FEW_ROWS` rows (`SEARCH_FEW`).
Sorting the vocabulary (or `lax.top_k` for k above 16) costs as much as searching every row, and
searching a few gathered rows costs a fraction of it (docs/perf-notes.md, "Sampler: threshold search").

Ties: a threshold keeps every token equal to it. Top-k keeps all tokens tied with the k-th largest
logit (more than k when they tie); top-p keeps the smallest set of the largest tokens whose mass
reaches p, plus every token tied with the last one it needs. transformers and vLLM break such ties by
sort position instead, which depends on the sort's stability; the distributions differ only there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from serving.engine.columns import Columns
from serving.request import MAX_STOP_TOKEN_IDS, EngineRequest

# Bits fixed per pass of a threshold search: 2**bits - 1 thresholds are tested per row and pass.
_DIGIT_BITS = 4
# SEARCH_FEW gathers this many rows: the batch's rows that use top-k or top-p, when no more than this.
_FEW_ROWS = 16
_SIGN_BIT = np.uint32(1 << 31)
_NEG_INF_KEY = np.uint32(0x007FFFFF)  # order key of -inf: its bits 0xFF800000, all flipped

# The branches of `sample`. The engine picks one on the host from the rows' parameters (a static
# argument): a branch chosen on the device is a conditional, which XLA:GPU resolves by reading the
# predicate back to the host, stalling the dispatch of the next step.
ALL_GREEDY, NO_SEARCH, SEARCH, SEARCH_FEW = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingBatch:
    """Sampling parameters of every row of a step's batch, as device arrays (one row per sequence)."""

    temperature: jax.Array  # f32[B]; 0 => greedy
    top_p: jax.Array  # f32[B]; 1 => off
    top_k: jax.Array  # i32[B]; 0 => off
    min_p: jax.Array  # f32[B]; 0 => off
    repetition_penalty: jax.Array  # f32[B]; 1 => off
    seed: jax.Array  # u32[B, 2]: high and low word of the 64-bit seed
    step: jax.Array  # i32[B]: index of the token being sampled within its request (0 = first output token)
    banned: jax.Array  # i32[B, MAX_STOP_TOKEN_IDS]: ids forced to -inf this step; -1 = unused slot

    @classmethod
    def from_rows(cls, rows: Sequence[RowParams], batch_size: int) -> SamplingBatch:
        """Host rows as device arrays, through the same packing as the engine's steps; rows past
        `len(rows)` are greedy padding."""
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        ints, floats = empty_sampling(batch_size)
        for i, row in enumerate(rows):
            row.write(ints, floats, i)
        return unpack_sampling(jnp.asarray(ints), jnp.asarray(floats))


@dataclass(frozen=True)
class RowParams:
    """One row of a `SamplingBatch` on the host. The defaults are those of a greedy padding row."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0  # 64-bit
    step: int = 0
    banned: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A silently dropped id would let a stop token through before min_new_tokens, so refuse.
        if len(self.banned) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} banned ids per row, got {len(self.banned)}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must fit 64 bits unsigned, got {self.seed}")

    @classmethod
    def for_request(cls, request: EngineRequest, step: int) -> RowParams:
        """The row that samples output token `step` of `request`.

        Its stop ids are banned until `min_new_tokens` tokens exist, so the sequence cannot end early.
        """
        config = request.config
        return cls(
            temperature=0.0 if config.greedy else config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            min_p=config.min_p,
            repetition_penalty=config.repetition_penalty,
            seed=request.seed,
            step=step,
            banned=tuple(sorted(request.stop_token_ids)) if step < config.min_new_tokens else (),
        )

    def write(self, ints: np.ndarray, floats: np.ndarray, row: int) -> None:
        """Put this row into the packed sampling matrices (`SAMPLING_INTS`, `SAMPLING_FLOATS`)."""
        banned = np.full(MAX_STOP_TOKEN_IDS, -1, np.int32)
        banned[: len(self.banned)] = self.banned
        seed = np.array([self.seed >> 32, self.seed & 0xFFFFFFFF], np.uint32).view(np.int32)
        SAMPLING_INTS.write(ints, row, {"top_k": self.top_k, "seed": seed, "step": self.step, "banned": banned})
        SAMPLING_FLOATS.write(floats, row, {name: getattr(self, name) for name in SAMPLING_FLOATS.widths})


# A step's sampling options cross to the device as two matrices, one row per sequence: each option is
# a field of `RowParams` and `SamplingBatch` of the same name, and a column here.
SAMPLING_INTS = Columns(top_k=1, seed=2, step=1, banned=MAX_STOP_TOKEN_IDS)  # seed: two u32 words
SAMPLING_FLOATS = Columns(temperature=1, top_p=1, min_p=1, repetition_penalty=1)


def empty_sampling(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """i32[rows, SAMPLING_INTS.width] and f32[rows, SAMPLING_FLOATS.width] of greedy padding rows."""
    ints = np.zeros((rows, SAMPLING_INTS.width), np.int32)
    floats = np.zeros((rows, SAMPLING_FLOATS.width), np.float32)
    padding = RowParams()
    for row in range(rows):
        padding.write(ints, floats, row)
    return ints, floats


def unpack_sampling(ints: jax.Array, floats: jax.Array) -> SamplingBatch:
    """The `SamplingBatch` of packed sampling matrices (inside jit)."""
    fields = {**SAMPLING_INTS.unpack(ints), **SAMPLING_FLOATS.unpack(floats)}
    fields["seed"] = lax.bitcast_convert_type(fields["seed"], jnp.uint32)
    return SamplingBatch(**fields)


def adjust_logits(logits: jax.Array, params: SamplingBatch, seen: jax.Array) -> jax.Array:
    """Repetition penalty over `seen` tokens (transformers' rule), then banned ids to -inf.

    logits f32[B, V] (any float dtype, computed in f32), seen bool[B, V] -> f32[B, V]. Greedy rows
    take the argmax of this.
    """
    x = logits.astype(jnp.float32)
    penalty = params.repetition_penalty[:, None]
    # A penalty of 1 divides or multiplies by exactly 1, so rows without one need no extra mask.
    x = jnp.where(seen, jnp.where(x < 0, x * penalty, x / penalty), x)
    batch, vocab = x.shape
    # Unused slots (-1) point past the vocabulary and are dropped; a negative index would wrap.
    columns = jnp.where(params.banned < 0, vocab, params.banned)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], columns.shape)
    return x.at[rows, columns].set(-jnp.inf, mode="drop")


def filter_logits(x: jax.Array, params: SamplingBatch, rows: int | None = None) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: the logits sampled rows draw from, -inf where removed.

    x f32[B, V] from `adjust_logits` -> f32[B, V]. Greedy rows are scaled by 1 (their result is unused).
    rows (static): search only the first `rows` rows that use top-k or top-p, gathered; None searches
    every row. Exact only if no more rows than that use them (`sample_mode` sees to it).
    """
    z = _scale(x, params.temperature)
    vocab = z.shape[1]
    top_k_on = (params.top_k > 0) & (params.top_k < vocab)
    top_p_on = params.top_p < 1.0
    z_max = jnp.max(z, axis=-1)
    if rows is None:
        top_k, top_p = _thresholds(z, z_max, params, top_k_on, top_p_on)
    else:
        searching = (params.temperature > 0) & (top_k_on | top_p_on)
        top_k, top_p = _search_gathered(z, z_max, params, top_k_on, top_p_on, searching, rows)
    threshold = jnp.maximum(jnp.maximum(top_k, top_p), _min_p_threshold(z_max, params))
    return jnp.where(z >= threshold[:, None], z, -jnp.inf)


def sample_modes(batch: int) -> tuple[int, ...]:
    """Every branch `sample_mode` may pick for a batch of `batch` rows: the ones to compile."""
    return (ALL_GREEDY, NO_SEARCH, SEARCH, SEARCH_FEW) if batch > _FEW_ROWS else (ALL_GREEDY, NO_SEARCH, SEARCH)


def sample_mode(ints: np.ndarray, floats: np.ndarray) -> int:
    """The cheapest branch of `sample` that covers every row, from the rows' packed host-side parameters
    (`SAMPLING_INTS`, `SAMPLING_FLOATS`)."""
    temperature = floats[:, SAMPLING_FLOATS.index("temperature")]
    top_p = floats[:, SAMPLING_FLOATS.index("top_p")]
    top_k = ints[:, SAMPLING_INTS.index("top_k")]
    sampled = temperature > 0
    searching = int(np.count_nonzero(sampled & ((top_k > 0) | (top_p < 1.0))))
    if searching:
        return SEARCH_FEW if searching <= _FEW_ROWS < len(temperature) else SEARCH
    return NO_SEARCH if np.any(sampled) else ALL_GREEDY


def sample(logits: jax.Array, params: SamplingBatch, seen: jax.Array, mode: int) -> jax.Array:
    """Next token per row: f32[B, V] logits, bool[B, V] seen (prompt + output) -> i32[B].

    The batch takes the cheapest branch that covers all its rows: argmax only when every row is
    greedy, temperature and min-p when no sampled row uses top-k or top-p, the threshold search of
    every row, or of the few rows that use top-k or top-p. Each row's result is the same in all
    branches that cover it. `mode` (static, from `sample_mode`) names the branch: the host picks it, so
    the program holds no device conditional.
    """
    x = adjust_logits(logits, params, seen)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    sampled_rows = params.temperature > 0

    def no_search(x: jax.Array, params: SamplingBatch) -> jax.Array:
        z = _scale(x, params.temperature)
        # The row maximum comes from the greedy argmax; dividing by T > 0 keeps it the maximum.
        z_max = jnp.take_along_axis(z, greedy[:, None], axis=-1)[:, 0]
        return _draw(jnp.where(z >= _min_p_threshold(z_max, params)[:, None], z, -jnp.inf), params)

    branches = [
        lambda x, params: greedy,
        no_search,
        lambda x, params: _draw(filter_logits(x, params), params),
        lambda x, params: _draw(filter_logits(x, params, rows=_FEW_ROWS), params),
    ]
    return jnp.where(sampled_rows, branches[mode](x, params), greedy)


def _scale(x: jax.Array, temperature: jax.Array) -> jax.Array:
    # Greedy rows (T = 0) are divided by 1 so that no inf/nan appears in rows whose result is unused.
    return x / jnp.where(temperature > 0, temperature, 1.0)[:, None]


def _min_p_threshold(z_max: jax.Array, params: SamplingBatch) -> jax.Array:
    # p >= min_p * p_max  <=>  z >= z_max + log(min_p); min_p = 0 gives -inf and keeps everything.
    return z_max + jnp.log(params.min_p)


def _draw(z: jax.Array, params: SamplingBatch) -> jax.Array:
    """Gumbel-max draw per row from a key that depends on nothing but the row's seed and step."""

    def row(seed: jax.Array, step: jax.Array, z_row: jax.Array) -> jax.Array:
        # threefry is named so that a change of jax's default PRNG cannot change anyone's tokens.
        key = jax.random.fold_in(jax.random.key(seed[0], impl="threefry2x32"), seed[1])
        return jax.random.categorical(jax.random.fold_in(key, step), z_row)

    return jax.vmap(row)(params.seed, params.step, z).astype(jnp.int32)


def _search_gathered(
    z: jax.Array,
    z_max: jax.Array,
    params: SamplingBatch,
    top_k_on: jax.Array,
    top_p_on: jax.Array,
    searching: jax.Array,
    rows: int,
) -> tuple[jax.Array, jax.Array]:
    """Top-k and top-p thresholds f32[B] of the first `rows` `searching` rows, -inf for the others.

    A search costs about as much per row as the vocabulary is long, so the searching rows are gathered
    into `rows` rows (the shape is static; the row ids are not) and searched there.
    """
    batch = z.shape[0]
    order = jnp.nonzero(searching, size=rows, fill_value=batch)[0]  # `batch` (no row) fills the rest
    take = lambda a: jnp.take(a, order, axis=0, mode="clip")  # noqa: E731
    found = _thresholds(take(z), take(z_max), jax.tree.map(take, params), take(top_k_on), take(top_p_on))
    empty = jnp.full((batch,), -jnp.inf, jnp.float32)
    return tuple(empty.at[order].set(new, mode="drop") for new in found)


def _thresholds(
    values: jax.Array,
    z_max: jax.Array,
    params: SamplingBatch,
    top_k_on: jax.Array,
    top_p_on: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Top-k and top-p thresholds per row (-inf where off), searched over each row's values f32[B, V].

    Top-k: the largest t with at least k values >= t, i.e. the k-th largest. Top-p, on the distribution
    left by top-k: the largest t whose values >= t hold at least p of its mass. Masses are unnormalised
    (exp(z - max)) and compared with p times their total, which avoids a division.
    """
    batch = values.shape[0]
    top_k = _largest_float(lambda t: _count_at_least(values, t) >= params.top_k[:, None], batch)
    top_k = jnp.where(top_k_on, top_k, -jnp.inf)
    weights = jnp.where(values >= top_k[:, None], jnp.exp(values - z_max[:, None]), 0.0)
    target = params.top_p * jnp.sum(weights, axis=-1)
    top_p = _largest_float(lambda t: _mass_at_least(values, weights, t) >= target[:, None], batch)
    return top_k, jnp.where(top_p_on, top_p, -jnp.inf)


# Both reduce a [B, M, N] broadcast that XLA fuses into one pass over `values`. On an H100 that form
# ran as fast as M sibling reductions for M = 15, but 60 times slower for M = 7: keep _DIGIT_BITS = 4
# unless a benchmark says otherwise.
def _count_at_least(values: jax.Array, thresholds: jax.Array) -> jax.Array:
    """i32[B, M]: how many of each row's values are >= each of its thresholds f32[B, M]."""
    return jnp.sum(values[:, None, :] >= thresholds[:, :, None], axis=-1, dtype=jnp.int32)


def _mass_at_least(values: jax.Array, weights: jax.Array, thresholds: jax.Array) -> jax.Array:
    """f32[B, M]: the weights of each row's values that are >= each of its thresholds f32[B, M]."""
    return jnp.sum(jnp.where(values[:, None, :] >= thresholds[:, :, None], weights[:, None, :], 0.0), axis=-1)


def _largest_float(satisfied: Callable[[jax.Array], jax.Array], batch: int) -> jax.Array:
    """Per row, the largest f32 t with satisfied(t), for a predicate true from -inf up to some t, false above.

    `satisfied` maps thresholds f32[B, M] to bool[B, M]. The search runs over the u32 keys whose order is
    the float order and builds the answer `_DIGIT_BITS` bits at a time from the top: with the higher
    bits fixed, the thresholds are the non-zero values of the next digit and, the predicate being
    monotone, the number that satisfy it is that digit. The answer is exact after 32 / _DIGIT_BITS passes.
    """
    digits = jnp.arange(1, 1 << _DIGIT_BITS, dtype=jnp.uint32)
    key = jnp.zeros(batch, jnp.uint32)
    # Unrolled in Python: XLA sees straight-line code, not a loop whose trip count it must check.
    for shift in range(32 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        ok = satisfied(_key_to_float(key[:, None] | (digits << shift)[None, :]))
        key = key | (jnp.sum(ok, axis=-1, dtype=jnp.uint32) << shift)
    return _key_to_float(key)


def _key_to_float(key: jax.Array) -> jax.Array:
    """The f32 at a u32 order key: keys from 2**31 up are the non-negative floats (sign bit set in the
    key), keys below are the negative floats with every bit flipped, so that larger magnitude sorts
    lower. Keys under that of -inf are NaN patterns; they read as -inf so the search stays monotone."""
    bits = jnp.where(key >= _SIGN_BIT, key ^ _SIGN_BIT, ~key)
    return jnp.where(key <= _NEG_INF_KEY, -jnp.inf, lax.bitcast_convert_type(bits, jnp.float32))
