"""Prefix caching and session pins: the page cache's rules, then the engine reusing pages for real.

The engine tests run on the shared tiny engine (24 usable pages of 16 tokens, session length 128). A
request's outputs must not depend on what happens to be cached, so every reuse is checked against
the same request computed from scratch.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from serving import GenerationConfig
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.page_hash import ROOT_KEY, page_key, page_keys
from serving.engine.pages import OutOfPages, PageAllocator, PageContent
from tests.sentencepiece_tokenizer import VOCAB_SIZE

PAGE = 16
GREEDY = GenerationConfig(max_new_tokens=8, ignore_eos=True)


# ----- the page cache ------------------------------------------------------------------------------------
def named(parent: int, tokens: tuple[int, ...]) -> tuple[int, PageContent]:
    return page_key(parent, tokens), PageContent(parent, tokens)


def test_a_released_registered_page_is_cached_and_found_again():
    pages = PageAllocator(4)
    page, other = pages.allocate(2)
    key, content = named(ROOT_KEY, (1, 2, 3))
    pages.register(page, key, content)
    pages.release([page, other])
    assert (pages.num_used, pages.num_cached, pages.num_free) == (0, 1, 3)
    assert pages.lookup(key, content) == page
    pages.share([page])
    assert (pages.num_used, pages.num_cached) == (1, 0), "a cache hit takes the page out of the evictable set"
    pages.release([page])


def test_lookup_checks_content_not_just_the_key():
    pages = PageAllocator(3)
    (page,) = pages.allocate(1)
    key, content = named(ROOT_KEY, (7, 8))
    pages.register(page, key, content)
    assert pages.lookup(key, PageContent(ROOT_KEY, (7, 9))) is None, "a key collision must be a miss"
    assert pages.lookup(key, PageContent(key, (7, 8))) is None, "same tokens after another prefix: a miss"
    pages.release([page])


def test_cached_pages_are_evicted_least_recently_released_first_and_only_when_needed():
    pages = PageAllocator(4)  # 3 usable
    first, second, third = pages.allocate(3)
    names = [named(ROOT_KEY, (i,)) for i in range(3)]
    for page, (key, content) in zip((first, second, third), names, strict=True):
        pages.register(page, key, content)
    pages.release([second])
    pages.release([first])
    assert pages.allocate(1) == [second], "the least recently released cached page goes first"
    assert pages.lookup(*names[1]) is None and pages.lookup(*names[0]) == first
    with pytest.raises(OutOfPages):
        pages.allocate(2)  # `third` is in use
    pages.release([second, third])


def test_a_duplicate_content_keeps_the_first_page_and_frees_the_second():
    pages = PageAllocator(4)
    a, b = pages.allocate(2)
    key, content = named(ROOT_KEY, (5,))
    pages.register(a, key, content)
    pages.register(b, key, content)
    pages.release([a, b])
    assert (pages.num_cached, pages.lookup(key, content)) == (1, a)


# ----- the engine --------------------------------------------------------------------------------------
def random_prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE, size=length).tolist()


def run(engine: Engine, prompts: list[list[int]], config: GenerationConfig = GREEDY,
        session_id: str | None = None) -> list[tuple[list[int], int]]:
    """Submit the prompts together; (generated tokens, cached prompt tokens) of each."""
    results: list[tuple[list[int], int]] = [([], 0) for _ in prompts]
    done = [threading.Event() for _ in prompts]
    for i, prompt in enumerate(prompts):
        request = engine.make_request(prompt, config, f"prefix-{i}-{id(results)}", session_id=session_id)

        def sink(out, i=i):
            tokens, _ = results[i]
            results[i] = (tokens + out.new_token_ids, out.num_cached_tokens)
            assert out.error is None, out.error
            if out.finished:
                done[i].set()

        engine.submit(request, sink)
    for event in done:
        assert event.wait(60)
    return results


@contextlib.contextmanager
def caching(engine: Engine, enabled: bool):
    """Switch the scheduler's reuse rule for one test (the same attribute the engine option sets)."""
    saved = engine.scheduler.kv.prefix_caching
    engine.scheduler.kv.prefix_caching = enabled
    try:
        yield
    finally:
        engine.scheduler.kv.prefix_caching = saved


