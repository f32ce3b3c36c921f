"""config.json -> ModelConfig, and RoPE frequencies against transformers' own implementation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model.config import ModelConfig, merge_eos_token_ids
from model.rope import RopeConfig, attention_scaling, dynamic_inv_frequencies, inv_frequencies
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


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dynamic_ntk_frequencies_follow_the_sequence_length_as_transformers(head_dim):
    config = hf_config(ROPE_CASES["dynamic"], head_dim=head_dim, max_position_embeddings=4096)
    rope = ModelConfig.from_hf_dict(config.to_dict()).rope
    assert rope == RopeConfig(10000.0, "dynamic", factor=2.0, original_max_position_embeddings=4096)
    lengths = [1, 4095, 4096, 4097, 6000, 32768]
    ours = np.asarray(dynamic_inv_frequencies(rope, head_dim, np.asarray(lengths, np.int32)))
    for length, row in zip(lengths, ours, strict=True):
        # transformers' own rule, with the length as a tensor as its forward passes it
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(length))
        np.testing.assert_allclose(row, want.numpy(), rtol=2e-6, atol=0)
    # within the trained length the frequencies are the plain ones
    np.testing.assert_allclose(ours[2], inv_frequencies(rope, head_dim), rtol=2e-6)


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
        rope=RopeConfig(10000.0, "default"), tie_word_embeddings=True, attention_bias=True,
        attention_out_bias=True, mlp_bias=False,
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


def test_mistral_is_llama_shaped_and_its_window_caps_the_context():
    mistral = MistralConfig(vocab_size=1000, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                            sliding_window=None, max_position_embeddings=32768).to_dict()  # fmt: skip
    config = ModelConfig.from_hf_dict(mistral)
    assert (config.family, config.num_kv_heads, config.head_dim) == ("mistral", 2, 32)
    assert (config.max_position_embeddings, config.sliding_window) == (32768, None)
    # Mistral 7B v0.1 attends to its last 4096 tokens: full attention is the same model up to there
    v01 = ModelConfig.from_hf_dict({**mistral, "sliding_window": 4096})
    assert (v01.max_position_embeddings, v01.sliding_window) == (4096, 4096)
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": 65536}).sliding_window is None


def test_qwen2_and_qwen3_attention_options_and_windows():
    sizes = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768)  # fmt: skip
    qwen2 = ModelConfig.from_hf_dict(Qwen2Config(**sizes, tie_word_embeddings=True).to_dict())
    biases = (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.qk_norm)
    assert qwen2.family == "qwen2" and biases == (True, False, False)
    assert qwen2.tie_word_embeddings and qwen2.sliding_window is None
    qwen3 = ModelConfig.from_hf_dict(Qwen3Config(**sizes, head_dim=64).to_dict())
    assert (qwen3.family, qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == ("qwen3", False, True, 64)
    # Qwen2.5's published form: a window that use_sliding_window leaves off
    published = {**llama_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=28),
                 "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28}
    assert ModelConfig.from_hf_dict(published).sliding_window is None
    # switched on, it applies to the layers from max_window_layers on, in either spelling
    on = {**published, "sliding_window": 4096, "use_sliding_window": True}
    assert ModelConfig.from_hf_dict(on).sliding_window is None  # max_window_layers = all layers
    assert ModelConfig.from_hf_dict({**on, "max_window_layers": 20}).sliding_window == 4096
    hf = Qwen2Config(**sizes, use_sliding_window=True, sliding_window=1024, max_window_layers=2).to_dict()
    assert "sliding_attention" in hf["layer_types"]
    assert ModelConfig.from_hf_dict(hf).max_position_embeddings == 1024


def test_internlm2_config_as_published():
    # InternLM2.5-7B-chat's config.json, shortened: remote code named, never needed
    internlm2 = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "bias": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 92544,
    }  # fmt: skip
    config = ModelConfig.from_hf_dict(internlm2, {"eos_token_id": [2, 92542]})
    assert (config.family, config.q_per_kv, config.attention_bias, config.attention_out_bias) == (
        "internlm2", 4, False, False)
    assert config.rope == RopeConfig(1e6, "dynamic", factor=2.0, original_max_position_embeddings=32768)
    assert config.eos_token_ids == (2, 92542)
    assert ModelConfig.from_hf_dict({**internlm2, "bias": True}).attention_out_bias


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"architectures": ["Qwen3MoeForCausalLM"]}, "unsupported architecture Qwen3MoeForCausalLM"),
        ({"architectures": None, "model_type": "gpt2"}, "model_type='gpt2'"),
        ({"vocab_size": None, "hidden_size": None}, "missing required fields: vocab_size, hidden_size"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, r"multiple of num_key_value_heads \(3\)"),
        ({"hidden_size": 250, "head_dim": None}, "not divisible by num_attention_heads"),
        ({"num_hidden_layers": 0}, "num_layers must be a positive integer"),
        ({"vocab_size": "1000"}, "vocab_size must be a positive integer"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer"),
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
