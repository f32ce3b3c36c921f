"""The scheduler on its own, no device: plans, the request's state machine (`update_from_output`), the
KV cache manager underneath (prefix reuse, session pins, preemption and recompute)."""

from __future__ import annotations

from serving.engine.config import BucketSet
from serving.engine.pages import PageAllocator
from serving.engine.scheduler import Schedule, Scheduler
from serving.request import EngineRequest, FinishReason, GenerationConfig

BUCKETS = BucketSet(decode_batch=(1, 2, 4), prefill_rows=(1, 2, 4), prefill_tokens=(16,), max_prefill_tokens=64)


def request(request_id: str, length: int, max_new_tokens: int = 2, stop: frozenset[int] = frozenset(),
            session_id: str | None = None, first_token: int = 3) -> EngineRequest:
    prompt = list(range(first_token, first_token + length))
    return EngineRequest(request_id, prompt, GenerationConfig(max_new_tokens=max_new_tokens), stop, 0, session_id)


def run_step(scheduler: Scheduler, plan: Schedule, token: int = 7) -> list:
    """The engine's part of a step, with `token` as every row's sample."""
    outputs = []
    for chunks in (plan.decode, plan.prefill):
        outputs += scheduler.update_from_output(chunks, [token] * len(chunks))
    return outputs


def test_a_long_prompt_takes_several_rows_of_one_step():
    """Consecutive chunks of one prompt share a step, one row each: `first` on the first row only, a
    sample from the last only; rows stop at the bucket limit and the rest follows in the next step."""
    buckets = BucketSet(decode_batch=(1, 2), prefill_rows=(1, 2, 4), prefill_tokens=(16,), max_prefill_tokens=64)
    scheduler = Scheduler(PageAllocator(64), buckets, page_size=8, max_batch_size=2, max_session_len=200)
    assert scheduler.add_request(request("long", 70)) is None  # 70 tokens: rows of 16 x 4 now, then 6
    plan = scheduler.schedule()
    assert [(c.start, c.length, c.first, c.samples) for c in plan.prefill] == [
        (0, 16, True, False), (16, 16, False, False), (32, 16, False, False), (48, 16, False, False)]
    assert len(plan.prefill[0].pages) == 8  # pages for all four rows
    assert run_step(scheduler, plan) == []  # no row sampled
    plan = scheduler.schedule()
    assert [(c.start, c.length, c.first, c.samples) for c in plan.prefill] == [(64, 6, False, True)]
    assert scheduler.abort("long").finish_reason is FinishReason.ABORT
    assert scheduler.kv.allocator.num_used == 0


def test_packed_prefill_defers_a_small_excess_to_the_next_step():
    """A step 2 tokens past a packed bucket leaves them to the next step instead of padding 14; a step
    that would have to cut a whole prompt, or is nearer the next bucket, pads instead."""
    buckets = BucketSet(decode_batch=(1, 2, 4), prefill_rows=(1,), prefill_tokens=(16,), max_prefill_tokens=64,
                        packed_prefill=(16, 32, 48, 64))
    scheduler = Scheduler(PageAllocator(64), buckets, page_size=8, max_batch_size=4, max_session_len=200)
    for i, length in enumerate([30, 4, 20]):
        scheduler.add_request(request(f"r{i}", length))
    plan = scheduler.schedule()  # 30 + 4 + 20 = 54 tokens: 6 past 48, 10 short of 64: the last prompt gives 6
    assert [(c.request_id, c.start, c.length, c.samples) for c in plan.prefill] == [
        ("r0", 0, 16, False), ("r0", 16, 14, True), ("r1", 0, 4, True), ("r2", 0, 14, False)]
    assert buckets.prefill_bucket(len(plan.prefill), 16, 48).packed == 48
    run_step(scheduler, plan)
    plan = scheduler.schedule()  # the 6 deferred tokens; nothing below 16 to cut to: pad
    assert [(c.request_id, c.start, c.length, c.samples) for c in plan.prefill] == [("r2", 14, 6, True)]


