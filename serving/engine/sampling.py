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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from serving.engine.columns import Columns
from serving.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS, EngineRequest, GenerationConfig
from serving.sampling_options import Declared, RowColumn, declared_options

# Bits fixed per pass of a threshold search: 2**bits - 1 thresholds are tested per row and pass.
_DIGIT_BITS = 4
# SEARCH_FEW gathers this many rows: the batch's rows that use top-k or top-p, when no more than this.
_FEW_ROWS = 16
_SIGN_BIT = np.uint32(1 << 31)
_NEG_INF_KEY = np.uint32(0x007FFFFF)  # order key of -inf: its bits 0xFF800000, all flipped

# The branches of `sample`. The engine picks one on the host from the rows' parameters (a static
# argument): a branch chosen on the device is a conditional, which XLA:GPU resolves by reading the
# predicate back to the host, stalling the dispatch of the next step.
# EXTENDED is `sample_extended`: the SEARCH branch plus what rows that ask for them need (penalties over
# generated tokens, logit bias, log probabilities); only steps with such a row run it.
ALL_GREEDY, NO_SEARCH, SEARCH, SEARCH_FEW, EXTENDED = 0, 1, 2, 3, 4


def _option_column(declared: Declared) -> RowColumn:
    row = declared.spec.row or (lambda config: getattr(config, declared.name))

    def value(request: EngineRequest) -> float | int:
        got = row(request.config)
        return declared.neutral if got is None else got

    return RowColumn(declared.name, "f32" if declared.kind is float else "i32", 1, declared.neutral, value)


def _seed_words(request: EngineRequest) -> np.ndarray:
    """The 64-bit seed as two u32 words (high, low), stored in i32 columns."""
    return np.array([request.seed >> 32, request.seed & 0xFFFFFFFF], np.uint32).view(np.int32)


def _held_stop_ids(request: EngineRequest) -> np.ndarray:
    """The stop ids banned while fewer than `min_new_tokens` tokens exist (`SamplingTable.gather` lifts it)."""
    banned = np.full(MAX_STOP_TOKEN_IDS, -1, np.int32)
    if request.config.min_new_tokens:
        ids = sorted(request.stop_token_ids)
        banned[: len(ids)] = ids  # build_request refuses more than fit
    return banned


# The sampler's per-row columns that are not options (sampling_options says how to add one).
DERIVED_COLUMNS = (
    RowColumn("seed", "i32", 2, 0, _seed_words),
    RowColumn("step", "i32", 1, 0, None),  # the index of the token being sampled: set per step
    RowColumn("banned", "i32", MAX_STOP_TOKEN_IDS, -1, _held_stop_ids),
)
ROW_COLUMNS = tuple(_option_column(d) for d in declared_options(GenerationConfig) if d.spec.column) + DERIVED_COLUMNS
# A step's sampling options cross to the device as two matrices, one row per sequence, one column per
# `ROW_COLUMNS` entry, each a field of `SamplingBatch` of the same name.
SAMPLING_INTS = Columns(**{c.name: c.width for c in ROW_COLUMNS if c.dtype == "i32"})
SAMPLING_FLOATS = Columns(**{c.name: c.width for c in ROW_COLUMNS if c.dtype == "f32"})


class SamplingBatch:
    """Sampling parameters of every row of a step's batch, as device arrays: one attribute per
    `ROW_COLUMNS` entry (f32[B] / i32[B], or [B, width]), `seed` as u32[B, 2]. A pytree, so it passes
    through jit."""

    def __init__(self, **fields: jax.Array):
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> jax.Array:  # declared columns only; typos fail loudly
        raise AttributeError(f"SamplingBatch has no column {name!r}")

    @classmethod
    def from_requests(cls, requests: Sequence[EngineRequest], batch_size: int,
                      steps: Sequence[int] | None = None) -> SamplingBatch:
        """The rows of `requests` at `steps` (default 0) as device arrays, through the packing the engine's
        steps use (`SamplingTable`); rows past `len(requests)` are greedy padding."""
        if len(requests) > batch_size:
            raise ValueError(f"{len(requests)} rows do not fit a batch of {batch_size}")
        table = SamplingTable(len(requests) + 1)  # the last row is padding, as the runner's
        for slot, request in enumerate(requests):
            table.write(slot, request)
        slots = np.minimum(np.arange(batch_size), len(requests))
        step = np.zeros(batch_size, np.int32)
        step[: len(requests)] = steps if steps is not None else 0
        ints, floats = table.gather(slots, step)
        return unpack_sampling(jnp.asarray(ints), jnp.asarray(floats))


