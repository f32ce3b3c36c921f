"""Sampling inside jit against transformers' logits processors and a plain sort-based numpy reference."""

from __future__ import annotations

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
from serving.engine.sampling import SEARCH, RowParams, SamplingBatch, adjust_logits, filter_logits, sample
from serving.request import MAX_STOP_TOKEN_IDS, EngineRequest, GenerationConfig

# Large enough that a flat row's top-p or top-k set holds thousands of tokens.
VOCAB = 16384
BATCH = 8

# One of each kind of row; "flat" rows keep a large part of the vocabulary.
ROWS = [
    RowParams(),  # greedy
    RowParams(temperature=0.9, seed=11),
    RowParams(temperature=0.8, top_k=40, seed=12),
    RowParams(temperature=1.0, top_p=0.9, seed=13),
    RowParams(temperature=1.0, top_p=0.95, seed=14),  # flat: top-p keeps thousands
    RowParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.05, seed=2**40 + 15),
    RowParams(temperature=1.2, min_p=0.1, seed=16),
    RowParams(temperature=1.0, top_k=3000, seed=17),  # flat: top-k keeps 3000
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


def reference_allowed(x: np.ndarray, row: RowParams) -> np.ndarray:
    """The tokens a sampled row may draw, written the plain way: sort, cumulative sum, compare."""
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
    params = SamplingBatch.from_rows([], BATCH)
    logits = jnp.zeros((BATCH, VOCAB), jnp.float32)
    seen = jnp.zeros((BATCH, VOCAB), bool)
    return jax.jit(functools.partial(sample, mode=SEARCH)).lower(logits, params, seen).compile()


def test_one_compile_serves_mixed_rows(compiled_sample):
    logits = batch_logits()
    seen = np.zeros(logits.shape, bool)
    tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(ROWS, BATCH), seen))
    assert tokens[0] == logits[0].argmax()
    for i, row in enumerate(ROWS[1:], 1):
        assert reference_allowed(logits[i], row)[tokens[i]], i
    # The same executable takes every other composition: all greedy, all top-p, a partial batch.
    greedy = np.asarray(compiled_sample(logits, SamplingBatch.from_rows([], BATCH), seen))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    top_p = [RowParams(temperature=1.0, top_p=0.9, seed=i) for i in range(BATCH)]
    top_p_tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(top_p, BATCH), seen))
    assert all(reference_allowed(logits[i], top_p[i])[t] for i, t in enumerate(top_p_tokens))
    partial = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(ROWS[:3], BATCH), seen))
    np.testing.assert_array_equal(partial[3:], logits[3:].argmax(-1))


def test_greedy_rows_take_the_argmax_whatever_their_filters(compiled_sample):
    logits = batch_logits(1)
    rows = [RowParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.5, seed=i) for i in range(BATCH)]
    tokens = compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), np.zeros(logits.shape, bool))
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(2)
    vocab = 50
    logits = rng.normal(0, 3, (4, vocab)).astype(np.float32)
    history = [rng.integers(0, vocab, 20).tolist() for _ in range(4)]
    penalties = [1.0, 1.3, 0.7, 2.0]
    params = SamplingBatch.from_rows([RowParams(repetition_penalty=p) for p in penalties], 4)
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
    rows = [RowParams(repetition_penalty=100.0)] * BATCH
    tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen_from(history, VOCAB)))
    assert (tokens != top).all()


def test_reference_agrees_with_transformers_warpers():
    rng = np.random.default_rng(4)
    logits = np.stack([peaked_logits(rng, 2000) for _ in range(4)] + [rng.normal(0, 1, 2000).astype(np.float32)])
    for row in [
        RowParams(temperature=0.7, top_k=40),
        RowParams(temperature=1.0, top_p=0.9),
        RowParams(temperature=0.8, top_k=50, top_p=0.8, min_p=0.05),
        RowParams(temperature=1.3, min_p=0.1),
    ]:
        scores = torch.tensor(logits)
        scores = TemperatureLogitsWarper(row.temperature)(None, scores)
        if row.top_k:
            scores = TopKLogitsWarper(row.top_k)(None, scores)
        if row.top_p < 1:
            scores = TopPLogitsWarper(row.top_p)(None, scores)
        if row.min_p:
            scores = MinPLogitsWarper(row.min_p)(None, scores)
        want = torch.isfinite(scores).numpy()
        for i in range(len(logits)):
            np.testing.assert_array_equal(reference_allowed(logits[i], row), want[i])


def assert_filter_matches_reference(got: np.ndarray, logits: np.ndarray, rows: list[RowParams]) -> None:
    for i, row in enumerate(rows):
        if row.temperature == 0.0:
            continue
        allowed = reference_allowed(logits[i], row)
        np.testing.assert_array_equal(np.isfinite(got[i]), allowed, err_msg=f"row {i}")
        np.testing.assert_allclose(got[i][allowed], logits[i][allowed] / row.temperature, rtol=1e-6)


