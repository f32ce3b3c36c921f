"""The engine end to end on a tiny random Llama: parity with transformers' generate, continuous
batching, preemption, page accounting, donation, compile discipline and input validation."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest
import torch

from serving import GenerationConfig
from serving.request import EngineOutput, EngineRequest, InvalidRequestError
from tests.sentencepiece_tokenizer import VOCAB_SIZE

GREEDY = dict(max_new_tokens=12, ignore_eos=True)


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens):
    """transformers' greedy continuation with EOS ignored (the reference)."""
    saved = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        hf.generation_config.eos_token_id = saved
    return out[0, len(prompt):].tolist()


@pytest.fixture(autouse=True)
def no_leaks(tiny_pipe):
    yield
    engine = tiny_pipe.engine
    assert engine.wait_idle(), "requests still running after the test"
    assert engine.allocator.num_used == 0, "KV pages leaked"
    assert len(engine.scheduler._free_slots) == engine.max_batch_size, "slots leaked"


def test_concurrent_greedy_generations_equal_transformers(tiny_pipe, hf_tiny):
    prompts = random_prompts([5, 17, 33, 70])  # 70 tokens: prefilled in two chunks (test preset: 64 max)
    outputs = tiny_pipe(prompts, GenerationConfig(**GREEDY))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_greedy(hf_tiny, prompt, GREEDY["max_new_tokens"])
        assert out.finish_reason == "length"
        assert out.generate_token_len == GREEDY["max_new_tokens"]
        assert out.input_token_len == len(prompt)


def run_with_engine(engine, jobs):
    """Submit (prompt, config, start_after) jobs; a job with start_after=(i, k) joins once job i has
    produced k tokens, from inside the engine thread, so the join point is exact. Returns token lists."""
    results = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]
    requests = [engine.make_request(p, c, f"job-{i}-{id(jobs)}") for i, (p, c, _) in enumerate(jobs)]
    followers = {i: after for i, (_, _, after) in enumerate(jobs) if after is not None}

    def sink_for(i):
        def sink(out):
            results[i].extend(out.new_token_ids)
            for j, (leader, count) in list(followers.items()):
                if leader == i and len(results[i]) == count:
                    del followers[j]
                    engine.submit(requests[j], sink_for(j))
            if out.finished:
                done[i].set()
        return sink

    for i, (_, _, after) in enumerate(jobs):
        if after is None:
            engine.submit(requests[i], sink_for(i))
    for event in done:
        assert event.wait(60)
    return results


def hf_last_hidden(hf, prompt: list[int]) -> np.ndarray:
    """transformers' final-norm output at the prompt's last token: what an embedding request answers."""
    with torch.no_grad():
        return hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()


def embed_while_decoding(engine, prompt: list[int], embed_prompts: list[list[int]]) -> list[list[float]]:
    """Embedding requests (`EngineRequest.embed`) submitted once a generating request has its second token, from
    the engine thread, so they join while it decodes; returns their embeddings."""
    generating = engine.make_request(prompt, GenerationConfig(**GREEDY), f"gen-{id(embed_prompts)}")
    requests = [engine.make_request(p, GenerationConfig(max_new_tokens=0), f"embed-{i}-{id(embed_prompts)}")
                for i, p in enumerate(embed_prompts)]
    finals: dict[str, EngineOutput] = {}
    done = threading.Event()
    produced = []

    def sink(out: EngineOutput) -> None:
        produced.extend(out.new_token_ids)
        if out.request_id == generating.request_id and len(produced) == 2:
            for request in requests:
                request.embed = True
                engine.submit(request, sink)
        if out.finished:
            finals[out.request_id] = out
            if len(finals) == 1 + len(requests):
                done.set()

    engine.submit(generating, sink)
    assert done.wait(60)
    return [finals[r.request_id].embedding for r in requests]