jax.tree_util.register_pytree_node(
    SamplingBatch,
    lambda batch: (tuple(batch.__dict__.values()), tuple(batch.__dict__)),
    lambda names, values: SamplingBatch(**dict(zip(names, values, strict=True))),
)


class SamplingTable:
    """Host copies of every slot's sampling row, written once when a request takes the slot, so a step's
    sampling inputs are numpy gathers over its slots. The extended inputs (`Extended`: penalties over
    generated tokens, logit bias, log probabilities) are kept beside them and sent only for steps that
    have a row using them."""

    def __init__(self, rows: int):
        self.ints = np.zeros((rows, SAMPLING_INTS.width), np.int32)
        self.floats = np.zeros((rows, SAMPLING_FLOATS.width), np.float32)
        for column in ROW_COLUMNS:
            matrix, columns = self._matrix(column)
            matrix[:, columns[column.name]] = column.padding
        self.min_new_tokens = np.zeros(rows, np.int32)
        self.extended = np.zeros(rows, bool)  # the slot's request uses what only the EXTENDED branch does
        self.logprobs = np.full(rows, -1, np.int32)  # top logprobs the request wants; -1: none
        self.prompt_len = np.zeros(rows, np.int32)
        self.bias_ids = np.full((rows, MAX_LOGIT_BIAS), -1, np.int32)
        self.bias_values = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)

    def write(self, slot: int, request: EngineRequest) -> None:
        """Fill `slot`'s row from `request`, as at its step 0."""
        for column in ROW_COLUMNS:
            if column.value is not None:
                matrix, columns = self._matrix(column)
                matrix[slot, columns[column.name]] = column.value(request)
        config = request.config
        self.min_new_tokens[slot] = config.min_new_tokens
        self.logprobs[slot] = -1 if config.logprobs is None else config.logprobs
        self.prompt_len[slot] = len(request.prompt_token_ids)
        ids, values = logit_bias_row(config)
        self.bias_ids[slot], self.bias_values[slot] = ids, values
        self.extended[slot] = bool(uses_extended(config))

    def _matrix(self, column: RowColumn) -> tuple[np.ndarray, Columns]:
        return (self.ints, SAMPLING_INTS) if column.dtype == "i32" else (self.floats, SAMPLING_FLOATS)

    def gather(self, slots: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The packed sampling inputs (see `unpack_sampling`) of a batch's slots at these steps."""
        ints = self.ints[slots]  # a copy: the gather
        ints[:, SAMPLING_INTS["step"]] = steps[:, None]
        held = (steps < self.min_new_tokens[slots])[:, None]
        banned = SAMPLING_INTS["banned"]
        ints[:, banned] = np.where(held, ints[:, banned], -1)
        return ints, self.floats[slots]

    def gather_extended(self, slots: np.ndarray, targets: np.ndarray) -> ExtendedRows:
        """The host half of `Extended` for a batch's slots; `targets` as `Extended.targets`."""
        return ExtendedRows(self.bias_ids[slots], self.bias_values[slots], self.prompt_len[slots], targets)


def uses_extended(config: GenerationConfig) -> bool:
    """Whether a request needs the EXTENDED branch of the sampler (and its steps the extended inputs)."""
    return (config.logprobs is not None or config.prompt_logprobs is not None or config.presence_penalty != 0
            or config.frequency_penalty != 0 or bool(config.logit_bias) or bool(config.bad_token_ids))


def logit_bias_row(config: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    """A request's logit bias as (ids i32[MAX_LOGIT_BIAS], values f32[...]); -1 marks unused entries, and
    each bad token id is an entry of -inf."""
    ids = np.full(MAX_LOGIT_BIAS, -1, np.int32)
    values = np.zeros(MAX_LOGIT_BIAS, np.float32)
    entries = {int(k): float(v) for k, v in (config.logit_bias or {}).items()}
    entries.update({int(i): -np.inf for i in config.bad_token_ids or ()})
    ids[: len(entries)] = list(entries)
    values[: len(entries)] = list(entries.values())
    return ids, values


def empty_sampling(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """i32[rows, SAMPLING_INTS.width] and f32[rows, SAMPLING_FLOATS.width] of greedy padding rows."""
    table = SamplingTable(1)
    return table.gather(np.zeros(rows, np.int64), np.zeros(rows, np.int32))


def unpack_sampling(ints: jax.Array, floats: jax.Array) -> SamplingBatch:
    """The `SamplingBatch` of packed sampling matrices (inside jit)."""
    fields = {**SAMPLING_INTS.unpack(ints), **SAMPLING_FLOATS.unpack(floats)}
    fields["seed"] = lax.bitcast_convert_type(fields["seed"], jnp.uint32)
    return SamplingBatch(**fields)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExtendedRows:
    """The per-step host inputs of the EXTENDED branch, one row per batch row."""

    bias_ids: np.ndarray  # i32[B, MAX_LOGIT_BIAS]; -1: unused entry
    bias_values: np.ndarray  # f32[B, MAX_LOGIT_BIAS]
    prompt_len: np.ndarray  # i32[B]: tokens from this position on are generated (they count for penalties)
    targets: np.ndarray  # i32[B]: the token whose log probability a row reports; -1: the one it samples


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Extended:
    """What the EXTENDED branch reads besides the logits: each row's generated-token counts and bias."""

    counts: jax.Array  # i32[B, V]: how often each token was generated so far (penalties)
    bias_ids: jax.Array  # i32[B, MAX_LOGIT_BIAS]
    bias_values: jax.Array  # f32[B, MAX_LOGIT_BIAS]
    targets: jax.Array  # i32[B]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepLogprobs:
    """Log probabilities from an EXTENDED step, one row per batch row (`MAX_LOGPROBS` wide)."""

    token_ids: jax.Array  # i32[B]: the row's target, else its sampled token
    logprobs: jax.Array  # f32[B]: that token's log probability
    top_ids: jax.Array  # i32[B, K]: the K most likely tokens, most likely first
    top_logprobs: jax.Array  # f32[B, K]


def adjust_logits(logits: jax.Array, params: SamplingBatch, seen: jax.Array,
                  extended: Extended | None = None) -> jax.Array:
    """Repetition penalty over `seen` tokens (transformers' rule), then (EXTENDED branch only) presence and
    frequency penalties over generated tokens and the logit bias, then banned ids to -inf.

    logits f32[B, V] (any float dtype, computed in f32), seen bool[B, V] -> f32[B, V]. Greedy rows
    take the argmax of this.
    """
    x = logits.astype(jnp.float32)
    penalty = params.repetition_penalty[:, None]
    # A penalty of 1 divides or multiplies by exactly 1, so rows without one need no extra mask.
    x = jnp.where(seen, jnp.where(x < 0, x * penalty, x / penalty), x)
    if extended is not None:
        x = penalize_and_bias(x, params, extended)
    return _set_at(x, params.banned, -jnp.inf)


def penalize_and_bias(x: jax.Array, params: SamplingBatch, extended: Extended) -> jax.Array:
    """OpenAI's presence and frequency penalties over each row's generated-token counts, then its logit bias
    (bad token ids are entries of -inf): x - frequency * count - presence * (count > 0) + bias."""
    counts = extended.counts.astype(jnp.float32)
    x = x - params.frequency_penalty[:, None] * counts - params.presence_penalty[:, None] * (counts > 0)
    batch, vocab = x.shape
    columns = jnp.where(extended.bias_ids < 0, vocab, extended.bias_ids)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], columns.shape)
    return x.at[rows, columns].add(extended.bias_values, mode="drop")


def _set_at(x: jax.Array, ids: jax.Array, value: float) -> jax.Array:
    """x with `value` at each row's ids (i32[B, N]; -1 = unused slot)."""
    batch, vocab = x.shape
    # Unused slots (-1) point past the vocabulary and are dropped; a negative index would wrap.
    columns = jnp.where(ids < 0, vocab, ids)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], columns.shape)
    return x.at[rows, columns].set(value, mode="drop")


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


