"""The program store: a restarted engine loads its buckets' compiled programs instead of tracing them, gets
the same tokens, and never loads a program compiled for anything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from serving.engine.program_store import Programs, ProgramStore
from tests.conftest import REPO, TINY_ENGINE_OPTIONS

# Engine starts, one after another, in a fresh process (JAX reads its cache directory once a process): for
# each, how many programs the store loaded and saved, how often the runner's functions were traced and
# compiled, and the tokens.
SCRIPT = textwrap.dedent(
    """
    import collections, json, sys
    import jax
    from serving import GenerationConfig, pipeline

    RUNNER_FUNCTIONS = {"step", "sample_and_record", "sample_extended_and_record", "mask_logits", "advance"}
    events = collections.Counter(traced=0, compiled=0, cache_misses=0)

    def on_duration(event, duration, fun_name="", **_):
        name = fun_name.removeprefix("jit(").removesuffix(")")
        if event == "/jax/core/compile/jaxpr_trace_duration" and name in RUNNER_FUNCTIONS:
            events["traced"] += 1
        if event == "/jax/core/compile/backend_compile_duration" and name in RUNNER_FUNCTIONS:
            events["compiled"] += 1  # compiled, or read back from JAX's own cache

    def on_event(event, **_):  # JAX's persistent cache: a request not answered by a hit is a miss
        events["cache_misses"] += {"/jax/compilation_cache/compile_requests_use_cache": 1,
                                   "/jax/compilation_cache/cache_hits": -1}.get(event, 0)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    starts = []
    for options in json.loads(sys.argv[2]):
        for name in events:  # each start counts its own
            events[name] = 0
        with pipeline(sys.argv[1], **options) as pipe:
            runner = pipe.engine.runner
            tokens = [r.token_ids for r in pipe([[5, 17, 300, 41, 9], list(range(100, 140))], config)]
            starts.append({"loaded": runner.program_store.loaded, "saved": runner.program_store.saved,
                           "programs": runner.num_programs, "tokens": tokens, **events})
    print(json.dumps(starts))
    """
)


def start(checkpoint, cache_dir, *engines: dict) -> list[dict]:
    """One process (two CPU devices) starting each engine of `engines` (options beside the common ones) in turn."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    options = [dict(TINY_ENGINE_OPTIONS, decode_batch_buckets=(4,), prefill_row_buckets=(2,),
                    prefill_token_buckets=(64,), compilation_cache_dir=str(cache_dir), **engine) for engine in engines]
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint), json.dumps(options)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def restarts(tiny_llama, tmp_path_factory) -> dict[str, list[dict]]:
    """A tp=1 and a tp=2 engine started in one process, then both again in a second one, then in a third an
    engine of another KV page format, all over one directory (a process start costs seconds of imports)."""
    directory = tmp_path_factory.mktemp("program-store")
    first = start(tiny_llama, directory, {"tp": 1}, {"tp": 2})
    again = start(tiny_llama, directory, {"tp": 1}, {"tp": 2})
    (other,) = start(tiny_llama, directory, {"tp": 1, "quant_policy": "8"})
    return {"first": first, "again": again, "other": other}


@pytest.mark.parametrize("tp", [1, 2])
def test_a_restart_loads_every_program_without_tracing_and_gets_the_same_tokens(restarts, tp):
    first, again = restarts["first"][tp - 1], restarts["again"][tp - 1]
    assert first["loaded"] == 0 and first["saved"] >= first["programs"] > 0  # a unit may hold several
    assert first["traced"] >= first["saved"]
    assert again["loaded"] == first["saved"] and again["saved"] == 0
    assert first["compiled"] == first["saved"]
    # Not one step, sampler or guided program was traced or compiled; what else the engine compiles
    # (weights, the KV pool) came from JAX's cache.
    assert again["traced"] == again["compiled"] == again["cache_misses"] == 0, again
    assert again["tokens"] == first["tokens"]
    # A different engine (another KV page format) shares the directory and none of its programs. Those
    # it shares with the first engine in substance (its samplers) JAX's cache answers, and on CPU they are
    # not stored (test_a_program_from_jaxs_cache_is_not_stored_on_cpu); its steps are. (Once: tp plays no part.)
    if tp == 2:
        return
    other = restarts["other"]
    assert other["loaded"] == 0 and 0 < other["saved"] < first["saved"], other