def test_filter_keeps_exactly_the_reference_set_in_a_small_vocabulary():
    logits = batch_logits(5, vocab=1000)
    got = np.asarray(jax.jit(filter_logits)(logits, SamplingBatch.from_rows(ROWS, BATCH)))
    assert_filter_matches_reference(got, logits, ROWS)


def test_filter_keeps_exactly_the_reference_set_of_every_row():
    logits = batch_logits(5)
    got = np.asarray(jax.jit(filter_logits)(logits, SamplingBatch.from_rows(ROWS, BATCH)))
    assert_filter_matches_reference(got, logits, ROWS)
    # The flat rows keep thousands of tokens: their thresholds lie deep in the vocabulary.
    assert np.isfinite(got[4]).sum() > 256 * 32 and np.isfinite(got[7]).sum() == 3000


def test_gathered_search_matches_the_search_of_every_row():
    # Five rows use top-k or top-p, gathered into five, or six rows of which one is filler.
    logits = batch_logits(5)
    params = SamplingBatch.from_rows(ROWS, BATCH)
    every = np.asarray(jax.jit(filter_logits)(logits, params))
    for rows in (5, 6):
        gathered = np.asarray(jax.jit(filter_logits, static_argnums=2)(logits, params, rows))
        np.testing.assert_array_equal(gathered, every)


def test_sample_mode_gathers_only_when_few_rows_of_a_large_batch_search():
    def mode(rows: list[RowParams], batch: int) -> int:
        ints, floats = sampling.empty_sampling(batch)  # the packing the engine's steps use
        for i, row in enumerate(rows):
            row.write(ints, floats, i)
        return sampling.sample_mode(ints, floats)

    top_p = RowParams(temperature=1.0, top_p=0.9)
    assert mode([RowParams()] * 4, 32) == sampling.ALL_GREEDY
    assert mode([RowParams(temperature=1.0, top_k=5, top_p=0.5, min_p=0.1)], 32) == sampling.SEARCH_FEW
    assert mode([RowParams(temperature=0.0, top_p=0.5), RowParams(temperature=1.0)], 32) == sampling.NO_SEARCH
    assert mode([top_p] * 16, 32) == sampling.SEARCH_FEW
    assert mode([top_p] * 17, 32) == sampling.SEARCH
    assert mode([top_p] * 16, 16) == sampling.SEARCH  # no batch of 16 or fewer is gathered
    assert sampling.SEARCH_FEW in sampling.sample_modes(17) and sampling.SEARCH_FEW not in sampling.sample_modes(16)


def test_sample_has_no_data_dependent_control_flow_in_any_mode():
    # A conditional or a loop with a data-dependent trip count makes XLA:GPU read a value back to the
    # host every step. The only loops are the PRNG's (threefry's fixed rounds, in every sampled mode).
    batch = 32
    args = (jnp.zeros((batch, VOCAB), jnp.float32), SamplingBatch.from_rows([], batch), jnp.zeros((batch, VOCAB), bool))
    hlo = {
        mode: jax.jit(sample, static_argnums=3).lower(*args, mode).as_text() for mode in sampling.sample_modes(batch)
    }
    for mode, text in hlo.items():
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, mode
        assert text.count("stablehlo.while") <= hlo[sampling.NO_SEARCH].count("stablehlo.while"), mode


def test_sampled_tokens_stay_in_the_allowed_set(compiled_sample):
    logits = batch_logits(6)
    seen = np.zeros(logits.shape, bool)
    allowed = [reference_allowed(logits[i], row) for i, row in enumerate(ROWS[1:], 1)]
    drawn = [set() for _ in ROWS]
    for step in range(40):
        rows = [RowParams(**{**vars(row), "step": step}) for row in ROWS]
        tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen))
        for i, token in enumerate(tokens[1:], 1):
            assert allowed[i - 1][token], (step, i, token)
            drawn[i].add(int(token))
    # Rows that allow many tokens do draw many different ones.
    assert len(drawn[4]) > 30 and len(drawn[7]) > 30


CRITICAL_CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize(
    "row",
    [RowParams(temperature=0.8, top_k=6, top_p=0.95, min_p=0.02), RowParams(temperature=1.5)],
)
def test_draws_follow_the_filtered_distribution(row):
    logits = np.array([2.0, 1.5, 1.4, 0.5, 0.0, -0.5, -1.0, -4.0], np.float32)
    draws = 4096
    rows = [RowParams(**{**vars(row), "seed": seed}) for seed in range(draws)]
    tokens = np.asarray(
        jax.jit(functools.partial(sample, mode=SEARCH))(
            np.tile(logits, (draws, 1)), SamplingBatch.from_rows(rows, draws), np.zeros((draws, 8), bool))
    )
    allowed = reference_allowed(logits, row)
    assert allowed[tokens].all()
    z = logits[allowed] / row.temperature
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
        rows = [RowParams(**{**vars(row), "step": step, "banned": banned}) for row in ROWS]
        tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen))
        assert not set(tokens.tolist()) & set(banned)
    # Unused slots (-1) ban nothing, not even the last id.
    logits[:, -1] = 100.0
    tokens = compiled_sample(logits, SamplingBatch.from_rows([], BATCH), seen)
    np.testing.assert_array_equal(np.asarray(tokens), VOCAB - 1)


