"""Shared-prefix ("cascade") decode attention: the host planner, its device tables, and the engine using them.

The kernel itself is checked against the reference in test_kernels_pallas.py. Here: which rows the planner
puts in which tile (pure numpy), what `SharedPrefix.from_rows` builds from that, and a tiny engine on the
Pallas kernels in interpret mode whose decode batches share prompt pages through the prefix cache: it must
dispatch planned steps, give the same greedy tokens as without a plan (and as the XLA backend), and never
compile after warm-up.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving import GenerationConfig
from serving.cli import build_parser
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.http.options import from_arguments, from_environment
from tests.sentencepiece_tokenizer import VOCAB_SIZE
from xlkernels import get_paged_attention, is_pallas, paged_attention_pallas, resolve_backend
from xlkernels.shared_prefix import MIN_PLAN_BATCH, MIN_TILE_ROWS, SharedPrefix, plan_shared_prefix

PAGE = 8


def plan(tables: list[list[int]], kv_lens: list[int], *, tile_size: int = 4, max_tiles: int = 4,
         min_rows: int = 2) -> tuple[list[int], list[int], list[int]]:
    """The planner's (row_tile, row_slot, row_start) as lists, for tables given as lists."""
    row_tile, row_slot, row_start = plan_shared_prefix(
        np.asarray(tables, np.int32), np.asarray(kv_lens, np.int32), page_size=PAGE, tile_size=tile_size,
        max_tiles=max_tiles, min_rows=min_rows,
    )
    assert row_tile.dtype == row_slot.dtype == row_start.dtype == np.int32
    return row_tile.tolist(), row_slot.tolist(), row_start.tolist()


# ----- the planner --------------------------------------------------------------------------------------
def test_rows_are_grouped_by_their_first_page_and_share_their_common_leading_pages():
    # Two groups, interleaved: first pages 10 and 20; each group agrees on 2 pages, then its rows' own pages.
    tables = [[10, 11, 30], [20, 21, 40], [10, 11, 31], [20, 21, 41]]
    row_tile, row_slot, row_start = plan(tables, [3 * PAGE] * 4)
    assert row_tile == [0, 1, 0, 1]
    assert row_slot == [0, 0, 1, 1]
    assert row_start == [2 * PAGE] * 4


def test_the_shared_length_leaves_every_row_the_page_of_its_last_key():
    tables = [[10, 11, 12, 13]] * 2  # every page shared, but each row's own pass must keep its current token
    assert plan(tables, [3 * PAGE + 1, 3 * PAGE + 5])[2] == [3 * PAGE] * 2  # key 3 * PAGE is on page 3
    assert plan(tables, [3 * PAGE, 3 * PAGE])[2] == [2 * PAGE] * 2, "a full last page is still the row's own"
    assert plan(tables, [PAGE, 4 * PAGE]) == ([4, 4], [0, 0], [0, 0]), "a row on its first page shares nothing"


def test_ragged_agreement_takes_the_shortest_run_of_the_group():
    tables = [[10, 11, 12, 50], [10, 11, 12, 51], [10, 11, 60, 61]]
    assert plan(tables, [4 * PAGE] * 3, min_rows=3)[2] == [2 * PAGE] * 3


def test_groups_are_cut_into_tiles_of_tile_size_and_short_tiles_are_dropped():
    tables = [[10, 11, 100 + r] for r in range(10)]
    row_tile, row_slot, _ = plan(tables, [3 * PAGE] * 10, tile_size=4, min_rows=2)
    assert row_tile == [0] * 4 + [1] * 4 + [2] * 2
    assert row_slot == [0, 1, 2, 3] * 2 + [0, 1]
    row_tile, row_slot, row_start = plan(tables, [3 * PAGE] * 10, tile_size=4, min_rows=3)
    assert row_tile == [0] * 4 + [1] * 4 + [4] * 2, "the last tile's 2 rows are fewer than min_rows"
    assert row_slot[8:] == [0, 0] and row_start[8:] == [0, 0]


