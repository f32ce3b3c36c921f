"""config.json -> ModelConfig, and RoPE frequencies against transformers' own implementation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import LlamaConfig, MistralConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model.config import ModelConfig, merge_eos_token_ids
from model.rope import RopeConfig, attention_scaling, inv_frequencies, require_supported
from tests.checkpoints import ROPE_STYLES, rewrite_rope_format

MAX_POSITIONS = 131072
ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "rope_theta": 1e6,
    },
    "yarn_betas_attention_factor": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.3,
        "rope_theta": 10000.0,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "rope_theta": 10000.0,
    },
    "yarn_untruncated": {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
        "rope_theta": 150000.0,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


def hf_config(rope: dict, head_dim: int = 128, **overrides) -> LlamaConfig:
    options = dict(
        vocab_size=1000,
        hidden_size=32 * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters=dict(rope),
    )
    return LlamaConfig(**(options | overrides))


# ----- RoPE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_every_rope_style_parses_to_the_same_rope_config(case, tmp_path):
    hf_config(ROPE_CASES[case]).save_pretrained(tmp_path / "saved")
    parsed = {}
    for style in ROPE_STYLES:
        directory = tmp_path / style
        shutil.copytree(tmp_path / "saved", directory)
        rewrite_rope_format(directory, style)
        parsed[style] = ModelConfig.from_pretrained(directory).rope
        # transformers reads the rewritten file as the same RoPE, so the styles really are equivalent
        reread = {
            k: v for k, v in LlamaConfig.from_pretrained(directory).rope_parameters.items() if k != "type"
        }
        assert reread == ROPE_CASES[case] | {"rope_type": ROPE_CASES[case]["rope_type"]}
    assert len(set(parsed.values())) == 1, parsed
    assert parsed["rope_parameters"].rope_type == ROPE_CASES[case]["rope_type"]


def test_published_llama31_and_llama2_rope_forms():
    llama31 = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    assert parse(**llama31).rope == RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert parse(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}).rope == RopeConfig(
        10000.0, "linear", factor=2.0
    )
    assert parse(rope_theta=10000.0, rope_scaling=None).rope == RopeConfig(10000.0, "default")
    assert parse().rope == RopeConfig(10000.0, "default")  # transformers' default theta


def test_yarn_fills_what_transformers_derives():
    rope = parse(
        rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    ).rope
    assert rope.factor == 4096 * 4 / 4096  # max_position_embeddings / original
    assert (
        parse(rope_scaling={"rope_type": "yarn", "factor": 2.0}).rope.original_max_position_embeddings
        == 16384
    )


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", sorted(set(ROPE_CASES) - {"dynamic"}))
def test_inv_frequencies_and_scaling_match_transformers(case, head_dim):
    config = hf_config(ROPE_CASES[case], head_dim=head_dim)
    reference = LlamaRotaryEmbedding(config)
    rope = ModelConfig.from_hf_dict(config.to_dict()).rope
    ours = inv_frequencies(rope, head_dim)
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    # transformers computes in float32, we in float64 rounded once: a few ulps apart at most
    np.testing.assert_allclose(ours, reference.inv_freq.numpy(), rtol=5e-7, atol=0)
    assert attention_scaling(rope) == pytest.approx(reference.attention_scaling, rel=1e-12)


def test_dynamic_rope_parses_but_is_refused_for_running():
    rope = parse(rope_scaling={"rope_type": "dynamic", "factor": 2.0}).rope
    assert rope == RopeConfig(10000.0, "dynamic", factor=2.0)
    with pytest.raises(ValueError, match="'dynamic' is not supported yet"):
        require_supported(rope)
    with pytest.raises(ValueError, match="'dynamic' is not supported yet"):
        inv_frequencies(rope, 64)


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        ({"rope_type": "longrope", "factor": 2.0}, "unsupported RoPE type 'longrope'"),
        ({"rope_type": "linear"}, "linear RoPE scaling needs 'factor'"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "needs 'high_freq_factor'"),
        ({"rope_type": "linear", "factor": "two"}, "factor must be a number"),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ],
)
def test_bad_rope_settings_are_refused(rope_scaling, message):
    with pytest.raises(ValueError, match=message):
        parse(rope_scaling=rope_scaling)


# ----- the rest of config.json -----------------------------------------------------------------------------


def llama_dict(**overrides) -> dict:
    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    return base | overrides


def parse(generation: dict | None = None, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict(llama_dict(**overrides), generation)


def test_fields_from_a_transformers_5_config(tmp_path):
    hf = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=False, bos_token_id=5, eos_token_id=6, dtype="bfloat16",
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    config = ModelConfig.from_pretrained(tmp_path)
    assert config == ModelConfig(
        family="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
        num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope=RopeConfig(10000.0, "default"), tie_word_embeddings=True, attention_bias=True, mlp_bias=False,
        torch_dtype="bfloat16", bos_token_id=5, eos_token_ids=(6,), hidden_act="silu", generation_defaults=(),
    )  # fmt: skip
    assert config.q_per_kv == 4
    assert hash(config) == hash(ModelConfig.from_pretrained(tmp_path))  # usable as a static jit argument


def test_head_dim_from_config_or_derived():
    assert parse().head_dim == 32
    assert parse(head_dim=64).head_dim == 64  # e.g. Mistral-Nemo: heads * head_dim != hidden_size
    assert parse(head_dim=None).head_dim == 32
    assert parse(num_key_value_heads=None).num_kv_heads == 8


def test_dtype_key_old_and_new():
    assert parse().torch_dtype == "bfloat16"
    assert parse(dtype=None, torch_dtype="float16").torch_dtype == "float16"
    assert parse(dtype=None).torch_dtype == "float32"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        parse(dtype="int8")


@pytest.mark.parametrize(
    "config_eos, generation_eos, expected",
    [
        (2, None, (2,)),
        (2, [2, 128009], (2, 128009)),
        ([128001, 128008], 128009, (128001, 128008, 128009)),
        (None, [7, 7], (7,)),
        (None, None, ()),
    ],
)
def test_eos_ids_are_merged(config_eos, generation_eos, expected):
    generation = {"eos_token_id": generation_eos}
    assert parse(generation, eos_token_id=config_eos).eos_token_ids == expected
    assert merge_eos_token_ids({"eos_token_id": config_eos}, generation) == expected


def test_generation_defaults_and_eos_from_generation_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama_dict()))
    generation = {"eos_token_id": [2, 9], "temperature": 0.6, "top_p": 0.9, "top_k": 40, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.eos_token_ids == (2, 9)
    assert config.generation_defaults == (("temperature", 0.6), ("top_p", 0.9), ("top_k", 40))
    assert isinstance(dict(config.generation_defaults)["top_k"], int)
    assert parse({"repetition_penalty": 1, "temperature": None}).generation_defaults == (
        ("repetition_penalty", 1.0),
    )
    with pytest.raises(ValueError, match="top_k must be a int"):
        parse({"top_k": 0.5})


def test_mistral_is_llama_shaped():
    mistral = MistralConfig(vocab_size=1000, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                            sliding_window=None).to_dict()  # fmt: skip
    config = ModelConfig.from_hf_dict(mistral)
    assert (config.family, config.num_kv_heads, config.head_dim) == ("llama", 2, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"architectures": ["Qwen2ForCausalLM"]}, "unsupported architecture Qwen2ForCausalLM"),
        ({"architectures": None, "model_type": "gpt2"}, "model_type='gpt2'"),
        ({"vocab_size": None, "hidden_size": None}, "missing required fields: vocab_size, hidden_size"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, r"multiple of num_key_value_heads \(3\)"),
        ({"hidden_size": 250, "head_dim": None}, "not divisible by num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_layers must be a positive integer"),
        ({"vocab_size": "1000"}, "vocab_size must be a positive integer"),
        ({"sliding_window": 4096}, "sliding-window attention"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id must be a token id"),
    ],
)
def test_invalid_configs_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse(**overrides)


def test_from_pretrained_needs_a_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(Path(tmp_path))