def test_same_seed_and_step_give_the_same_token_in_any_row_or_batch(compiled_sample):
    logits = batch_logits(8)
    seen = np.zeros(logits.shape, bool)
    tokens = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(ROWS, BATCH), seen))
    # Another row order.
    order = np.random.default_rng(0).permutation(BATCH)
    permuted = compiled_sample(logits[order], SamplingBatch.from_rows([ROWS[i] for i in order], BATCH), seen)
    np.testing.assert_array_equal(np.asarray(permuted), tokens[order])
    # Other neighbours: with the flat rows greedy, and with only temperature and min-p rows left, when
    # the batch skips the threshold search altogether.
    for changed in (FLAT_ROWS, (2, 3, 4, 5, 7)):
        rows = [RowParams() if i in changed else row for i, row in enumerate(ROWS)]
        other = np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen))
        kept = [i for i in range(BATCH) if i not in changed]
        np.testing.assert_array_equal(other[kept], tokens[kept])
    # A batch of one.
    alone = jax.jit(functools.partial(sample, mode=SEARCH))
    for i, row in enumerate(ROWS):
        token = alone(logits[i : i + 1], SamplingBatch.from_rows([row], 1), seen[i : i + 1])
        assert int(token[0]) == tokens[i], i


def test_different_seeds_or_steps_draw_differently(compiled_sample):
    logits = np.tile(batch_logits(9)[4], (BATCH, 1))  # a flat row: top-p keeps thousands of tokens
    seen = np.zeros(logits.shape, bool)
    by_seed = set()
    for first in range(0, 64, BATCH):
        rows = [RowParams(temperature=1.0, top_p=0.95, seed=seed) for seed in range(first, first + BATCH)]
        by_seed |= set(np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen)).tolist())
    assert len(by_seed) > 50
    rows = [RowParams(temperature=1.0, top_p=0.95, seed=5, step=step) for step in range(BATCH)]
    assert len(set(np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen)).tolist())) > 5
    # The high word of the seed counts too.
    rows = [RowParams(temperature=1.0, top_p=0.95, seed=(i << 32) | 5) for i in range(BATCH)]
    assert len(set(np.asarray(compiled_sample(logits, SamplingBatch.from_rows(rows, BATCH), seen)).tolist())) > 5


def test_from_rows_pads_with_greedy_rows_and_splits_the_seed():
    rows = [
        RowParams(
            temperature=0.5,
            top_p=0.9,
            top_k=7,
            min_p=0.1,
            repetition_penalty=1.2,
            seed=(3 << 32) | 9,
            step=4,
            banned=(2, 5),
        )
    ]
    batch = SamplingBatch.from_rows(rows, 3)
    np.testing.assert_allclose(batch.temperature, [0.5, 0, 0])
    np.testing.assert_allclose(batch.top_p, [0.9, 1, 1])
    np.testing.assert_array_equal(batch.top_k, [7, 0, 0])
    np.testing.assert_allclose(batch.min_p, [0.1, 0, 0])
    np.testing.assert_allclose(batch.repetition_penalty, [1.2, 1, 1])
    np.testing.assert_array_equal(batch.seed, [[3, 9], [0, 0], [0, 0]])
    np.testing.assert_array_equal(batch.step, [4, 0, 0])
    assert batch.banned.shape == (3, MAX_STOP_TOKEN_IDS)
    np.testing.assert_array_equal(batch.banned[0, :3], [2, 5, -1])
    assert (np.asarray(batch.banned[1:]) == -1).all()
    assert batch.seed.dtype == jnp.uint32 and batch.top_k.dtype == jnp.int32
    with pytest.raises(ValueError):
        SamplingBatch.from_rows(rows * 4, 3)
    with pytest.raises(ValueError):
        RowParams(banned=tuple(range(MAX_STOP_TOKEN_IDS + 1)))


def test_row_for_request_bans_stop_ids_until_min_new_tokens():
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, min_new_tokens=2)
    request = EngineRequest("r", [1, 2], config, stop_token_ids=frozenset({7, 3}), seed=2**63 - 1)
    first = RowParams.for_request(request, step=0)
    assert first == RowParams(temperature=0.7, top_p=0.8, top_k=20, seed=2**63 - 1, banned=(3, 7))
    assert RowParams.for_request(request, step=2).banned == ()
    greedy = EngineRequest("g", [1], GenerationConfig(temperature=0.7), seed=1)
    assert RowParams.for_request(greedy, step=0).temperature == 0.0
