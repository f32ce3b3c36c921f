"""Serving while the buckets compile: the server is ready once its essential buckets are compiled, the
scheduler picks only compiled shapes meanwhile, and nothing compiles on the serving path, before or
after the background compilation ends. Before any of it, the server's process spawns the engine's
without importing JAX, which the engine's process imports anyway."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from serving.engine.config import BucketSet, StepShape
from serving.engine.warmup import BucketCompiler, CompileUnit, on_startup_thread
from tests.http_fixtures import FEW_BUCKETS, http, serve_in_thread

BACKGROUND_TIMEOUT_S = 300


def test_the_server_process_reaches_the_engine_spawn_without_jax():
    # What `xlserve serve api_server` imports before `load_engine` spawns the engine's process: JAX there
    # (1.1 s on a 2-core CPU) would delay every start, since the child starts only after it.
    code = ("import sys, serving.cli, serving.engine.multihost, serving.http.engine_loader; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'torch', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def shape(rows: int, tokens: int) -> StepShape:
    return StepShape(rows, tokens, rows * tokens)


def test_the_buckets_choose_only_among_compiled_shapes():
    full = BucketSet(decode_batch=(1, 4, 16), prefill_rows=(1, 4), prefill_tokens=(16, 64), max_prefill_tokens=256)
    assert full.essential_shapes() == [shape(1, 1), shape(1, 16)]
    early = full.with_compiled(frozenset(full.essential_shapes()))
    assert early.decode_capacity == 1 and early.decode_bucket(1) == 1
    assert early.max_chunk == 16  # a prompt prefills 16 tokens a step until [x 64] compiles
    assert early.prefill_bucket(1, 10, 10) == shape(1, 16)
    assert early.prefill_bucket(1, 40, 40) is None and early.prefill_bucket(2, 16, 32) is None
    later = full.with_compiled(frozenset({*full.essential_shapes(), shape(4, 1), shape(4, 64)}))
    assert later.decode_capacity == 4 and later.decode_bucket(3) == 4
    assert later.prefill_bucket(1, 40, 40) == shape(4, 64)  # [1 x 64] is not compiled yet: four rows hold it
    assert later.max_chunk == 64
    for rows, longest, total in [(1, 10, 10), (1, 40, 40), (2, 40, 80), (4, 64, 256), (5, 16, 80)]:
        assert full.with_compiled(None).prefill_bucket(rows, longest, total) == full.prefill_bucket(rows, longest,
                                                                                                    total)
    assert full.decode_capacity == 16 and full.max_chunk == 64

    packed = BucketSet(decode_batch=(1, 2), prefill_rows=(1,), prefill_tokens=(64,), max_prefill_tokens=512,
                       packed_prefill=(128, 256, 512))
    first = packed.with_compiled(frozenset(packed.essential_shapes()))
    assert packed.essential_shapes()[1].packed == 128
    assert first.prefill_budget == 128 and first.packed_bucket_below(300) == 128
    assert first.prefill_bucket(2, 64, 100).packed == 128 and first.prefill_bucket(3, 64, 200) is None
    assert packed.prefill_budget == 512 and packed.packed_bucket_below(300) == 256


def test_the_compiler_waits_for_the_essential_units_and_announces_each_in_order():
    gate, later_started, ran_on_startup_thread = threading.Event(), threading.Event(), []
    units = [CompileUnit(shape(1, 1), "decode", (lambda: ran_on_startup_thread.append(on_startup_thread()),)),
             CompileUnit(shape(1, 16), "prefill", (lambda: None, lambda: None)),
             CompileUnit(None, "later", (lambda: (later_started.set(), gate.wait()),)),
             CompileUnit(shape(4, 1), "never", (lambda: None,))]
    announced = []
    compiler = BucketCompiler(units, essential=2, threads=1,
                              on_done=lambda unit, done, total, _: announced.append((unit.label, done, total)))
    compiler.start()
    compiler.wait(essential_only=True)
    assert announced == [("decode", 1, 4), ("prefill", 2, 4)] and compiler.remaining == 2
    assert ran_on_startup_thread == [True] and not on_startup_thread()
    assert later_started.wait(10)
    compiler.cancel()  # "never" has not started: it is dropped; "later" is running and finishes
    gate.set()
    deadline = time.monotonic() + 10
    while len(announced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert announced[2] == ("later", 3, 4) and compiler.remaining == 1


def metric(base_url: str, name: str) -> int:
    text = http.get(f"{base_url}/metrics", timeout=10).text
    return int(float(re.search(re.escape(name) + r"(?:_total)?(?:\{[^}]*\})? ([\d.e+]+)$", text, re.M).group(1)))


def complete_four(client, label: str) -> list[int]:
    """Four requests at once (two greedy, two sampled with top-p); their completion token counts."""
    def one(i: int) -> int:
        extra = dict(temperature=0.9, top_p=0.8, seed=i) if i % 2 else dict(temperature=0)
        answer = client.completions.create(model="tiny-llama", prompt=f"{label} {i} " * (2 + 3 * i), max_tokens=5,
                                           extra_body={"ignore_eos": True}, **extra)
        return answer.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(4)))


def test_serves_while_buckets_compile_and_never_compiles_on_the_serving_path(tiny_llama: Path):
    # No program store: the session's (tests/conftest.py) would load every bucket before the server is ready.
    options = dict(FEW_BUCKETS, compilation_cache_dir="off")
    with serve_in_thread(tiny_llama, options, all_buckets=False) as (live, _):
        remaining = metric(live.base_url, "xlserve:startup_buckets_remaining")
        assert remaining > 0, "ready only once every bucket compiled"
        assert complete_four(live.client(), "early") == [5] * 4  # one decode row at a time: only [1 x 1] is there
        assert metric(live.base_url, "xlserve:startup_buckets_remaining") > 0, "answered after the compile ended"
        deadline = time.monotonic() + BACKGROUND_TIMEOUT_S
        while metric(live.base_url, "xlserve:startup_buckets_remaining") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live.engine.buckets_remaining == 0
        while metric(live.base_url, "xlserve:startup_buckets_unrun") and time.monotonic() < deadline:
            time.sleep(0.2)  # then each bucket runs once while the server idles, one after the other
        assert live.engine.runner.warm_steps == len(live.engine.buckets.shapes())
        assert complete_four(live.client(), "late") == [5] * 4  # batches of four, every sampler branch
        assert live.engine.scheduler.buckets.compiled is None  # the scheduler has every bucket to choose from
        assert live.engine.stats().compilations_after_warmup == 0
        assert metric(live.base_url, "xlserve:compilations_after_warmup") == 0