def drop_cache(engine: Engine) -> None:
    """Evict every cached page, by allocating all free ones (the allocator's only eviction path)."""
    allocator = engine.allocator
    allocator.release(allocator.allocate(allocator.num_free))
    assert allocator.num_cached == 0


@pytest.fixture
def engine(tiny_pipe):
    engine = tiny_pipe.engine
    drop_cache(engine)
    yield engine
    assert engine.wait_idle(), "requests still running after the test"
    for session in list(engine.scheduler.kv.pins):
        engine.end_session(session)
    assert wait_until(lambda: not engine.scheduler.kv.pins), "sessions still pinned after the test"
    assert engine.allocator.num_used == 0, "KV pages leaked"


def test_the_engine_option_sets_the_scheduler_rule(tiny_pipe):
    base = tiny_pipe.engine
    options = dict(preset="test", page_size=PAGE, num_pages=4, session_len=32)
    for enabled in (True, False):
        other = Engine(base.model_config, base.runner.params, None,
                       EngineConfig(enable_prefix_caching=enabled, **options), mesh=base.mesh)
        assert other.scheduler.kv.prefix_caching is enabled
    assert EngineConfig().enable_prefix_caching, "prefix caching is on by default"


def test_a_repeated_prompt_reuses_its_full_pages_and_computes_only_the_rest(engine):
    prompt = random_prompt(53, seed=1)  # 3 full pages + 5 tokens
    (cold, cold_cached), = run(engine, [prompt])
    computed = engine.stats().prompt_tokens_computed
    (warm, warm_cached), = run(engine, [prompt])
    assert (cold_cached, warm_cached) == (0, 48)
    assert engine.stats().prompt_tokens_computed - computed == 53 - 48
    assert warm == cold


def test_page_keys_names_the_pages_the_engine_registers(engine):
    """The proxy's cache-aware routing names a prompt's pages with `page_keys`: they must be the
    names under which the engine's prefix cache holds them."""
    prompt = random_prompt(53, seed=8)  # 3 full pages + 5 tokens
    run(engine, [prompt])
    keys = page_keys(prompt, PAGE)
    assert len(keys) == 3
    for index, key in enumerate(keys):
        parent = keys[index - 1] if index else ROOT_KEY
        content = PageContent(parent, tuple(prompt[index * PAGE : (index + 1) * PAGE]))
        assert engine.allocator.lookup(key, content) is not None, f"page {index} is not cached under its key"


def test_a_page_aligned_prompt_still_computes_its_last_token(engine):
    prompt = random_prompt(48, seed=2)  # exactly 3 pages: the last one must be recomputed for its logits
    (cold, _), = run(engine, [prompt])
    (warm, cached), = run(engine, [prompt])
    assert cached == 32 and warm == cold


def test_generated_tokens_are_cached_too_so_a_follow_up_reuses_them(engine):
    prompt = random_prompt(30, seed=3)
    (reply, _), = run(engine, [prompt], GenerationConfig(max_new_tokens=20, ignore_eos=True))
    follow_up = prompt + reply + random_prompt(10, seed=4)  # 60 tokens: 50 seen before
    (warm, cached), = run(engine, [follow_up])
    assert cached == 48, "pages filled by generated tokens are shared as well"
    with caching(engine, False):
        (cold, none_cached), = run(engine, [follow_up])
    assert none_cached == 0 and warm == cold