def test_small_groups_distinct_rows_and_tiles_past_max_tiles_take_the_plain_path():
    tables = [[10, 11, 90], [10, 11, 91], [10, 11, 92],  # group of 3: a tile
              [20, 21, 93], [20, 21, 94], [20, 21, 95],  # group of 3: past max_tiles
              [30, 31, 96], [30, 31, 97],  # group of 2: below min_rows
              [40, 41, 98]]  # alone
    row_tile, row_slot, row_start = plan(tables, [3 * PAGE] * 9, max_tiles=1, min_rows=3)
    assert row_tile == [0, 0, 0] + [1] * 6
    assert row_slot == [0, 1, 2] + [0] * 6
    assert row_start == [2 * PAGE] * 3 + [0] * 6
    distinct = [[10 + r, 20 + r] for r in range(6)]
    assert plan(distinct, [2 * PAGE] * 6) == ([4] * 6, [0] * 6, [0] * 6)
    assert plan([[10, 11]], [2 * PAGE], min_rows=2) == ([4], [0], [0]), "fewer rows than min_rows: no plan"


def test_from_rows_builds_each_tiles_members_and_length():
    tables = [[10, 11, 30], [40, 41, 42], [10, 11, 31], [10, 11, 32]]
    row_tile, row_slot, row_start = plan_shared_prefix(np.asarray(tables, np.int32), np.full(4, 3 * PAGE, np.int32),
                                                       page_size=PAGE, tile_size=4, max_tiles=2, min_rows=2)
    batch = 6  # two padding rows, in no tile (row_tile = num_tiles), as the runner packs them
    shared = SharedPrefix.from_rows(np.pad(row_tile, (0, 2), constant_values=2), np.pad(row_slot, (0, 2)),
                                    np.pad(row_start, (0, 2)), num_tiles=2, tile_size=4)
    assert np.asarray(shared.tile_rows).tolist() == [[0, 2, 3, batch], [batch] * 4]
    assert np.asarray(shared.tile_len).tolist() == [2 * PAGE, 0], "tile 1 is unused"
    assert np.asarray(shared.row_tile).tolist() == [0, 2, 0, 0, 2, 2]
    assert np.asarray(shared.row_slot).tolist() == [0, 0, 1, 2, 0, 0]
    assert np.asarray(shared.row_start).tolist() == [2 * PAGE, 0, 2 * PAGE, 2 * PAGE, 0, 0]


# ----- the switches -------------------------------------------------------------------------------------
def test_pallas_interpret_is_a_pallas_backend_in_interpret_mode():
    assert resolve_backend("pallas-interpret") == "pallas-interpret"
    assert is_pallas("pallas-interpret") and is_pallas("pallas") and not is_pallas("xla")
    attend = get_paged_attention("pallas-interpret")
    assert attend.func is paged_attention_pallas and attend.keywords == {"interpret": True}
    assert get_paged_attention("pallas").keywords == {"interpret": False}


def test_the_flag_and_its_variable_set_the_engine_option():
    parser = build_parser()
    argv = ["serve", "api_server", "--attention-backend", "pallas-interpret", "--no-enable-shared-prefix-attention"]
    launch = from_arguments(parser.parse_args(argv), environ={})
    assert launch.engine_config.attention_backend == "pallas-interpret"
    assert launch.engine_config.enable_shared_prefix_attention is False
    assert from_arguments(parser.parse_args(["serve", "api_server"]), environ={}).engine_config \
        .enable_shared_prefix_attention, "on by default"
    environ = {"XLSERVE_ENABLE_SHARED_PREFIX_ATTENTION": "0"}
    assert from_environment(environ).engine_config.enable_shared_prefix_attention is False


