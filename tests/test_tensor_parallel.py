"""Tensor parallelism is a mesh change: tp=2 on two emulated CPU devices gives tp=1's tokens, no step
gathers the KV cache across devices, and each step's collectives are exactly Megatron's (read from its HLO)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, TINY_ENGINE_OPTIONS

SCRIPT = textwrap.dedent(
    """
    import collections, json, re, sys
    import jax
    from serving import GenerationConfig, pipeline

    assert len(jax.devices()) == 2
    prompts = [[5, 17, 300, 41, 9], list(range(100, 140)), [7] * 70]
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    outputs = {}
    for tp in (1, 2):
        with pipeline(sys.argv[1], tp=tp, **json.loads(sys.argv[2])) as pipe:
            runner = pipe.engine.runner
            cache_k = jax.tree.leaves(runner.cache[0][0])[0]  # the pool's values, plain or quantized
            assert all(len(leaf.sharding.device_set) == tp for leaf in jax.tree.leaves(runner.cache))
            outputs[tp] = [r.token_ids for r in pipe(prompts, config)]
            # Each device attends over its own heads' pages: no step gathers a whole page pool.
            pool = "[" + ",".join(map(str, cache_k.shape)) + "]"
            for rows, tokens, _ in runner.buckets.shapes():
                inputs = runner._inputs([], rows, tokens)[:2]
                hlo = runner._step.lower(runner.params, runner.cache, runner.seen, runner.last_tokens,
                                         *inputs).compile().as_text()
                gathers = [line for line in hlo.splitlines() if "all-gather(" in line and pool in line]
                assert not gathers, gathers[0]
                # Megatron's plan and nothing more: one all-reduce after attention's output projection and
                # one after the MLP's down projection in each layer, one all-gather of the vocab-sharded logits.
                collectives = collections.Counter(re.findall(
                    r"= \\S+ (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\\(", hlo))
                layers = pipe.engine.model_config.num_layers
                want = {"all-reduce": 2 * layers, "all-gather": 1} if tp == 2 else {}
                assert collectives == want, (tp, rows, tokens, collectives)
    print(json.dumps(outputs))
    """
)


# pallas-interpret: our kernels' code path, where XLA cannot partition the kernel calls itself. With int4 KV
# pages (values and scales split by KV head) and int8 weights (scales split with their output channels).
@pytest.mark.parametrize("backend, quantized", [("xla", {}), ("pallas-interpret", {}),
                                                ("xla", {"quant_policy": "4", "weight_quant": "int8"})],
                         ids=["xla", "pallas-interpret", "xla-int4-kv-int8-weights"])
def test_tp2_matches_tp1_token_for_token(tiny_llama, backend, quantized):
    import json

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    options = dict(TINY_ENGINE_OPTIONS, preset="test", decode_batch_buckets=(4,), prefill_row_buckets=(1, 2),
                   prefill_token_buckets=(64,), attention_backend=backend, **quantized)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama), json.dumps(options)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["1"] == outputs["2"]
    assert all(len(tokens) == 10 for tokens in outputs["2"])