def test_request_joining_mid_flight_does_not_change_others(tiny_pipe):
    engine = tiny_pipe.engine
    a, b = random_prompts([20, 9], seed=3)
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    sampled = GenerationConfig(max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=0.9,
                               top_p=0.9, random_seed=7)
    alone = [run_with_engine(engine, [(a, cfg, None)])[0], run_with_engine(engine, [(b, sampled, None)])[0]]
    joined = run_with_engine(engine, [(a, cfg, None), (b, sampled, (0, 5))])
    assert joined == alone


def test_preemption_under_a_tiny_page_budget_keeps_outputs_identical(tiny_pipe):
    engine = tiny_pipe.engine
    prompts = random_prompts([40] * 8, seed=5)  # 8 x (40 + 40) tokens = 40 pages > the 24 there are
    configs = [GenerationConfig(max_new_tokens=40, ignore_eos=True, do_sample=i % 2 == 1, temperature=0.8,
                                random_seed=100 + i) for i in range(8)]
    solo = [tiny_pipe(p, c).token_ids for p, c in zip(prompts, configs, strict=True)]
    before = engine.scheduler.num_preemptions
    together = tiny_pipe(prompts, configs)
    assert engine.scheduler.num_preemptions > before, "the test must actually preempt"
    assert [r.token_ids for r in together] == solo


def test_donated_cache_is_updated_in_place(tiny_pipe):
    engine = tiny_pipe.engine
    old_k, old_seen, old_last = engine.runner.cache[0][0], engine.runner.seen, engine.runner.last_tokens
    tiny_pipe(random_prompts([6])[0], GenerationConfig(max_new_tokens=2))
    assert old_k.is_deleted() and old_seen.is_deleted() and old_last.is_deleted(), (
        "the step must donate, not copy, the per-sequence device state")


def test_no_compilation_while_serving_50_mixed_requests(tiny_pipe):
    engine = tiny_pipe.engine
    rng = np.random.default_rng(11)
    prompts = random_prompts(rng.integers(1, 100, size=50).tolist(), seed=11)
    configs = [
        GenerationConfig(max_new_tokens=int(rng.integers(1, 20)), do_sample=bool(i % 2), temperature=0.7,
                         top_k=int(rng.integers(0, 50)), top_p=float(rng.uniform(0.5, 1.0)),
                         min_p=0.05 * (i % 3), repetition_penalty=1.0 + 0.1 * (i % 4), random_seed=i,
                         stop_words=["ab"] if i % 5 == 0 else None)
        for i in range(50)
    ]
    before = engine.stats().compilations_after_warmup
    results = tiny_pipe(prompts, configs)
    assert len(results) == 50
    assert engine.stats().compilations_after_warmup == before


def test_each_compiled_bucket_runs_once_while_idle_and_changes_no_state(tiny_pipe, hf_tiny):
    """The engine thread runs every compiled bucket once on padding rows while it has nothing to do (a
    program's first run costs more, which no request should wait through): no page, no row of the
    per-slot state and no later output changes."""
    engine, runner = tiny_pipe.engine, tiny_pipe.engine.runner
    shapes = engine.buckets.shapes()
    deadline = time.monotonic() + 60
    while runner.warm_steps < len(shapes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.warm_steps == len(shapes) and not engine._unwarmed

    def state() -> list[np.ndarray]:
        return [np.asarray(a) for a in (*jax.tree.leaves(runner.cache), runner.seen, runner.last_tokens)]

    before = state()
    for shape in shapes:  # the engine thread is idle, so the test may step its runner
        runner.warm(shape)
    after = state()
    slots = engine.max_batch_size  # the per-slot tables' rows past the slots are padding's scratch
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old if old.ndim == 4 else old[:slots], new if new.ndim == 4 else new[:slots])
    assert engine.allocator.num_used == 0
    prompt = random_prompts([9], seed=5)[0]
    assert tiny_pipe(prompt, GenerationConfig(**GREEDY)).token_ids == hf_greedy(hf_tiny, prompt, 12)