def test_greedy_outputs_are_the_same_with_caching_on_and_off(engine):
    system = random_prompt(40, seed=5)
    prompts = [system + random_prompt(n, seed=10 + n) for n in (3, 17, 30, 45)]
    with caching(engine, False):
        expected = [tokens for tokens, _ in run(engine, prompts)]
        assert engine.allocator.num_cached == 0, "with caching off, pages are not even registered"
    run(engine, [system + [11]])  # the shared prefix is cached now
    results = run(engine, prompts)
    assert [tokens for tokens, _ in results] == expected
    assert all(cached >= 32 for _, cached in results)


def test_sampled_outputs_with_a_seed_are_the_same_from_the_cache(engine):
    prompt = random_prompt(70, seed=6)
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, random_seed=123)
    (cold, _), = run(engine, [prompt], config)
    (warm, cached), = run(engine, [prompt], config)
    assert cached == 64 and warm == cold


def test_a_repetition_penalty_computes_the_whole_prompt(engine):
    prompt = random_prompt(40, seed=7)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3)
    (cold, _), = run(engine, [prompt], config)
    (again, cached), = run(engine, [prompt], config)
    assert cached == 0, "the penalty needs every prompt token in the step's seen-tokens table"
    assert again == cold


def test_reuse_under_preemption_keeps_outputs_identical(engine):
    shared = random_prompt(16, seed=19)  # one page every sequence shares
    prompts = [shared + random_prompt(24, seed=20 + i) for i in range(8)]  # 8 x (40 + 40) tokens = 40 pages > 24
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    with caching(engine, False):
        expected = [tokens for tokens, _ in run(engine, prompts, config)]
    preemptions = engine.scheduler.num_preemptions
    results = run(engine, prompts, config)
    assert engine.scheduler.num_preemptions > preemptions, "the test must exercise preemption"
    assert [tokens for tokens, _ in results] == expected


# ----- sessions ------------------------------------------------------------------------------------------
def test_a_session_pins_its_pages_until_it_ends(engine):
    prompt = random_prompt(40, seed=8)
    (reply, _), = run(engine, [prompt], session_id="s1")
    stats = engine.stats()
    assert stats.num_pinned_sessions == 1 and stats.num_pages_used == 2  # 47 tokens in KV: 2 full pages
    (_, cached), = run(engine, [prompt + reply + [5, 6, 7]], session_id="s1")
    assert cached == 32
    assert engine.stats().num_pinned_sessions == 1 and engine.stats().num_pages_used == 3
    engine.end_session("s1")
    assert wait_until(lambda: engine.stats().num_pinned_sessions == 0)
    assert engine.allocator.num_used == 0 and engine.allocator.num_cached == 3, "an ended session's pages stay cached"


def test_a_session_uses_its_pins_even_with_caching_off(engine):
    prompt = random_prompt(40, seed=9)
    with caching(engine, False):
        (reply, _), = run(engine, [prompt], session_id="s2")
        (_, cached), = run(engine, [prompt + reply + [9]], session_id="s2")
        (_, other_cached), = run(engine, [prompt + reply + [9]])
    assert cached == 32 and other_cached == 0  # 47 of 48 tokens in KV: 2 full pages


def test_page_pressure_unpins_idle_sessions_before_preempting_and_the_next_turn_recomputes(engine):
    history = random_prompt(60, seed=11)
    (reply, _), = run(engine, [history], session_id="s3")
    turn = history + reply + random_prompt(6, seed=12)
    with caching(engine, False):
        (expected, _), = run(engine, [turn])
    assert engine.stats().num_pinned_sessions == 1
    preemptions = engine.scheduler.num_preemptions
    run(engine, [random_prompt(120, seed=13 + i) for i in range(3)], GenerationConfig(max_new_tokens=4,
                                                                                       ignore_eos=True))
    assert engine.stats().num_pinned_sessions == 0, "three 8-page sequences need every page"
    assert engine.scheduler.num_preemptions == preemptions, "unpinning comes before preemption"
    (again, cached), = run(engine, [turn], session_id="s3")
    assert cached == 0 and again == expected


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
