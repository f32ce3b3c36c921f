"""Tensor parallelism is a mesh change: tp=2 on two emulated CPU devices gives tp=1's tokens, no step
gathers the KV cache across devices, and each step's collectives are exactly Megatron's (read from its HLO)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, TINY_ENGINE_OPTIONS

# Every case in one process with two CPU devices (a process start costs seconds of imports): each case's
# tokens at tp=1 and tp=2, or the error that stopped it.
SCRIPT = textwrap.dedent(
    """
    import collections, json, re, sys, traceback
    import jax
    from serving import GenerationConfig, pipeline
    from serving.engine.runner import _packed

    assert len(jax.devices()) == 2
    prompts = [[5, 17, 300, 41, 9], list(range(100, 140)), [7] * 70]
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    COLLECTIVE = r"= \\S+ (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\\("

    def check_programs(pipe, tp):
        runner = pipe.engine.runner
        cache_k = jax.tree.leaves(runner.cache[0][0])[0]  # the pool's values, plain or quantized
        assert all(len(leaf.sharding.device_set) == tp for leaf in jax.tree.leaves(runner.cache))
        # Each device attends over its own heads' pages: no step gathers a whole page pool.
        pool = "[" + ",".join(map(str, cache_k.shape)) + "]"
        for shape in runner.buckets.shapes():  # the programs the engine compiled and ran
            rows, tokens = shape.rows, shape.tokens
            hlo = runner._step.compiled((rows, tokens, _packed(*shape), shape.decode)).as_text()
            gathers = [line for line in hlo.splitlines() if "all-gather(" in line and pool in line]
            assert not gathers, gathers[0]
            # Megatron's plan and nothing more: one all-reduce after attention's output projection and
            # one after the MLP's down projection in each layer, one all-gather of the vocab-sharded logits.
            collectives = collections.Counter(re.findall(COLLECTIVE, hlo))
            layers = pipe.engine.model_config.num_layers
            want = {"all-reduce": 2 * layers, "all-gather": 1} if tp == 2 else {}
            if not pipe.engine.engine_config.weight_quant:  # CPU's blocked int8 loop gathers w_gate_up
                assert collectives == want, (tp, rows, tokens, collectives)

    def run(options):
        outputs = {}
        for tp in (1, 2):
            with pipeline(sys.argv[1], tp=tp, **options) as pipe:
                outputs[tp] = [r.token_ids for r in pipe(prompts, config)]
                check_programs(pipe, tp)
        return outputs

    results = {}
    for case, options in json.loads(sys.argv[2]).items():
        try:
            results[case] = {"outputs": run(options)}
        except Exception:
            results[case] = {"error": traceback.format_exc()}
    print(json.dumps(results))
    """
)


# pallas-interpret: our kernels' code path, where XLA cannot partition the kernel calls itself. With int4 KV
# pages (values and scales split by KV head) and int8 weights (scales split with their output channels).
# cpu: the native decode kernel inside shard_map (each device attends its own KV heads).
CASES = {"cpu": dict(attention_backend="cpu"), "pallas-interpret": dict(attention_backend="pallas-interpret"),
         "xla-int4-kv-int8-weights": dict(attention_backend="xla", quant_policy="4", weight_quant="int8")}


@pytest.fixture(scope="module")
def tp_results(tiny_llama) -> dict[str, dict]:
    """Each case's tokens at tp=1 and tp=2 (or its error), from one process with two devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    options = {case: dict(TINY_ENGINE_OPTIONS, preset="test", decode_batch_buckets=(4,), prefill_row_buckets=(2,),
                          prefill_token_buckets=(64,), **backend) for case, backend in CASES.items()}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama), json.dumps(options)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_tp2_matches_tp1_token_for_token(tp_results, case):
    result = tp_results[case]
    assert "error" not in result, result.get("error")
    outputs = result["outputs"]
    assert outputs["1"] == outputs["2"]
    assert all(len(tokens) == 10 for tokens in outputs["2"])


FUSED_SCRIPT = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from model.sharding import make_mesh
    from model.weight_quant import InputsLastWeight, linear, quantize_weight

    mesh = make_mesh(2)
    axis = mesh.axis_names[-1]
    # specs of the stored values, inputs last: w_gate_up [2, F, E] split F, w_down [E, F] split F (its inputs)
    for shape, spec, scale_spec in (((64, 2, 96), P(None, axis, None), P(None, axis)),  # w_gate_up
                                    ((96, 64), P(None, axis), P(None))):  # w_down: split inputs
        values, scale = quantize_weight(jax.random.normal(jax.random.key(0), shape), "int8", 1)
        weight = InputsLastWeight(jax.device_put(values, NamedSharding(mesh, spec)),
                                 jax.device_put(scale, NamedSharding(mesh, scale_spec)))
        x = jnp.ones((4, shape[0]), jnp.bfloat16)
        hlo = jax.jit(lambda x, w: linear(x, w, strategy="fused")).lower(x, weight).compile().as_text()
        gathered = [line for line in hlo.splitlines() if re.search(r"= \\S+ all-gather(-start)?\\(", line)]
        assert not gathered, (shape, gathered[0])
    print("ok")
    """
)


def test_quantized_weights_stay_split_under_tensor_parallelism_on_the_gpu_path():
    """The fused int8 matmul (the accelerators' path) of a column-split w_gate_up and a row-split w_down
    gathers no weight across devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", FUSED_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


SCALED_ROPE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding
    from model.sharding import QKV_AXES, logical_to_spec, make_mesh, pool_spec, shard_rope_write
    from xlkernels.rope_kv import rope_write_reference

    mesh = make_mesh(2)
    rng = np.random.default_rng(0)
    hkv, width, d, pages, page_size = 2, 4, 8, 5, 4
    sums = jnp.asarray(rng.standard_normal((1, 1, hkv, width, d)), jnp.float32)
    qkv_scale = jnp.asarray(rng.uniform(0.5, 2, (hkv, width, d)), jnp.float32)
    pools = [jnp.asarray(rng.standard_normal((hkv, pages, page_size, d)), jnp.bfloat16) for _ in "kv"]
    angles = rng.uniform(0, 10, (1, 1, 1, d // 2))
    rest = (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))
    steps = (jnp.asarray([[1, 2]], jnp.int32), jnp.asarray([[5]], jnp.int32), jnp.ones((1, 1), bool))
    want = rope_write_reference(sums, *rest, *pools, *steps, dtype=jnp.bfloat16, qkv_scale=qkv_scale)
    put = lambda a, axes: jax.device_put(a, NamedSharding(mesh, logical_to_spec(axes)))
    split = (put(sums, QKV_AXES), *rest, *(jax.device_put(p, NamedSharding(mesh, pool_spec(p))) for p in pools),
             *steps)
    sharded = jax.jit(lambda *a, s: shard_rope_write(rope_write_reference, mesh)(*a, dtype=jnp.bfloat16,
                                                                                   qkv_scale=s))
    got = sharded(*split, s=put(qkv_scale, QKV_AXES[2:]))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    print("ok")
    """
)


def test_a_quantized_products_unscaled_qkv_is_scaled_per_device_by_kv_head():
    """Under tensor parallelism the rope kernel's per-device run (`shard_rope_write`) takes the qkv weight's
    scale split by KV head with the sums (`weight_quant.Scaled`): the same q and pages as one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCALED_ROPE_SCRIPT], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