def test_a_request_ends_on_a_stop_id_or_its_length_and_frees_everything():
    scheduler = Scheduler(PageAllocator(32), BUCKETS, page_size=8, max_batch_size=4, max_session_len=64)
    scheduler.add_request(request("stops", 5, max_new_tokens=10, stop=frozenset({9})))
    scheduler.add_request(request("runs", 5, max_new_tokens=3))
    outputs = run_step(scheduler, scheduler.schedule(), token=7)  # both prefill and sample 7
    assert [(o.request_id, o.new_token_ids, o.finished) for o in outputs] == [("stops", [7], False),
                                                                           ("runs", [7], False)]
    plan = scheduler.schedule()
    # read back before this plan (the engine dispatches first, so there the token is still on the device)
    assert [(c.request_id, c.start, c.token_ids, c.step) for c in plan.decode] == [("stops", 5, [7], 1),
                                                                                  ("runs", 5, [7], 1)]
    [stopped, running] = run_step(scheduler, plan, token=9)
    assert (stopped.finished, stopped.finish_reason, stopped.new_token_ids) == (True, FinishReason.STOP, [9])
    assert not running.finished  # 9 is not its stop id
    [last] = run_step(scheduler, scheduler.schedule(), token=9)
    assert (last.request_id, last.finish_reason) == ("runs", FinishReason.LENGTH)
    assert not scheduler.has_work and scheduler.kv.allocator.num_used == 0


def test_the_session_length_caps_max_new_tokens_and_a_full_session_finishes_at_once():
    scheduler = Scheduler(PageAllocator(32), BUCKETS, page_size=8, max_batch_size=4, max_session_len=8)
    full = scheduler.add_request(request("full", 8))
    assert (full.finished, full.finish_reason, full.new_token_ids) == (True, FinishReason.LENGTH, [])
    assert scheduler.add_request(request("capped", 6, max_new_tokens=100)) is None
    outputs = run_step(scheduler, scheduler.schedule())
    outputs += run_step(scheduler, scheduler.schedule())
    assert [o.finish_reason for o in outputs] == [None, FinishReason.LENGTH]  # 2 tokens: 6 + 2 = 8


def test_a_later_request_reuses_the_registered_prefix_once_its_step_is_read_back():
    scheduler = Scheduler(PageAllocator(32), BUCKETS, page_size=8, max_batch_size=4, max_session_len=64)
    scheduler.add_request(request("a", 20))
    plan = scheduler.schedule()
    scheduler.add_request(request("b", 20))
    assert scheduler.schedule().prefill[0].start == 0  # a's pages are not read back yet: nothing to reuse
    run_step(scheduler, plan)
    scheduler.add_request(request("c", 20))
    [c_chunk] = [c for c in scheduler.schedule().prefill if c.request_id == "c"]
    assert (c_chunk.start, c_chunk.length) == (16, 4)  # two whole pages reused, the rest computed
    assert scheduler.num_reused_tokens == 16


def test_preemption_frees_the_newest_which_restarts_from_its_cached_pages():
    scheduler = Scheduler(PageAllocator(6), BUCKETS, page_size=8, max_batch_size=4, max_session_len=40)
    scheduler.add_request(request("old", 16, max_new_tokens=20))
    scheduler.add_request(request("new", 16, max_new_tokens=20, first_token=100))
    run_step(scheduler, scheduler.schedule())  # 2 + 2 pages of the 5 usable; both sampled one token
    run_step(scheduler, scheduler.schedule())  # both need a third page: only one left, "new" gives way
    assert scheduler.num_preemptions == 1 and [s.request_id for s in scheduler.waiting] == ["new"]
    [waiting] = scheduler.waiting
    assert waiting.num_computed == 0 and waiting.held.pages == [] and len(waiting.token_ids) == 17
    assert scheduler.abort("old") is not None
    # Room again. Its prompt's two pages were registered before it lost them, and nothing evicted them
    # since: it takes them from the prefix cache and computes only its generated token, as a decode row.
    plan = scheduler.schedule()
    assert not plan.prefill and [(c.request_id, c.start, c.first, c.samples) for c in plan.decode] == [
        ("new", 16, True, True)]
    assert scheduler.num_reused_tokens == 16


def test_a_finished_session_turn_keeps_its_pages_pinned_until_the_session_ends():
    scheduler = Scheduler(PageAllocator(32), BUCKETS, page_size=8, max_batch_size=4, max_session_len=64)
    scheduler.add_request(request("turn1", 17, max_new_tokens=1, session_id="s"))
    [output] = run_step(scheduler, scheduler.schedule())
    assert output.finish_reason is FinishReason.LENGTH
    allocator = scheduler.kv.allocator
    assert list(scheduler.kv.pins) == ["s"] and allocator.num_used == 2  # two full pages stay referenced
    scheduler.end_session("s")
    assert not scheduler.kv.pins and allocator.num_used == 0 and allocator.num_cached == 2
