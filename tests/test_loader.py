"""safetensors -> fused parameter pytree: every block against transformers' own tensors, and placement."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.llama import AttentionBatch, CausalLM
from model.loader import init_random_params, load_params, param_shapes, param_shardings, param_spec, param_specs
from model.sharding import make_mesh
from model.weight_quant import stored_inputs_last, stored_shape
from tests.checkpoints import FAMILIES, llama_checkpoint_fixture, make_checkpoint

REPO = Path(__file__).resolve().parents[1]

# GQA with 2 query heads per KV head, all biases on: every fused block and its bias is exercised.
biased = llama_checkpoint_fixture(attention_bias=True, mlp_bias=True)
biased_sharded = llama_checkpoint_fixture(attention_bias=True, mlp_bias=True, shard_size="20KB")
tied_bf16 = llama_checkpoint_fixture(tie_word_embeddings=True, torch_dtype="bfloat16", num_kv_heads=1)


def hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as transformers' safetensors reader sees it, in float32."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update({name: value.float().numpy() for name, value in load_file(file).items()})
    return tensors


def flat_paths(tree) -> dict[str, jax.Array]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(entry.key for entry in path): leaf for path, leaf in leaves}


def declared_layout(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """The flat parameters in their declared shapes: the matmul weights stored inputs-last (every one on
    CPU, model/weight_quant.py) turned back to [*in, *out]."""
    flat = {path: np.asarray(leaf) for path, leaf in flat_paths(params).items()}
    for spec in param_specs(config):
        if spec.in_dims and stored_inputs_last(spec.quant):
            values = flat[spec.path]
            outs = values.ndim - spec.in_dims
            flat[spec.path] = np.transpose(values, (*range(outs, values.ndim), *range(outs)))
    return flat


def stored_spec(name: str, config: ModelConfig) -> P:
    """EXPECTED_SPECS' entry for parameter `name` in the layout it is stored in (inputs-last on CPU)."""
    spec = EXPECTED_SPECS[name.split("/", 1)[1] if name.startswith("layers_") else name]
    in_dims = param_spec(config, name).in_dims
    return P(*stored_shape(tuple(spec), in_dims)) if in_dims and stored_inputs_last(None) else spec