GREEDY_CHUNK = 256  # logits per chunk of the CPU's greedy search, at most (a power of two)


def greedy_tokens(x: jax.Array) -> jax.Array:  # i32[B]
    """jnp.argmax over the vocabulary of f32[B, V]: the first index of each row's maximum, or of its first NaN.

    On CPU the vocabulary is read once, as chunks' maxima (NaN counted as +inf), and only the first chunk
    holding the row's maximum is searched; a batch where a row's maximum is +inf (a NaN, or an infinite logit)
    takes the exact search over whole rows instead (`_first_maximum`). XLA:CPU runs argmax's (value, index)
    reduction without vectorizing it (5x slower at 16 x 49152, docs/perf-notes.md "CPU, twelfth session"); a
    maximum then an index search over whole rows read the logits three times and wrote them twice
    ("Eighteenth session")."""
    if jax.default_backend() != "cpu":
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    batch, vocab = x.shape
    chunk = math.gcd(vocab, GREEDY_CHUNK)
    if chunk < GREEDY_CHUNK // 8:  # a vocabulary of few powers of two: searched whole
        return _first_maximum(x)
    chunks = x.reshape(batch, vocab // chunk, chunk)
    maxima = jnp.max(jnp.where(jnp.isnan(chunks), jnp.inf, chunks), axis=-1)  # f32[B, V / chunk]
    top = jnp.max(maxima, axis=-1, keepdims=True)
    first = _first_index(maxima == top)  # the first chunk holding the maximum
    window = jnp.take_along_axis(chunks, first[:, None, None], axis=1)[:, 0]  # f32[B, chunk]
    found = first * chunk + _first_index(window == top)
    return lax.cond(jnp.any(top == jnp.inf), lambda: _first_maximum(x), lambda: found)


def _first_maximum(x: jax.Array) -> jax.Array:  # i32[B]
    """greedy_tokens' answer searched over whole rows of f32[B, N], NaNs flagged apart: XLA:CPU's maximum
    over a row holding NaN gave neither NaN nor the maximum (jaxlib 0.10.2: -inf for a NaN in the last of 3072
    entries)."""
    nan = jnp.isnan(x)
    values = jnp.where(nan, -jnp.inf, x)
    return _first_index(jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan,
                                  values == jnp.max(values, axis=-1, keepdims=True)))