# ----- the engine ---------------------------------------------------------------------------------------
# One decode bucket of 8 rows (two tiles at most) and one prefill shape: three programs to compile.
ENGINE_OPTIONS = dict(page_size=PAGE, num_pages=64, session_len=64, decode_batch_buckets=(8,),
                      prefill_row_buckets=(4,), prefill_token_buckets=(8,), max_prefill_token_num=32)
GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


def random_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE, size=length).tolist()


def generate(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Submit the prompts together; the greedy tokens of each."""
    results: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    for i, prompt in enumerate(prompts):
        def sink(out, i=i):
            assert out.error is None, out.error
            results[i] += out.new_token_ids
            if out.finished:
                done[i].set()

        engine.submit(engine.make_request(prompt, GREEDY, f"shared-{i}-{id(results)}"), sink)
    assert all(event.wait(120) for event in done)
    assert engine.wait_idle()
    return results


def start_engine(tiny_llama, **options) -> Engine:
    engine = Engine.from_pretrained(str(tiny_llama), EngineConfig(**ENGINE_OPTIONS, **options))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def pallas_engine(tiny_llama):
    engine = start_engine(tiny_llama, attention_backend="pallas-interpret")
    yield engine
    engine.shutdown()


def test_the_plan_needs_a_pallas_backend_the_option_and_a_decode_bucket_of_two_tiles(tiny_llama, pallas_engine):
    runner = pallas_engine.runner
    assert runner.plans_shared_prefix(MIN_PLAN_BATCH, 1)
    assert not runner.plans_shared_prefix(MIN_PLAN_BATCH - 1, 1), "small batches get no plan"
    assert not runner.plans_shared_prefix(MIN_PLAN_BATCH, 8), "prefill steps never carry a plan"
    model_config, params = pallas_engine.model_config, runner.params
    for options in (dict(attention_backend="xla"),
                    dict(attention_backend="pallas-interpret", enable_shared_prefix_attention=False)):
        other = Engine(model_config, params, None, EngineConfig(**ENGINE_OPTIONS, **options))
        assert not other.runner.plans_shared_prefix(8, 1), options


def test_decode_rows_sharing_cached_pages_run_planned_steps_with_unchanged_outputs(tiny_llama, pallas_engine):
    engine = pallas_engine
    compilations = engine.stats().compilations_after_warmup
    systems = [random_prompt(3 * PAGE, seed=1), random_prompt(3 * PAGE, seed=2)]  # 3 full pages each
    for system in systems:  # cache each system prompt's pages, as a first request would
        generate(engine, [system + [11]])
    # 8 rows, two groups of 4 interleaved, each sharing its system prompt's 3 cached pages.
    prompts = [systems[i % 2] + random_prompt(3 + i % 4, seed=10 + i) for i in range(8)]
    before = engine.stats()
    planned = generate(engine, prompts)
    stats = engine.stats()
    assert stats.shared_prefix_steps > before.shared_prefix_steps, "the decode steps must carry a plan"
    rows = stats.shared_prefix_rows - before.shared_prefix_rows
    assert MIN_TILE_ROWS <= rows <= 8 * (stats.shared_prefix_steps - before.shared_prefix_steps)
    assert stats.prefix_cache_hits - before.prefix_cache_hits == 8 * 3 * PAGE

    engine.runner.shared_prefix = False  # the same engine without plans (the engine option sets this at start)
    try:
        plain = generate(engine, prompts)
    finally:
        engine.runner.shared_prefix = True
    assert engine.stats().shared_prefix_steps == stats.shared_prefix_steps
    assert planned == plain
    # Counted process-wide: checked before the XLA engine below compiles its own steps.
    assert engine.stats().compilations_after_warmup == compilations
    assert engine.stats().num_pages_used == 0, "KV pages leaked"

    xla = start_engine(tiny_llama, attention_backend="xla")
    try:
        for system in systems:
            generate(xla, [system + [11]])
        assert generate(xla, prompts) == planned
        assert xla.stats().shared_prefix_steps == 0
    finally:
        xla.shutdown()
