"""Sampling inside jit against transformers' logits processors and a plain sort-based numpy reference."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import serving.engine.sampling as sampling
from serving.engine.sampling import SEARCH, SamplingBatch, adjust_logits, filter_logits, sample
from serving.request import MAX_STOP_TOKEN_IDS, EngineRequest, GenerationConfig

# Large enough that a flat row's top-p or top-k set holds thousands of tokens.
VOCAB = 16384
BATCH = 8


def row(*, seed: int = 0, banned: tuple[int, ...] = (), **options: float) -> EngineRequest:
    """A request whose sampler row has these options, as serving builds one: temperature 0 (the default
    here) is greedy, and `banned` are stop ids held back by min_new_tokens."""
    config = GenerationConfig(do_sample=True, temperature=options.pop("temperature", 0.0),
                              min_new_tokens=1000 if banned else 0, **options)
    return EngineRequest("row", [1], config, stop_token_ids=frozenset(banned), seed=seed)


def reseeded(request: EngineRequest, seed: int) -> EngineRequest:
    return EngineRequest("row", [1], request.config, request.stop_token_ids, seed)


def batch_of(rows: list[EngineRequest], size: int, step: int = 0) -> SamplingBatch:
    """The rows at `step` through the engine's own packing (`SamplingTable`), greedy padding after them."""
    return SamplingBatch.from_requests(rows, size, [step] * len(rows))


# One of each kind of row; "flat" rows keep a large part of the vocabulary.
ROWS = [
    row(),  # greedy
    row(temperature=0.9, seed=11),
    row(temperature=0.8, top_k=40, seed=12),
    row(temperature=1.0, top_p=0.9, seed=13),
    row(temperature=1.0, top_p=0.95, seed=14),  # flat: top-p keeps thousands
    row(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05, seed=2**40 + 15),
    row(temperature=1.2, min_p=0.1, seed=16),
    row(temperature=1.0, top_k=3000, seed=17),  # flat: top-k keeps 3000
]
FLAT_ROWS = (4, 7)


def peaked_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Like a language model's: a Zipf-shaped head over a random order of the vocabulary."""
    logits = -rng.uniform(1.5, 3.0) * np.log(np.arange(1, vocab + 1)) + rng.normal(0, 0.3, vocab)
    return rng.permutation(logits).astype(np.float32)