def _first_index(holds: jax.Array) -> jax.Array:  # i32[B]
    """The first index of each row of bool[B, N] that holds (N where none does)."""
    index = lax.broadcasted_iota(jnp.float32, holds.shape, 1)  # exact below 2**24 entries: a float min is vectorized
    return jnp.min(jnp.where(holds, index, float(holds.shape[-1])), axis=-1).astype(jnp.int32)


def sample_modes(batch: int) -> tuple[int, ...]:
    """Every branch of `sample` that `sample_mode` may pick for a batch of `batch` rows: the ones to compile
    (EXTENDED is `sample_extended`, compiled beside them)."""
    return (ALL_GREEDY, NO_SEARCH, SEARCH, SEARCH_FEW) if batch > _FEW_ROWS else (ALL_GREEDY, NO_SEARCH, SEARCH)


def sample_mode(ints: np.ndarray, floats: np.ndarray, extended: bool = False) -> int:
    """The cheapest branch of `sample` that covers every row, from the rows' packed host-side parameters
    (`SAMPLING_INTS`, `SAMPLING_FLOATS`); EXTENDED when a row needs it (`SamplingTable.extended`)."""
    if extended:
        return EXTENDED
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
    greedy = greedy_tokens(x)
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


def sample_extended(logits: jax.Array, params: SamplingBatch, seen: jax.Array, extended: Extended,
                    raw_logprobs: bool = True) -> tuple[jax.Array, StepLogprobs]:
    """The EXTENDED branch: `sample`'s SEARCH branch over logits adjusted also by `penalize_and_bias`, and
    each row's log probabilities: that of its target (`Extended.targets`, else its sampled token) and the
    `MAX_LOGPROBS` largest. raw_logprobs (static): log-softmax of the model's logits, before any sampling
    transform (vLLM's default); else of the logits the row draws from (penalties, bias, bans, and for a
    sampled row temperature and filters; -inf where a filter removed a token).

    Each row's token is the one `sample` would draw for it if it used no extended option."""
    x = adjust_logits(logits, params, seen, extended)
    greedy = greedy_tokens(x)
    sampled_rows = params.temperature > 0
    z = filter_logits(x, params)
    tokens = jnp.where(sampled_rows, _draw(z, params), greedy)
    source = logits.astype(jnp.float32) if raw_logprobs else jnp.where(sampled_rows[:, None], z, x)
    logprobs = jax.nn.log_softmax(source, axis=-1)
    targets = jnp.where(extended.targets >= 0, extended.targets, tokens)
    top_logprobs, top_ids = lax.top_k(logprobs, min(MAX_LOGPROBS, logprobs.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    return tokens, StepLogprobs(targets, chosen, top_ids.astype(jnp.int32), top_logprobs)


def count_generated(counts: jax.Array, slots: jax.Array, reset: jax.Array, first_tokens: jax.Array,
                    starts: jax.Array, lengths: jax.Array, prompt_len: jax.Array) -> jax.Array:
    """The per-slot generated-token counts i32[num_slots, V] after a step: a row's first chunk since
    admission (`reset`) clears its slot's counts, then a row whose first token i32[B] sits at a position
    from `prompt_len` on (a generated token fed back, or recomputed after preemption) counts it. The
    scheduler gives every generated position of a request with penalties a row of its own
    (`Scheduler._row_limit`), so a row's first token is the only generated one it can hold. Padding rows'
    slots are out of range and drop."""
    num_slots = counts.shape[0]
    counts = counts.at[jnp.where(reset, slots, num_slots)].set(0, mode="drop")
    generated = (lengths > 0) & (starts >= prompt_len)
    return counts.at[jnp.where(generated, slots, num_slots), first_tokens].add(1, mode="drop")


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