def assert_matches_hf(params, hf: dict[str, np.ndarray], config: ModelConfig) -> None:
    """Check each fused block slice by slice against the HF tensor it came from."""
    G, D = config.q_per_kv, config.head_dim
    value = {path: leaf.astype(np.float32) for path, leaf in declared_layout(params, config).items()}
    np.testing.assert_array_equal(value["embed/embedding"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(value["final_norm/scale"], hf["model.norm.weight"])
    if config.tie_word_embeddings:
        assert "lm_head/kernel" not in value
    else:
        np.testing.assert_array_equal(value["lm_head/kernel"], hf["lm_head.weight"].T)
    for i in range(config.num_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        attn, mlp = f"{theirs}.self_attn", f"{theirs}.mlp"
        np.testing.assert_array_equal(
            value[f"{ours}/attn_norm/scale"], hf[f"{theirs}.input_layernorm.weight"]
        )
        np.testing.assert_array_equal(
            value[f"{ours}/mlp_norm/scale"], hf[f"{theirs}.post_attention_layernorm.weight"]
        )
        wqkv, wo = value[f"{ours}/attn/wqkv"], value[f"{ours}/attn/wo"]
        for k in range(config.num_kv_heads):
            rows = slice(k * D, (k + 1) * D)
            for g in range(G):
                h = k * G + g  # HF's GQA order: query head h uses KV head h // G
                np.testing.assert_array_equal(
                    wqkv[:, k, g], hf[f"{attn}.q_proj.weight"][h * D : (h + 1) * D].T
                )
            np.testing.assert_array_equal(wqkv[:, k, G], hf[f"{attn}.k_proj.weight"][rows].T)
            np.testing.assert_array_equal(wqkv[:, k, G + 1], hf[f"{attn}.v_proj.weight"][rows].T)
            if config.attention_bias:
                bqkv = value[f"{ours}/attn/bqkv"]
                np.testing.assert_array_equal(
                    bqkv[k, :G].ravel(), hf[f"{attn}.q_proj.bias"][k * G * D : (k + 1) * G * D]
                )
                np.testing.assert_array_equal(bqkv[k, G], hf[f"{attn}.k_proj.bias"][rows])
                np.testing.assert_array_equal(bqkv[k, G + 1], hf[f"{attn}.v_proj.bias"][rows])
        for h in range(config.num_heads):
            np.testing.assert_array_equal(wo[h], hf[f"{attn}.o_proj.weight"][:, h * D : (h + 1) * D].T)
        w_gate_up = value[f"{ours}/mlp/w_gate_up"]
        np.testing.assert_array_equal(w_gate_up[:, 0], hf[f"{mlp}.gate_proj.weight"].T)
        np.testing.assert_array_equal(w_gate_up[:, 1], hf[f"{mlp}.up_proj.weight"].T)
        np.testing.assert_array_equal(value[f"{ours}/mlp/w_down"], hf[f"{mlp}.down_proj.weight"].T)
        if config.attention_bias:
            np.testing.assert_array_equal(value[f"{ours}/attn/bo"], hf[f"{attn}.o_proj.bias"])
        if config.mlp_bias:
            np.testing.assert_array_equal(value[f"{ours}/mlp/b_gate_up"][0], hf[f"{mlp}.gate_proj.bias"])
            np.testing.assert_array_equal(value[f"{ours}/mlp/b_gate_up"][1], hf[f"{mlp}.up_proj.bias"])
            np.testing.assert_array_equal(value[f"{ours}/mlp/b_down"], hf[f"{mlp}.down_proj.bias"])


def test_fused_blocks_match_the_hf_tensors(biased):
    config = ModelConfig.from_pretrained(biased)
    params = load_params(biased, config, jnp.float32)
    E, F, V, D, Hq, Hkv = 64, 96, 128, 16, 4, 2
    assert params["layers_0"]["mlp"]["w_down"].shape == (E, F), "on CPU, matmul weights are stored inputs-last"
    shapes = {path: leaf.shape for path, leaf in declared_layout(params, config).items()}
    assert shapes == {
        "embed/embedding": (V, E),
        "final_norm/scale": (E,),
        "lm_head/kernel": (E, V),
        **{
            f"layers_{i}/{name}": shape
            for i in range(2)
            for name, shape in {
                "attn_norm/scale": (E,),
                "attn/wqkv": (E, Hkv, Hq // Hkv + 2, D),
                "attn/bqkv": (Hkv, Hq // Hkv + 2, D),
                "attn/wo": (Hq, D, E),
                "attn/bo": (E,),
                "mlp_norm/scale": (E,),
                "mlp/w_gate_up": (E, 2, F),
                "mlp/b_gate_up": (2, F),
                "mlp/w_down": (F, E),
                "mlp/b_down": (E,),
            }.items()
        },
    }
    assert_matches_hf(params, hf_tensors(biased), config)
    assert {leaf.dtype for leaf in flat_paths(params).values()} == {jnp.dtype(jnp.float32)}
    assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), param_shapes(config)) == jax.tree.map(
        lambda leaf: (leaf.shape, leaf.dtype), params
    )


def test_fused_projections_compute_what_hf_computes(biased):
    """x @ wqkv + bqkv gives HF's q/k/v projections: the fused layout is the same linear map."""
    config = ModelConfig.from_pretrained(biased)
    params = declared_layout(load_params(biased, config, jnp.float32), config)
    hf = hf_tensors(biased)
    x = np.random.default_rng(0).standard_normal((3, config.hidden_size)).astype(np.float32)
    qkv = np.einsum("te,ekgd->tkgd", x, params["layers_1/attn/wqkv"]) + params["layers_1/attn/bqkv"]
    G, prefix = config.q_per_kv, "model.layers.1.self_attn"
    for part, heads in (("q", qkv[:, :, :G]), ("k", qkv[:, :, G]), ("v", qkv[:, :, G + 1])):
        expected = x @ hf[f"{prefix}.{part}_proj.weight"].T + hf[f"{prefix}.{part}_proj.bias"]
        np.testing.assert_allclose(heads.reshape(3, -1), expected, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_loads_the_same_as_one_file(biased, biased_sharded):
    assert (biased_sharded / "model.safetensors.index.json").is_file()
    assert len(list(biased_sharded.glob("model-*-of-*.safetensors"))) > 2
    config = ModelConfig.from_pretrained(biased_sharded)
    single = flat_paths(load_params(biased, config, jnp.float32))
    sharded = flat_paths(load_params(biased_sharded, config, jnp.float32))
    assert single.keys() == sharded.keys()
    for path in single:
        np.testing.assert_array_equal(single[path], sharded[path], err_msg=path)


def test_tied_bf16_checkpoint(tied_bf16):
    config = ModelConfig.from_pretrained(tied_bf16)
    assert config.tie_word_embeddings and config.torch_dtype == "bfloat16" and config.num_kv_heads == 1
    hf = hf_tensors(tied_bf16)
    assert "lm_head.weight" not in hf
    params = load_params(tied_bf16, config, "bfloat16")
    assert "lm_head" not in params
    assert {leaf.dtype for leaf in flat_paths(params).values()} == {jnp.dtype(jnp.bfloat16)}
    assert_matches_hf(params, hf, config)  # bit-exact: bf16 in, bf16 out
    widened = load_params(tied_bf16, config, jnp.float32)  # cast on the device, exactly
    assert_matches_hf(widened, hf, config)


def test_float16_target_dtype(biased):
    config = ModelConfig.from_pretrained(biased)
    params = load_params(biased, config, jnp.float16)
    expected = hf_tensors(biased)["model.layers.0.mlp.down_proj.weight"].T.astype(np.float16)
    np.testing.assert_array_equal(declared_layout(params, config)["layers_0/mlp/w_down"], expected)


def copy_with_tensors(source: Path, destination: Path, change) -> Path:
    """A copy of a one-file checkpoint whose tensors went through `change(dict) -> dict`."""
    shutil.copytree(source, destination)
    file = destination / "model.safetensors"
    save_file(change(load_file(file)), file, metadata={"format": "pt"})
    return destination


def test_missing_and_unexpected_tensors_are_listed(biased, tmp_path):
    config = ModelConfig.from_pretrained(biased)

    def drop_and_add(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
        tensors["model.layers.0.self_attn.q_norm.weight"] = tensors[
            "model.layers.0.input_layernorm.weight"
        ].clone()
        return tensors

    broken = copy_with_tensors(biased, tmp_path / "broken", drop_and_add)
    with pytest.raises(ValueError) as error:
        load_params(broken, config, jnp.float32)
    message = str(error.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight, model.norm.weight" in message
    assert "unexpected tensors: model.layers.0.self_attn.q_norm.weight" in message


def test_stale_rotary_buffers_are_ignored(biased, tmp_path):
    config = ModelConfig.from_pretrained(biased)

    def add_inv_freq(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = tensors["model.norm.weight"][:8].clone()
        return tensors

    old_style = copy_with_tensors(biased, tmp_path / "old", add_inv_freq)
    assert_matches_hf(load_params(old_style, config, jnp.float32), hf_tensors(biased), config)


def test_checkpoint_that_disagrees_with_its_config_is_refused(biased):
    config = ModelConfig.from_pretrained(biased)
    wider = dataclasses.replace(config, intermediate_size=128)
    with pytest.raises(
        ValueError, match=r"gate_proj.weight has shape \[96, 64\], the model config implies \[128, 64\]"
    ):
        load_params(biased, wider, jnp.float32)
    no_bias = dataclasses.replace(config, mlp_bias=False)
    with pytest.raises(ValueError, match="unexpected tensors: .*mlp.down_proj.bias"):
        load_params(biased, no_bias, jnp.float32)


def test_no_weights_and_wrong_dtype_fail_before_reading(tmp_path, biased):
    config = ModelConfig.from_pretrained(biased)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_params(tmp_path, config, jnp.float32)
    with pytest.raises(ValueError, match="floating dtype"):
        load_params(biased, config, jnp.int8)


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_random_params_have_the_loaded_layout(biased):
    config = ModelConfig.from_pretrained(biased)
    loaded = load_params(biased, config, jnp.bfloat16)
    random = init_random_params(config, jnp.bfloat16, seed=0)
    layout = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype, leaf.sharding), tree)  # noqa: E731
    assert layout(random) == layout(loaded)
    assert np.all(np.asarray(random["layers_0"]["attn_norm"]["scale"], np.float32) == 1)
    again = init_random_params(config, jnp.bfloat16, seed=0)
    np.testing.assert_array_equal(random["layers_1"]["attn"]["wqkv"], again["layers_1"]["attn"]["wqkv"])
    other = init_random_params(config, jnp.bfloat16, seed=1)
    assert not np.array_equal(random["layers_1"]["attn"]["wqkv"], other["layers_1"]["attn"]["wqkv"])


def test_internlm2_packed_layout_loads_to_its_llama_origin(tmp_path):
    """InternLM2's names and packed `wqkv` (biased) land on the very arrays its Llama origin gives."""
    internlm2 = make_checkpoint(tmp_path, "internlm2", num_heads=4, num_kv_heads=2, attention_bias=True)
    config = ModelConfig.from_pretrained(internlm2)
    llama_config = ModelConfig.from_pretrained(internlm2 / "llama-oracle")
    assert dataclasses.replace(config, family="llama") == llama_config
    ours, oracle = load_params(internlm2, config, jnp.float32), load_params(internlm2 / "llama-oracle",
                                                                          llama_config, jnp.float32)
    assert jax.tree.structure(ours) == jax.tree.structure(oracle)
    jax.tree.map(np.testing.assert_array_equal, ours, oracle)


def test_qwen3_head_norms_are_loaded_and_sharded(tmp_path):
    qwen3 = make_checkpoint(tmp_path, "qwen3", head_dim=32)
    config = ModelConfig.from_pretrained(qwen3)
    params = load_params(qwen3, config, jnp.float32)
    hf = hf_tensors(qwen3)
    np.testing.assert_array_equal(params["layers_1"]["attn"]["k_norm"]["scale"],
                                  hf["model.layers.1.self_attn.k_norm.weight"])
    assert "bo" not in params["layers_0"]["attn"] and "bqkv" not in params["layers_0"]["attn"]
    shardings = flat_paths(param_shardings(config, make_mesh(1)))
    assert shardings["layers_0/attn/q_norm/scale"].spec == P(None)


# ----- the declaration -----------------------------------------------------------------------------------


def family_config(family: str, tied: bool, biased: bool) -> ModelConfig:
    """A tiny config of `family` as its config.json would be read; Hq * D != E, so a swapped dimension shows."""
    return ModelConfig.from_hf_dict({
        "model_type": family, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 64, "tie_word_embeddings": tied, "attention_bias": biased, "bias": biased,
        "mlp_bias": biased,
    })


@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flax_model_asks_for_exactly_the_declared_parameters(family, tied, biased):
    """The Flax decoder's own `init` (traced, never run) builds the declared pytree, path for path and
    shape for shape, and each declaration's fuse turns its checkpoint views into its declared shape."""
    config = family_config(family, tied, biased)
    assert config.qk_norm == (family == "qwen3")
    assert config.attention_bias == (biased or family == "qwen2")
    assert config.tie_word_embeddings == tied
    num_pages, page_size = 4, 4
    pages = jax.ShapeDtypeStruct((config.num_kv_heads, num_pages, page_size, config.head_dim), jnp.bfloat16)
    batch = AttentionBatch(positions=jnp.zeros((1, 3), jnp.int32), valid=jnp.ones((1, 3), bool),
                           kv_lens=jnp.full((1,), 3, jnp.int32), block_tables=jnp.zeros((1, num_pages), jnp.int32))
    model = CausalLM(config, dtype=jnp.bfloat16)
    flax_params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32), batch,
                                 [(pages, pages)] * config.num_layers)["params"]
    assert flax_params == param_shapes(config, jnp.bfloat16)
    for spec in param_specs(config):
        views = [jax.ShapeDtypeStruct(source.view, jnp.float32) for source in spec.sources]
        assert all(np.prod(source.view) == np.prod(source.shape) for source in spec.sources), spec.path
        assert jax.eval_shape(spec.fuse, *views).shape == spec.shape, spec.path
        assert len(spec.axes) == len(spec.shape), spec.path


# ----- sharding ------------------------------------------------------------------------------------------

EXPECTED_SPECS = {
    "embed/embedding": P(None, None),
    "attn_norm/scale": P(None),
    "attn/wqkv": P(None, "tp", None, None),
    "attn/bqkv": P("tp", None, None),
    "attn/wo": P("tp", None, None),
    "attn/bo": P(None),
    "mlp_norm/scale": P(None),
    "mlp/w_gate_up": P(None, None, "tp"),
    "mlp/b_gate_up": P(None, "tp"),
    "mlp/w_down": P("tp", None),
    "mlp/b_down": P(None),
    "attn/q_norm/scale": P(None),
    "attn/k_norm/scale": P(None),
    "final_norm/scale": P(None),
    "lm_head/kernel": P(None, "tp"),
}


def test_every_parameter_declares_its_logical_axes(biased):
    config = dataclasses.replace(ModelConfig.from_pretrained(biased), num_layers=18, qk_norm=True)
    assert param_spec(config, "layers_17/attn/wqkv").axes == ("embed", "kv_heads", None, "head_dim")
    assert param_spec(config, "lm_head/kernel").axes == ("embed", "vocab")
    declared = {spec.path.split("/", 1)[1] if spec.path.startswith("layers_") else spec.path
                for spec in param_specs(config)}
    assert len(declared) == len(EXPECTED_SPECS)
    with pytest.raises(ValueError, match="no parameter 'layers_0/attn/q_proj' is declared"):
        param_spec(config, "layers_0/attn/q_proj")


def test_param_shardings_on_one_device(biased):
    config = ModelConfig.from_pretrained(biased)
    shardings = flat_paths(param_shardings(config, make_mesh(1)))
    for path, sharding in shardings.items():
        assert sharding.spec == stored_spec(path, config)
    with pytest.raises(ValueError, match="tp=2 needs between 1 and 1 devices"):
        make_mesh(2)


# Runs in a fresh interpreter (the CPU device count is fixed when jax starts) and reports what it sees.
TWO_DEVICE_SCRIPT = """
import dataclasses, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from model.config import ModelConfig
from model.loader import init_random_params, load_params
from model.sharding import make_mesh

def flat(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(entry.key for entry in path): leaf for path, leaf in leaves}

path = sys.argv[1]
config = ModelConfig.from_pretrained(path)
mesh = make_mesh(2)
single = flat(load_params(path, config, "float32"))
sharded = flat(load_params(path, config, "float32", mesh))
randoms = flat(init_random_params(config, "float32", 0, mesh))
report = {"devices": jax.device_count(), "params": {}}
for name, leaf in sharded.items():
    report["params"][name] = {
        "shape": leaf.shape,
        "spec": list(leaf.sharding.spec),
        "random_spec": list(randoms[name].sharding.spec),
        "shards": sorted((shard.device.id, shard.data.shape) for shard in leaf.addressable_shards),
        "equal": bool(np.array_equal(np.asarray(leaf), np.asarray(single[name]))),
    }
try:
    init_random_params(dataclasses.replace(config, num_kv_heads=1), "float32", 0, mesh)
except ValueError as error:
    report["mqa_error"] = str(error)
print(json.dumps(report))
"""


def test_tensor_parallel_placement_on_two_cpu_devices(biased):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", TWO_DEVICE_SCRIPT, str(biased)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert len(report["params"]) == 3 + 10 * 2
    for name, seen in report["params"].items():
        spec = stored_spec(name, ModelConfig.from_pretrained(biased))
        assert seen["spec"] == list(spec) and seen["random_spec"] == list(spec), name
        split = [n // 2 if axis == "tp" else n for n, axis in zip(seen["shape"], spec, strict=True)]
        assert seen["shards"] == [[0, split], [1, split]], name  # each device holds exactly its half
        assert seen["equal"], name
    assert "num_key_value_heads (1) is not divisible by tp=2" in report["mqa_error"]