def batch_logits(seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = np.stack([peaked_logits(rng, vocab) for _ in range(BATCH)])
    for row in FLAT_ROWS:
        logits[row] = rng.normal(0, 0.5, vocab)
    return logits


def reference_allowed(x: np.ndarray, request: EngineRequest) -> np.ndarray:
    """The tokens a sampled row may draw, written the plain way: sort, cumulative sum, compare."""
    row = request.config
    z = x.astype(np.float32) / np.float32(row.temperature)
    keep = np.ones(z.shape, bool)
    if 0 < row.top_k < z.size:
        keep &= z >= np.sort(z)[-row.top_k]
    if row.top_p < 1.0:
        weights = np.where(keep, np.exp(z.astype(np.float64) - z.max()), 0.0)
        order = np.argsort(-z, kind="stable")
        mass_before = np.cumsum(weights[order]) - weights[order]
        needed = order[keep[order] & (mass_before < row.top_p * weights.sum())]
        keep &= z >= z[needed].min()
    if row.min_p > 0.0:
        keep &= z >= z.max() + np.log(np.float32(row.min_p))
    return keep & np.isfinite(z)


def seen_from(token_ids: list[list[int]], vocab: int) -> np.ndarray:
    seen = np.zeros((len(token_ids), vocab), bool)
    for row, ids in enumerate(token_ids):
        seen[row, ids] = True
    return seen


@pytest.fixture(scope="module")
def compiled_sample():
    """`sample` compiled once for [BATCH, VOCAB], on the branch that searches every row (the one that covers
    any mix of rows); every test below calls this one executable."""
    params = batch_of([], BATCH)
    logits = jnp.zeros((BATCH, VOCAB), jnp.float32)
    seen = jnp.zeros((BATCH, VOCAB), bool)
    return jax.jit(functools.partial(sample, mode=SEARCH)).lower(logits, params, seen).compile()


def test_one_compile_serves_mixed_rows(compiled_sample):
    logits = batch_logits()
    seen = np.zeros(logits.shape, bool)
    tokens = np.asarray(compiled_sample(logits, batch_of(ROWS, BATCH), seen))
    assert tokens[0] == logits[0].argmax()
    for i, request in enumerate(ROWS[1:], 1):
        assert reference_allowed(logits[i], request)[tokens[i]], i
    # The same executable takes every other composition: all greedy, all top-p, a partial batch.
    greedy = np.asarray(compiled_sample(logits, batch_of([], BATCH), seen))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    top_p = [row(temperature=1.0, top_p=0.9, seed=i) for i in range(BATCH)]
    top_p_tokens = np.asarray(compiled_sample(logits, batch_of(top_p, BATCH), seen))
    assert all(reference_allowed(logits[i], top_p[i])[t] for i, t in enumerate(top_p_tokens))
    partial = np.asarray(compiled_sample(logits, batch_of(ROWS[:3], BATCH), seen))
    np.testing.assert_array_equal(partial[3:], logits[3:].argmax(-1))


def test_greedy_rows_take_the_argmax_whatever_their_filters(compiled_sample):
    logits = batch_logits(1)
    rows = [row(temperature=0.0, top_k=5, top_p=0.5, min_p=0.5, seed=i) for i in range(BATCH)]
    tokens = compiled_sample(logits, batch_of(rows, BATCH), np.zeros(logits.shape, bool))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(2)
    vocab = 50
    logits = rng.normal(0, 3, (4, vocab)).astype(np.float32)
    history = [rng.integers(0, vocab, 20).tolist() for _ in range(4)]
    penalties = [1.0, 1.3, 0.7, 2.0]
    params = batch_of([row(repetition_penalty=p) for p in penalties], 4)
    got = np.asarray(jax.jit(adjust_logits)(logits, params, seen_from(history, vocab)))
    for i, penalty in enumerate(penalties):
        processor = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        want = processor(torch.tensor([history[i]]), torch.tensor(logits[i : i + 1])).numpy()[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    assert (got != logits).any(axis=-1).tolist() == [False, True, True, True]


def test_penalty_applies_before_greedy(compiled_sample):
    logits = batch_logits(3) + 10.0  # positive, so the penalty divides the best logit by 100
    top = logits.argmax(-1)
    history = [[int(t)] for t in top]
    rows = [row(repetition_penalty=100.0)] * BATCH
    tokens = np.asarray(compiled_sample(logits, batch_of(rows, BATCH), seen_from(history, VOCAB)))
    assert (tokens != top).all()


def test_reference_agrees_with_transformers_warpers():
    rng = np.random.default_rng(4)
    logits = np.stack([peaked_logits(rng, 2000) for _ in range(4)] + [rng.normal(0, 1, 2000).astype(np.float32)])
    for request in [
        row(temperature=0.7, top_k=40),
        row(temperature=1.0, top_p=0.9),
        row(temperature=0.8, top_k=50, top_p=0.8, min_p=0.05),
        row(temperature=1.3, min_p=0.1),
    ]:
        config = request.config
        scores = torch.tensor(logits)
        scores = TemperatureLogitsWarper(config.temperature)(None, scores)
        if config.top_k:
            scores = TopKLogitsWarper(config.top_k)(None, scores)
        if config.top_p < 1:
            scores = TopPLogitsWarper(config.top_p)(None, scores)
        if config.min_p:
            scores = MinPLogitsWarper(config.min_p)(None, scores)
        want = torch.isfinite(scores).numpy()
        for i in range(len(logits)):
            np.testing.assert_array_equal(reference_allowed(logits[i], request), want[i])


def assert_filter_matches_reference(got: np.ndarray, logits: np.ndarray, rows: list[EngineRequest]) -> None:
    for i, request in enumerate(rows):
        if request.config.temperature == 0.0:
            continue
        allowed = reference_allowed(logits[i], request)
        np.testing.assert_array_equal(np.isfinite(got[i]), allowed, err_msg=f"row {i}")
        np.testing.assert_allclose(got[i][allowed], logits[i][allowed] / request.config.temperature, rtol=1e-6)


def test_filter_keeps_exactly_the_reference_set_in_a_small_vocabulary():
    logits = batch_logits(5, vocab=1000)
    got = np.asarray(jax.jit(filter_logits)(logits, batch_of(ROWS, BATCH)))
    assert_filter_matches_reference(got, logits, ROWS)


def test_filter_keeps_exactly_the_reference_set_of_every_row():
    logits = batch_logits(5)
    got = np.asarray(jax.jit(filter_logits)(logits, batch_of(ROWS, BATCH)))
    assert_filter_matches_reference(got, logits, ROWS)
    # The flat rows keep thousands of tokens: their thresholds lie deep in the vocabulary.
    assert np.isfinite(got[4]).sum() > 256 * 32 and np.isfinite(got[7]).sum() == 3000


def test_gathered_search_matches_the_search_of_every_row():
    # Five rows use top-k or top-p, gathered into five, or six rows of which one is filler.
    logits = batch_logits(5)
    params = batch_of(ROWS, BATCH)
    every = np.asarray(jax.jit(filter_logits)(logits, params))
    for rows in (5, 6):
        gathered = np.asarray(jax.jit(filter_logits, static_argnums=2)(logits, params, rows))
        np.testing.assert_array_equal(gathered, every)


def test_sample_mode_gathers_only_when_few_rows_of_a_large_batch_search():
    def mode(rows: list[EngineRequest], batch: int) -> int:
        table = sampling.SamplingTable(len(rows) + 1)  # the packing the engine's steps use
        for slot, request in enumerate(rows):
            table.write(slot, request)
        return sampling.sample_mode(*table.gather(np.minimum(np.arange(batch), len(rows)), np.zeros(batch, int)))

    top_p = row(temperature=1.0, top_p=0.9)
    assert mode([row()] * 4, 32) == sampling.ALL_GREEDY
    assert mode([row(temperature=1.0, top_k=5, top_p=0.5, min_p=0.1)], 32) == sampling.SEARCH_FEW
    assert mode([row(temperature=0.0, top_p=0.5), row(temperature=1.0)], 32) == sampling.NO_SEARCH
    assert mode([top_p] * 16, 32) == sampling.SEARCH_FEW
    assert mode([top_p] * 17, 32) == sampling.SEARCH
    assert mode([top_p] * 16, 16) == sampling.SEARCH  # no batch of 16 or fewer is gathered
    assert sampling.SEARCH_FEW in sampling.sample_modes(17) and sampling.SEARCH_FEW not in sampling.sample_modes(16)


def test_sample_has_no_data_dependent_control_flow_in_any_mode(monkeypatch):
    # A conditional or a loop with a data-dependent trip count makes XLA:GPU read a value back to the
    # host every step. The only loops are the PRNG's (threefry's fixed rounds, in every sampled mode).
    # Traced as for a GPU: the CPU's greedy search (greedy_tokens) holds a conditional, harmless there.
    monkeypatch.setattr(sampling.jax, "default_backend", lambda: "gpu")
    batch = 32
    args = (jnp.zeros((batch, VOCAB), jnp.float32), batch_of([], batch), jnp.zeros((batch, VOCAB), bool))
    hlo = {
        mode: jax.jit(sample, static_argnums=3).lower(*args, mode).as_text() for mode in sampling.sample_modes(batch)
    }
    for mode, text in hlo.items():
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, mode
        assert text.count("stablehlo.while") <= hlo[sampling.NO_SEARCH].count("stablehlo.while"), mode


def test_sampled_tokens_stay_in_the_allowed_set(compiled_sample):
    logits = batch_logits(6)
    seen = np.zeros(logits.shape, bool)
    allowed = [reference_allowed(logits[i], r) for i, r in enumerate(ROWS[1:], 1)]
    drawn = [set() for _ in ROWS]
    for step in range(40):
        tokens = np.asarray(compiled_sample(logits, batch_of(ROWS, BATCH, step), seen))
        for i, token in enumerate(tokens[1:], 1):
            assert allowed[i - 1][token], (step, i, token)
            drawn[i].add(int(token))
    # Rows that allow many tokens do draw many different ones.
    assert len(drawn[4]) > 30 and len(drawn[7]) > 30


CRITICAL_CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(
    "sampled",
    [row(temperature=0.8, top_k=6, top_p=0.95, min_p=0.02), row(temperature=1.5)],
)
def test_draws_follow_the_filtered_distribution(sampled):
    logits = np.array([2.0, 1.5, 1.4, 0.5, 0.0, -0.5, -1.0, -4.0], np.float32)
    draws = 4096
    rows = [reseeded(sampled, seed) for seed in range(draws)]
    tokens = np.asarray(
        jax.jit(functools.partial(sample, mode=SEARCH))(
            np.tile(logits, (draws, 1)), batch_of(rows, draws), np.zeros((draws, 8), bool))
    )
    allowed = reference_allowed(logits, sampled)
    assert allowed[tokens].all()
    z = logits[allowed] / sampled.config.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum() * draws
    observed = np.bincount(tokens, minlength=8)[allowed]
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < CRITICAL_CHI2_P001[int(allowed.sum()) - 1], (observed, expected.round())


def test_banned_ids_are_never_drawn(compiled_sample):
    logits = batch_logits(7)
    banned = tuple(int(t) for t in np.argsort(-logits[0])[:3])
    for i in range(BATCH):  # the banned ids are every row's three best tokens
        logits[i, list(banned)] = logits[i].max() + np.arange(3, 0, -1)
    seen = np.zeros(logits.shape, bool)
    for step in range(20):
        rows = [EngineRequest("row", [1], dataclasses.replace(r.config, min_new_tokens=1000), frozenset(banned), r.seed)
                for r in ROWS]
        tokens = np.asarray(compiled_sample(logits, batch_of(rows, BATCH, step), seen))
        assert not set(tokens.tolist()) & set(banned)
    # Unused slots (-1) ban nothing, not even the last id.
    logits[:, -1] = 100.0
    tokens = compiled_sample(logits, batch_of([], BATCH), seen)
    np.testing.assert_array_equal(np.asarray(tokens), VOCAB - 1)


def test_same_seed_and_step_give_the_same_token_in_any_row_or_batch(compiled_sample):
    logits = batch_logits(8)
    seen = np.zeros(logits.shape, bool)
    tokens = np.asarray(compiled_sample(logits, batch_of(ROWS, BATCH), seen))
    # Another row order.
    order = np.random.default_rng(0).permutation(BATCH)
    permuted = compiled_sample(logits[order], batch_of([ROWS[i] for i in order], BATCH), seen)
    np.testing.assert_array_equal(np.asarray(permuted), tokens[order])
    # Other neighbours: with the flat rows greedy, and with only temperature and min-p rows left, when
    # the batch skips the threshold search altogether.
    for changed in (FLAT_ROWS, (2, 3, 4, 5, 7)):
        rows = [row() if i in changed else r for i, r in enumerate(ROWS)]
        other = np.asarray(compiled_sample(logits, batch_of(rows, BATCH), seen))
        kept = [i for i in range(BATCH) if i not in changed]
        np.testing.assert_array_equal(other[kept], tokens[kept])
    # A batch of one.
    alone = jax.jit(functools.partial(sample, mode=SEARCH))
    for i, request in enumerate(ROWS):
        token = alone(logits[i : i + 1], batch_of([request], 1), seen[i : i + 1])
        assert int(token[0]) == tokens[i], i


def test_different_seeds_or_steps_draw_differently(compiled_sample):
    logits = np.tile(batch_logits(9)[4], (BATCH, 1))  # a flat row: top-p keeps thousands of tokens
    seen = np.zeros(logits.shape, bool)
    by_seed = set()
    for first in range(0, 64, BATCH):
        rows = [row(temperature=1.0, top_p=0.95, seed=seed) for seed in range(first, first + BATCH)]
        by_seed |= set(np.asarray(compiled_sample(logits, batch_of(rows, BATCH), seen)).tolist())
    assert len(by_seed) > 50
    rows = [row(temperature=1.0, top_p=0.95, seed=5)] * BATCH
    steps = SamplingBatch.from_requests(rows, BATCH, list(range(BATCH)))
    assert len(set(np.asarray(compiled_sample(logits, steps, seen)).tolist())) > 5
    # The high word of the seed counts too.
    rows = [row(temperature=1.0, top_p=0.95, seed=(i << 32) | 5) for i in range(BATCH)]
    assert len(set(np.asarray(compiled_sample(logits, batch_of(rows, BATCH), seen)).tolist())) > 5


def test_packing_pads_with_greedy_rows_and_splits_the_seed():
    config = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2,
                              presence_penalty=0.5, frequency_penalty=-0.25, logprobs=3, min_new_tokens=5)
    request = EngineRequest("r", [1, 2], config, stop_token_ids=frozenset({5, 2}), seed=(3 << 32) | 9)
    batch = SamplingBatch.from_requests([request], 3, [4])
    np.testing.assert_allclose(batch.temperature, [0.5, 0, 0])
    np.testing.assert_allclose(batch.top_p, [0.9, 1, 1])
    np.testing.assert_array_equal(batch.top_k, [7, 0, 0])
    np.testing.assert_allclose(batch.min_p, [0.1, 0, 0])
    np.testing.assert_allclose(batch.repetition_penalty, [1.2, 1, 1])
    np.testing.assert_allclose(batch.presence_penalty, [0.5, 0, 0])
    np.testing.assert_allclose(batch.frequency_penalty, [-0.25, 0, 0])
    np.testing.assert_array_equal(batch.logprobs, [3, -1, -1])
    np.testing.assert_array_equal(batch.seed, [[3, 9], [0, 0], [0, 0]])
    np.testing.assert_array_equal(batch.step, [4, 0, 0])
    assert batch.banned.shape == (3, MAX_STOP_TOKEN_IDS)
    np.testing.assert_array_equal(batch.banned[0, :3], [2, 5, -1])  # held back: step 4 < min_new_tokens
    assert (np.asarray(batch.banned[1:]) == -1).all()
    assert batch.seed.dtype == jnp.uint32 and batch.top_k.dtype == jnp.int32
    assert (np.asarray(SamplingBatch.from_requests([request], 1, [5]).banned) == -1).all()  # lifted at 5
    greedy = EngineRequest("g", [1], GenerationConfig(temperature=0.7), seed=1)
    assert float(SamplingBatch.from_requests([greedy], 1).temperature[0]) == 0.0
    with pytest.raises(ValueError):
        SamplingBatch.from_requests([request] * 4, 3)


def test_every_declared_column_option_reaches_the_sampler():
    # The declaration is the only list: each option with column=True is a field of the unpacked batch.
    from serving.sampling_options import declared_options

    batch = SamplingBatch.from_requests([], 1)
    for declared in declared_options(GenerationConfig):
        assert hasattr(batch, declared.name) == declared.spec.column, declared.name


def test_greedy_tokens_are_argmax_ties_infinities_and_nan_included():
    """The CPU's greedy pick (chunks' maxima, then the first index of the maximum in the first chunk holding
    it; whole rows where the vocabulary has no chunks or a row's maximum is +inf) is jnp.argmax's: the first of
    tied maxima, in one chunk or across chunks, +inf over everything, index 0 of a row of -inf, the first NaN
    of a row holding NaN wherever the maximum is, zeros of either sign equal, negatives ordered; and the same
    for finite rows in a batch without NaN or +inf (the chunked search alone)."""
    from serving.engine.sampling import GREEDY_CHUNK, greedy_tokens

    rng = np.random.default_rng(0)
    for vocab in (1000, 12 * GREEDY_CHUNK):  # 1000 = 8 x 125: no chunks; the other 12 chunks of 256
        x = rng.standard_normal((12, vocab)).astype(np.float32)
        last = vocab - 1
        x[1, [5, 700]] = 9.0  # a tie across chunks: the first wins
        x[2] = -np.inf
        x[3, [10, 400]] = np.inf
        x[4, [3, 600]] = np.nan
        x[5, last] = 50.0  # the last index
        x[6, [300, 301]] = 9.0  # a tie inside a chunk
        x[7, 900] = 60.0  # a NaN after the maximum, in a later chunk
        x[7, last] = np.nan
        x[8, 2] = 60.0  # the maximum in the first chunk, a NaN in the last
        x[8, last - 1] = np.nan
        x[9, 255:257] = [7.0, 8.0]  # the maximum just past a chunk's end
        x[10] = -rng.uniform(1, 2, vocab)  # all negative: the one nearest zero
        x[11] = -np.abs(x[11])
        x[11, [4, 900]] = [-0.0, 0.0]  # a tie of zeros: the first
        got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x)))
        assert got.tolist() == np.argmax(x, axis=-1).tolist(), vocab
        assert got[1:10].tolist() == [5, 0, 10, 3, last, 300, last, last - 1, 256], vocab
        assert got[11] == 4, vocab
        finite = x[[0, 1, 2, 5, 6, 9, 10, 11]]
        assert np.asarray(jax.jit(greedy_tokens)(jnp.asarray(finite))).tolist() == np.argmax(finite, -1).tolist()