# A program like the sampler's (Gumbel noise from a key's bits), compiled once a process through a store
# with the given description and JAX's cache in the given directory, then run.
NOISE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from serving.engine.program_store import Programs, ProgramStore

    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    def noisy_choice(logits, key):
        return jnp.argmax(logits + jax.random.gumbel(key, logits.shape), axis=-1)

    store = ProgramStore(sys.argv[1] + "/programs", sys.argv[2])
    programs = Programs(jax.jit(noisy_choice), "noisy_choice", store)
    programs.compile("k", jax.ShapeDtypeStruct((2, 4096), jnp.float32), jax.random.key(0))
    chosen = programs("k", jnp.zeros((2, 4096)), jax.random.key(7))
    print(json.dumps({"loaded": store.loaded, "saved": store.saved, "chosen": chosen.tolist()}))
    """
)


def test_a_program_from_jaxs_cache_is_not_stored_on_cpu(tmp_path):
    """XLA:CPU serializes an executable that JAX's cache answered without some of its kernels: stored and
    loaded by a later start, it failed ("Function slice_bitcast_fusion not found") where it drew the noise.
    Such a program is not stored; a later start compiles (from JAX's cache) and runs it."""
    def start(description: str) -> dict:
        result = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(tmp_path), description], cwd=REPO,
                                capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = start("A")  # compiled: stored, and written to JAX's cache
    assert (first["loaded"], first["saved"]) == (0, 1)
    other = start("B")  # another key (as after an edit of our source): JAX's cache answers
    assert (other["loaded"], other["saved"]) == (0, 0)
    for description in ("B", "A"):
        again = start(description)
        assert again["chosen"] == first["chosen"] and again["loaded"] == (description == "A")


def add(x: jax.Array, y: jax.Array) -> jax.Array:
    return x + y


def test_the_key_covers_the_description_shapes_and_static_arguments(tmp_path):
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    store = ProgramStore(str(tmp_path), "model A")
    Programs(jax.jit(add), "add", store).compile("k", x, x)
    assert store.saved == 1
    for other_store, shape in ((ProgramStore(str(tmp_path), "model B"), (4,)),  # another description
                               (ProgramStore(str(tmp_path), "model A"), (8,))):  # another shape
        y = jax.ShapeDtypeStruct(shape, jnp.float32)
        Programs(jax.jit(add), "add", other_store).compile("k", y, y)
        assert other_store.loaded == 0 and other_store.saved == 1
    same = ProgramStore(str(tmp_path), "model A")
    programs = Programs(jax.jit(add), "add", same)
    programs.compile("k", x, x)
    assert same.loaded == 1
    assert programs("k", jnp.ones(4), jnp.ones(4)).tolist() == [2.0] * 4


def test_compiler_options_reach_xla_and_the_key(tmp_path):
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    store = ProgramStore(str(tmp_path), "o")
    Programs(jax.jit(add), "add", store).compile("k", x, x)
    Programs(jax.jit(add), "add", store).compile("k", x, x, compiler_options={"xla_cpu_enable_fast_math": False})
    assert store.saved == 2 and store.loaded == 0  # two programs: the options are part of the key
    with pytest.raises(Exception, match="xla_no_such_option"):
        Programs(jax.jit(add), "add", store).compile("k", x, x, compiler_options={"xla_no_such_option": True})


def test_a_damaged_program_is_compiled_again_and_replaced(tmp_path):
    x = jax.ShapeDtypeStruct((3,), jnp.float32)
    Programs(jax.jit(add), "add", ProgramStore(str(tmp_path), "d")).compile("k", x, x)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a full disk
    store = ProgramStore(str(tmp_path), "d")
    programs = Programs(jax.jit(add), "add", store)
    programs.compile("k", x, x)
    assert store.loaded == 0 and store.saved == 1
    assert programs("k", jnp.ones(3), jnp.full(3, 2.0)).tolist() == [3.0] * 3
    again = ProgramStore(str(tmp_path), "d")
    Programs(jax.jit(add), "add", again).compile("k", x, x)
    assert again.loaded == 1


def test_a_key_never_compiled_goes_through_the_jitted_function():
    programs = Programs(jax.jit(add), "add", None)
    assert programs("never compiled", jnp.ones(2), jnp.ones(2)).tolist() == [2.0, 2.0]