def test_the_timeline_records_every_turn_in_order(tiny_pipe):
    engine = tiny_pipe.engine
    prompts = random_prompts([5, 70], seed=21)  # 70 tokens: two prefill chunks
    engine.timeline = []
    try:
        tiny_pipe(prompts, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    finally:
        turns, engine.timeline = engine.timeline, None
    assert all(t.start <= t.dispatched <= t.device_ready <= t.read for t in turns)
    assert all(a.read <= b.start for a, b in zip(turns, turns[1:], strict=False))
    assert sum(t.prefill_tokens for t in turns) == 75
    assert sum(t.decode_rows for t in turns) == 2 * 5  # the prefill step samples each first token


def test_same_seed_same_tokens_and_different_seeds_differ(tiny_pipe):
    prompt = random_prompts([8], seed=2)[0]
    cfg = dict(max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=1.5)
    first = tiny_pipe(prompt, GenerationConfig(random_seed=1234, **cfg)).token_ids
    again = tiny_pipe(prompt, GenerationConfig(random_seed=1234, **cfg)).token_ids
    other = tiny_pipe(prompt, GenerationConfig(random_seed=4321, **cfg)).token_ids
    assert first == again
    assert first != other


def test_stop_token_ids_min_new_tokens_and_lengths(tiny_pipe):
    prompt = random_prompts([10], seed=4)[0]
    greedy = tiny_pipe(prompt, GenerationConfig(max_new_tokens=10, ignore_eos=True)).token_ids
    stop_at = greedy[3]
    stopped = tiny_pipe(prompt, GenerationConfig(max_new_tokens=10, stop_token_ids=[stop_at]))
    first = greedy.index(stop_at)
    assert stopped.token_ids == greedy[: first + 1] and stopped.finish_reason == "stop"
    held = tiny_pipe(prompt, GenerationConfig(max_new_tokens=10, stop_token_ids=[stop_at],
                                              min_new_tokens=first + 2))
    assert stop_at not in held.token_ids[: first + 2]
    zero = tiny_pipe(prompt, GenerationConfig(max_new_tokens=0))
    assert zero.token_ids == [] and zero.finish_reason == "length"


def test_stop_strings_end_text_before_the_stop_string(tiny_pipe):
    prompt = random_prompts([12], seed=6)[0]
    full = tiny_pipe(prompt, GenerationConfig(max_new_tokens=24, ignore_eos=True))
    text = full.text
    cut = next(i for i in range(len(text) // 2, len(text) - 3) if text[i:i + 3].strip())
    stop = text[cut:cut + 3]
    first = text.index(stop)
    out = tiny_pipe(prompt, GenerationConfig(max_new_tokens=24, ignore_eos=True, stop_words=[stop]))
    assert out.text == text[:first]
    assert out.finish_reason == "stop"
    assert out.generate_token_len <= full.generate_token_len


@pytest.mark.parametrize(
    "prompt,options,param",
    [
        ("", {}, "prompts"),
        ([], {}, "prompts"),
        (list(range(3, 200)), {}, "prompt"),  # longer than the session (128)
        ([5, 6], {"temperature": -1.0}, "temperature"),
        ([5, 6], {"top_p": 1.5}, "top_p"),
        ([5, 6], {"top_k": -3}, "top_k"),
        ([5, 6], {"max_new_tokens": -1}, "max_new_tokens"),
        ([5, 6], {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([5, 6], {"random_seed": -5}, "random_seed"),
        ([5, 6], {"temperature": float("nan")}, "temperature"),
        ([5, 6], {"stop_token_ids": [10**9]}, "stop_token_ids"),
        ([5, 10**9], {}, "prompt"),
    ],
)
def test_bad_input_raises_a_clear_error_and_the_engine_keeps_serving(tiny_pipe, prompt, options, param):
    with pytest.raises(InvalidRequestError) as err:
        tiny_pipe(prompt, GenerationConfig(**options))
    assert err.value.param == param
    assert tiny_pipe([5, 6, 7], GenerationConfig(max_new_tokens=2)).generate_token_len == 2


def test_unknown_options_are_named():
    from serving.engine.config import EngineConfig

    with pytest.raises(InvalidRequestError, match="page_sise"):
        EngineConfig.from_options(page_sise=16)


def test_capacity_is_reported(tiny_pipe):
    assert tiny_pipe.page_size == 16
    assert tiny_pipe.num_pages == 24
    assert tiny_pipe.max_cached_tokens == 24 * 16


def test_abort_frees_pages_at_once(tiny_pipe):
    engine = tiny_pipe.engine
    request: EngineRequest = engine.make_request(random_prompts([30])[0], GenerationConfig(max_new_tokens=100,
                                                 ignore_eos=True), "to-abort")
    finished = threading.Event()
    reasons = []

    def sink(out):
        if out.new_token_ids and len(reasons) == 0:
            reasons.append("started")
            engine.abort("to-abort")
        if out.finished:
            reasons.append(out.finish_reason.value)
            finished.set()

    engine.submit(request, sink)
    assert finished.wait(30)
    assert reasons[-1] == "abort"


def test_stream_infer_yields_increments_that_add_up(tiny_pipe):
    prompts = random_prompts([9, 25], seed=8)
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    whole = tiny_pipe(prompts, config)
    texts, tokens, parts = ["", ""], [[], []], [0, 0]
    for part in tiny_pipe.stream_infer(prompts, config):
        texts[part.index] += part.text
        tokens[part.index] += part.token_ids
        parts[part.index] += 1
    assert texts == [r.text for r in whole] and tokens == [r.token_ids for r in whole]
    assert min(parts) > 1, "stream_infer must stream, not return everything at the end"


def test_chat_messages_use_the_checkpoint_template(tiny_pipe):
    messages = [{"role": "user", "content": "Hello there"}]
    want = tiny_pipe.tokenizer.encode(tiny_pipe.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    out = tiny_pipe(messages, GenerationConfig(max_new_tokens=3, ignore_eos=True))
    assert out.input_token_len == len(want)
    assert out.token_ids == tiny_pipe(want, GenerationConfig(max_new_tokens=3, ignore_eos=True)).token_ids


def test_dummy_load_format_needs_only_config_and_tokenizer(tiny_llama, tmp_path):
    import shutil

    from serving.engine.config import EngineConfig
    from serving.engine.engine import Engine

    for file in tiny_llama.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, tmp_path / file.name)
    options = dict(load_format="dummy", preset="test", page_size=16, num_pages=8, session_len=64)
    engine = Engine.from_pretrained(str(tmp_path), EngineConfig.from_options(**options))
    embedding = engine.runner.params["embed"]["embedding"]
    assert embedding.shape == (VOCAB_SIZE, engine.model_config.hidden_size)
    with pytest.raises(FileNotFoundError):
        Engine.from_pretrained(str(tmp_path), EngineConfig.from_options(**dict(options, load_format="auto")))


def test_packed_prefill_equals_transformers(tiny_llama, hf_tiny):
    """Packed prefill: the matmuls run over the valid tokens end to end, attention over rows of 16.
    Prompts over several rows and steps, a step's last prompt cut to fill a bucket, all still equal
    transformers token for token, with no compilation after warm-up and no pages left behind."""
    from serving import pipeline
    from tests.conftest import TINY_ENGINE_OPTIONS

    options = dict(TINY_ENGINE_OPTIONS, prefill_token_buckets=(16,), packed_prefill_buckets=(16, 48, 64))
    with pipeline(str(tiny_llama), **options) as pipe:
        engine = pipe.engine
        shapes = engine.buckets.shapes()
        assert [s for s in shapes if s.tokens > 1] == [(4, 16, 16, 0), (6, 16, 48, 0), (8, 16, 64, 0)]
        prompts = random_prompts([5, 17, 33, 70, 3, 40])
        outputs = pipe(prompts, GenerationConfig(**GREEDY))
        for prompt, out in zip(prompts, outputs, strict=True):
            assert out.token_ids == hf_greedy(hf_tiny, prompt, GREEDY["max_new_tokens"])
        assert engine.stats().compilations_after_warmup == 0
        assert engine.wait_idle() and engine.allocator.num_used == 0


def test_mixed_steps_equal_transformers(tiny_llama, hf_tiny):
    """Mixed steps: sequences that are decoding run in the same program as the prompt chunks of sequences
    that join meanwhile (their tokens at the head of the packed stream, attending as one-token rows). Every
    sequence still equals transformers token for token; the turns that had both ran as one step."""
    from serving import pipeline
    from tests.conftest import TINY_ENGINE_OPTIONS

    options = dict(TINY_ENGINE_OPTIONS, prefill_token_buckets=(16,), packed_prefill_buckets=(16, 64),
                   mixed_decode_buckets=(2, 4))
    with pipeline(str(tiny_llama), **options) as pipe:
        engine = pipe.engine
        mixed = [s for s in engine.buckets.shapes() if s.decode]
        assert mixed == [(6, 16, 18, 2), (10, 16, 66, 2), (8, 16, 20, 4), (12, 16, 68, 4)]
        prompts = random_prompts([5, 17, 33, 70, 3, 40], seed=3)
        greedy = GenerationConfig(**GREEDY)
        # Three decode from the start; the others join while they decode, one long prompt over several steps.
        jobs = [(prompts[0], greedy, None), (prompts[1], greedy, None), (prompts[4], greedy, None),
                (prompts[2], greedy, (0, 2)), (prompts[3], greedy, (1, 3)), (prompts[5], greedy, (2, 5))]
        before = engine.stats().mixed_steps
        results = run_with_engine(engine, jobs)
        for (prompt, _, _), tokens in zip(jobs, results, strict=True):
            assert tokens == hf_greedy(hf_tiny, prompt, GREEDY["max_new_tokens"])
        assert engine.stats().mixed_steps - before >= 3
        assert engine.stats().compilations_after_warmup == 0
        assert engine.wait_idle() and engine.allocator.num_used == 0
        # Embedding requests that join a decoding sequence ride in mixed steps too, each answered with the
        # final norm's output at its prompt's last token (a packed step's row, moved back to the step's order).
        steps = engine.stats().mixed_steps
        embeds = embed_while_decoding(engine, prompts[1], [prompts[2], prompts[3]])
        assert engine.stats().mixed_steps > steps
        for prompt, embedding in zip([prompts[2], prompts[3]], embeds, strict=True):
            np.testing.assert_allclose(embedding, hf_last_hidden(hf_tiny, prompt), rtol=1e-4, atol=1e-5)
        assert engine.wait_idle() and engine.allocator.num_used == 0
        # The KV pool is updated in place: a mixed step needs no more scratch memory than its prefill step
        # plus a small part of the pool (a pool written after a read of it would be copied whole each step).
        runner = engine.runner
        pool = sum(leaf.nbytes for leaf in jax.tree.leaves(runner.cache))
        temp = {key: runner._step.compiled(key).memory_analysis().temp_size_in_bytes
                for key in ((4, 16, 16, 0), (6, 16, 18, 2), (8, 16, 20, 4))}
        assert max(temp[6, 16, 18, 2], temp[8, 16, 20, 4]) < temp[4, 16, 16, 0] + pool / 4, (temp, pool)


def test_mixed_buckets_pick_the_fewest_decoding_rows_and_need_packed_prefill():
    from serving.engine.config import BucketSet, StepShape

    buckets = BucketSet((1, 4), (1,), (16,), 64, packed_prefill=(16, 64), mixed_decode=(2, 4))
    assert buckets.mixed_bucket(1, 1, 16, 10) == StepShape(6, 16, 18, 2)
    assert buckets.mixed_bucket(3, 2, 16, 20) == StepShape(12, 16, 68, 4)
    assert buckets.mixed_bucket(5, 1, 16, 10) is None  # more decoding rows than any mixed bucket: two steps
    compiled = buckets.with_compiled(frozenset(buckets.shapes()) - {StepShape(6, 16, 18, 2)})
    assert compiled.mixed_bucket(1, 1, 16, 10) == StepShape(8, 16, 20, 4)  # the next one compiled
    with pytest.raises(ValueError, match="need packed prefill"):
        BucketSet((1, 4), (1,), (16,), 64, mixed_decode=(2,))


def test_packed_prefill_buckets_are_checked():
    from serving.engine.config import BucketSet

    with pytest.raises(ValueError, match="exactly one prefill token bucket"):
        BucketSet((1,), (1,), (16, 32), 64, packed_prefill=(16, 32))
    with pytest.raises(ValueError, match="must not exceed max_prefill_token_num"):
        BucketSet((1,), (1,), (16,), 64, packed_prefill=(16, 128))
    with pytest.raises(ValueError, match="increasing positive"):
        BucketSet((1,), (1,), (16,), 64, packed_prefill=(32, 16))


def test_packed_prefill_flag_reaches_the_engine_and_bad_values_name_it():
    from serving.cli import build_parser
    from serving.http.options import OptionError, from_arguments

    parser = build_parser()
    argv = ["serve", "api_server", "--prefill-token-buckets", "128", "--packed-prefill-buckets", "256", "1024"]
    buckets = from_arguments(parser.parse_args(argv), environ={}).engine_config.buckets("gpu")
    assert buckets.packed_prefill == (256, 1024) and buckets.prefill_budget == 1024
    argv += ["--mixed-decode-buckets", "16", "64"]
    assert from_arguments(parser.parse_args(argv), environ={}).engine_config.buckets("gpu").mixed_decode == (16, 64)
    with pytest.raises((OptionError, ValueError), match="exactly one prefill token bucket"):
        argv = ["serve", "api_server", "--prefill-token-buckets", "64", "128", "--packed-prefill-buckets", "256"]
        from_arguments(parser.parse_args(argv), environ={}).engine_config.buckets("gpu")


def test_gpu_preset_packs_and_mixes_unless_the_prefill_shapes_are_given():
    from serving.engine.config import EngineConfig

    preset = EngineConfig().buckets("gpu")
    assert preset.prefill_tokens == (128,) and preset.packed_prefill == (128, 256, 512, 1024, 2048, 4096, 8192)
    assert preset.mixed_decode == (64,) and preset.prefill_budget == 8192
    # Explicit token buckets keep their unpacked [rows, length] steps; explicit packed ones stay unmixed.
    plain = EngineConfig(prefill_token_buckets=(128, 512, 2048)).buckets("gpu")
    assert plain.packed_prefill == () and plain.mixed_decode == ()
    assert EngineConfig(prefill_token_buckets=(256,)).buckets("gpu").packed_prefill == ()
    packed = EngineConfig(prefill_token_buckets=(128,), packed_prefill_buckets=(128, 256)).buckets("gpu")
    assert packed.mixed_decode == ()
    # A smaller prefill budget trims the packed buckets; one below the row length leaves rows of that many tokens.
    assert EngineConfig(max_prefill_token_num=2048).buckets("gpu").packed_prefill[-1] == 2048
    small = EngineConfig(max_prefill_token_num=100).buckets("gpu")
    assert small.prefill_tokens == (100,) and small.packed_prefill == () and small.mixed_decode == ()
    assert EngineConfig().buckets("cpu").packed_prefill == ()  # CPU: mixed steps were slower there
