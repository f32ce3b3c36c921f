"""A checkpoint's `config.json` (and `generation_config.json`) as one frozen, hashable record.

`ModelConfig` is a static argument of every jitted model function, so it holds only immutable values.
Parsing is strict: a field the model would silently misread (an unknown architecture, activation or
RoPE type) is refused here with the field named, before any weight is read. Custom modelling code
(`auto_map`, `trust_remote_code`) is never imported or run: InternLM2 ships its modelling code with
the checkpoint, and is read here from its config.json fields alone.

Families differ only in options of the one decoder: which projections carry biases (Llama: all four
when `attention_bias`; Qwen2: q/k/v always, o never; InternLM2: all four when `bias`), per-head q/k
RMSNorm (Qwen3), and weight names (the loader's business).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.rope import RopeConfig, yarn_mscale

# A checkpoint's weights: one safetensors file, or an index naming the files of a sharded one.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",  # Llama-shaped; some versions attend through a sliding window
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "InternLM2ForCausalLM": "internlm2",
}
# The bare decoders (no LM head), as embedding models built on them are saved (e5-mistral's `MistralModel`): served
# with the input embedding as a stand-in head, for their embeddings (POST /v1/embeddings), not their text.
BARE_ARCHITECTURES = {"LlamaModel": "llama", "MistralModel": "mistral", "Qwen2Model": "qwen2", "Qwen3Model": "qwen3"}
# Old configs without `architectures` still carry `model_type`.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
FAMILIES = frozenset(ARCHITECTURES.values())
DTYPES = frozenset({"bfloat16", "float16", "float32"})
# How the layers' matmul weights may be stored (model/weight_quant.py): per-channel int8 or fp8, bfloat16 under
# float32 activations, or GGUF's blocks of 32 (the CPU's)
WEIGHT_FORMATS = ("int8", "fp8", "bf16", "q4_0", "q4_1", "q8_0")
# How the LM head may be stored besides the serving dtype: int8 with a scale per vocabulary row. Not fp8: e4m3's three
# mantissa bits cost SmolLM2-135M more perplexity in the head alone than in every layer (docs/perf-notes.md)
HEAD_FORMATS = ("int8",)
ACTIVATIONS = frozenset({"silu"})

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)
# transformers' LlamaConfig defaults for fields a config.json may leave out
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_ROPE_THETA = 10000.0
# transformers loads a checkpoint without a dtype entry in float32
DEFAULT_DTYPE = "float32"
# generation_config.json keys the server takes as its sampling defaults, with their types
GENERATION_DEFAULT_KEYS: tuple[tuple[str, type], ...] = (
    ("temperature", float),
    ("top_p", float),
    ("top_k", int),
    ("repetition_penalty", float),
)

Json = Mapping[str, Any]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shapes and options the decoder needs, plus the token ids and defaults the server needs."""

    family: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = DEFAULT_RMS_NORM_EPS
    max_position_embeddings: int
    rope: RopeConfig = RopeConfig(DEFAULT_ROPE_THETA, "default")
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry biases
    attention_out_bias: bool = False  # the output projection carries a bias
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    mlp_bias: bool = False
    torch_dtype: str = DEFAULT_DTYPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    generation_defaults: tuple[tuple[str, float | int], ...] = ()
    # The checkpoint's sliding attention window when some layer uses one; `max_position_embeddings`
    # is then capped to it, where full attention (what the decoder runs) is the same model.
    sliding_window: int | None = None
    # The layers' matmul weights stored quantized with per-output-channel scales (model/weight_quant.py):
    # "int8" or "fp8", set by a checkpoint in Hugging Face's FP8 format or by --weight-quant; or "bf16"
    # (--weight-quant, CPU): every matmul weight, embedding and head included, in bfloat16; or a GGUF block
    # format, "q4_0", "q4_1" or "q8_0" (CPU): the layers' matmul weights in blocks of 32 with their scales
    weight_quant: str | None = None
    # The LM head stored quantized too (--lm-head-quant): "int8", per vocabulary row, for a model with a head of its
    # own under unquantized, int8 or fp8 layers; None keeps it in the serving dtype (model/loader.py's param_specs)
    head_quant: str | None = None
    # A GGUF file's block format when all the layers' matmul weights are stored in one of those formats (the
    # CPU's default weight format then: serving/engine/engine.py); None otherwise
    checkpoint_blocks: str | None = None
    # A GGUF file's token embedding's block format, if one of those: a tied embedding (the head too) is then kept
    # as the file stores it whenever the layers are served in a block format (model/loader.py's param_specs)
    embedding_blocks: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(sorted(FAMILIES))}")
        for name in SIZE_FIELDS:
            _check_positive_int(getattr(self, name), name)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"dtype {self.torch_dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        if self.weight_quant not in (None, *WEIGHT_FORMATS):
            raise ValueError(f"weight_quant must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_quant!r}")
        if self.head_quant is not None:
            if self.head_quant not in HEAD_FORMATS:
                raise ValueError(f"head_quant must be one of {', '.join(HEAD_FORMATS)}, got {self.head_quant!r}")
            if self.tie_word_embeddings:
                raise ValueError("--lm-head-quant needs a model with an LM head of its own; this one ties its head to "
                                 "the token embedding")
            if self.weight_quant not in (None, "int8", "fp8"):
                raise ValueError(f"--lm-head-quant goes with unquantized, int8 or fp8 layers, not --weight-quant "
                                 f"{self.weight_quant}")
        if self.hidden_act not in ACTIVATIONS:
            supported = ", ".join(sorted(ACTIVATIONS))
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: {supported})")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read `config.json` and, when present, `generation_config.json` from a local checkpoint folder;
        or a GGUF file's metadata (`model.gguf`)."""
        from model.gguf import find_gguf_file, gguf_model_config  # imported here: model.gguf builds on this module

        gguf_file = find_gguf_file(path)
        if gguf_file is not None:
            return gguf_model_config(gguf_file)
        directory = Path(path)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {directory}; is it a Hugging Face checkpoint folder?")
        generation_file = directory / "generation_config.json"
        generation = _read_json(generation_file) if generation_file.is_file() else None
        return cls.from_hf_dict(_read_json(config_file), generation)

    @classmethod
    def from_hf_dict(cls, config_dict: Json, generation_config_dict: Json | None = None) -> ModelConfig:
        """Build from the parsed `config.json` (any transformers version) and `generation_config.json`."""
        family = _family(config_dict)
        missing = [key for key in REQUIRED_FIELDS if config_dict.get(key) is None]
        if missing:
            raise ValueError(f"config.json is missing required fields: {', '.join(missing)}")
        generation = generation_config_dict or {}
        num_heads = config_dict["num_attention_heads"]
        window = _sliding_window(config_dict, family)
        max_positions = config_dict["max_position_embeddings"]
        if window is not None and isinstance(max_positions, int):
            logger.warning(
                "%s attends through a sliding window of %d tokens; sequences are capped at that length "
                "(max_position_embeddings %d), where full attention is the same model",
                family, window, max_positions,
            )
            max_positions = min(max_positions, window)
        return cls(
            family=family,
            vocab_size=config_dict["vocab_size"],
            hidden_size=config_dict["hidden_size"],
            intermediate_size=config_dict["intermediate_size"],
            num_layers=config_dict["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config_dict.get("num_key_value_heads") or num_heads,
            head_dim=_head_dim(config_dict),
            rms_norm_eps=_number(config_dict, "rms_norm_eps", DEFAULT_RMS_NORM_EPS),
            max_position_embeddings=max_positions,
            rope=rope_from_hf(config_dict),
            tie_word_embeddings=_flag(config_dict, "tie_word_embeddings") or _is_bare(config_dict),
            **_attention_options(config_dict, family),
            mlp_bias=_flag(config_dict, "mlp_bias"),
            torch_dtype=_dtype_name(config_dict),
            bos_token_id=_optional_token_id(config_dict.get("bos_token_id"), "bos_token_id"),
            eos_token_ids=merge_eos_token_ids(config_dict, generation),
            hidden_act=config_dict.get("hidden_act") or "silu",
            generation_defaults=generation_defaults(generation),
            sliding_window=window,
            weight_quant=_checkpoint_quantization(config_dict),
        )


def _checkpoint_quantization(config: Json) -> str | None:
    """The weight format a checkpoint is saved in: "fp8" for Hugging Face's FP8 format (`quant_method: fp8`,
    e4m3 weights with `weight_scale_inv`), None for a plain one; other methods are refused by name."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
    if method != "fp8":
        raise ValueError(f"quantization_config quant_method {method!r} is not supported (fp8 is: Hugging Face's "
                         "FP8 checkpoints; or serve a bf16 checkpoint with --weight-quant int8|fp8)")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"FP8 checkpoints in {quantization['fmt']!r} are not supported (e4m3 is)")
    return "fp8"


def rope_from_hf(config: Json) -> RopeConfig:
    """RoPE settings from `rope_parameters` (transformers 5) or top-level `rope_theta` + `rope_scaling`
    (with `rope_type`, or the older `type`), resolving what transformers derives from the rest."""
    # transformers lets rope_scaling win when a config carries both
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _number(params, "rope_theta", _number(config, "rope_theta", DEFAULT_ROPE_THETA))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise ValueError(f"partial_rotary_factor={partial} is not supported: Llama rotates whole heads")
    if rope_type in ("default", "linear"):
        factor = 1.0 if rope_type == "default" else _required_number(params, "factor", rope_type)
        return RopeConfig(theta, rope_type, factor=factor)
    if rope_type == "dynamic":
        # transformers (and InternLM2's own code) stretch from max_position_embeddings, never from an
        # `original_max_position_embeddings` the dict may carry
        factor = _required_number(params, "factor", rope_type)
        original = config["max_position_embeddings"]
        _check_positive_int(original, "max_position_embeddings")
        return RopeConfig(theta, rope_type, factor=factor, original_max_position_embeddings=original)
    original = _original_max_positions(config, params)
    if rope_type == "llama3":
        return RopeConfig(
            theta,
            rope_type,
            factor=_required_number(params, "factor", rope_type),
            low_freq_factor=_required_number(params, "low_freq_factor", rope_type),
            high_freq_factor=_required_number(params, "high_freq_factor", rope_type),
            original_max_position_embeddings=original,
        )
    if rope_type == "yarn":
        factor = _number(params, "factor", None)
        if factor is None:  # transformers then infers the stretch from the two context lengths
            factor = config["max_position_embeddings"] / original
        return RopeConfig(
            theta,
            rope_type,
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=_number(params, "beta_fast", None),
            beta_slow=_number(params, "beta_slow", None),
            attention_factor=_yarn_attention_factor(params, factor),
            truncate=bool(params.get("truncate", True)),
        )
    return RopeConfig(theta, rope_type)  # refuses the unknown type by name


def merge_eos_token_ids(config: Json, generation_config: Json) -> tuple[int, ...]:
    """config.json's EOS ids, then generation_config.json's extra ones (Llama 3 ends turns with those)."""
    ids = _token_ids(config.get("eos_token_id"), "config.json eos_token_id")
    ids += _token_ids(generation_config.get("eos_token_id"), "generation_config.json eos_token_id")
    return tuple(dict.fromkeys(ids))


def generation_defaults(generation_config: Json) -> tuple[tuple[str, float | int], ...]:
    """The sampling defaults the checkpoint's authors set (only those present), as (name, value) pairs."""
    defaults: list[tuple[str, float | int]] = []
    for key, kind in GENERATION_DEFAULT_KEYS:
        value = generation_config.get(key)
        if value is None:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
        if wrong_type or (kind is int and value != int(value)):
            raise ValueError(f"generation_config.json {key} must be a {kind.__name__}, got {value!r}")
        defaults.append((key, kind(value)))
    return tuple(defaults)


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def _architecture(config: Json) -> str:
    return (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type", ""), "")])[0]


def _is_bare(config: Json) -> bool:
    """A bare decoder's config: its checkpoint has no LM head (`BARE_ARCHITECTURES`)."""
    return _architecture(config) in BARE_ARCHITECTURES


def _family(config: Json) -> str:
    architecture = _architecture(config)
    if architecture in BARE_ARCHITECTURES:
        return BARE_ARCHITECTURES[architecture]
    if architecture not in ARCHITECTURES:
        shown = architecture or f"model_type={config.get('model_type')!r}"
        # A checkpoint with modelling code of its own names it in auto_map: say so, as that code is never run.
        shipped = ", whose modelling code ships with the checkpoint (auto_map)" if config.get("auto_map") else ""
        raise ValueError(
            f"unsupported architecture {shown}{shipped}: xlserve runs {', '.join(ARCHITECTURES)} for now "
            "(custom modelling code is never executed)"
        )
    return ARCHITECTURES[architecture]


def _attention_options(config: Json, family: str) -> dict[str, bool]:
    """Which attention projections carry biases, and whether heads are RMS-normed, per family."""
    if family == "qwen2":  # Qwen2's config has no bias field: q/k/v always have one, o never
        return {"attention_bias": True, "attention_out_bias": False, "qk_norm": False}
    bias = _flag(config, "bias" if family == "internlm2" else "attention_bias")
    return {"attention_bias": bias, "attention_out_bias": bias, "qk_norm": family == "qwen3"}


def _sliding_window(config: Json, family: str) -> int | None:
    """The attention window of the layers that use one, or None when every layer attends fully.

    Mistral 7B v0.1 attends to the last 4096 tokens; Qwen2/Qwen3 carry `sliding_window` but apply it
    only with `use_sliding_window`, and then only to layers from `max_window_layers` on (transformers
    5 spells the outcome as `layer_types`). A window no shorter than the model's context changes nothing.
    """
    window = config.get("sliding_window")
    if window is None:
        return None
    _check_positive_int(window, "sliding_window")
    if family in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if "sliding_attention" not in layer_types:
            return None
    elif family in ("qwen2", "qwen3"):
        if config.get("max_window_layers", config["num_hidden_layers"]) >= config["num_hidden_layers"]:
            return None
    max_positions = config["max_position_embeddings"]
    if isinstance(max_positions, int) and window >= max_positions:
        return None
    return window


def _head_dim(config: Json) -> int:
    if config.get("head_dim"):
        return config["head_dim"]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    return hidden // heads


def _dtype_name(config: Json) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or DEFAULT_DTYPE  # transformers 5 writes `dtype`
    if not isinstance(name, str):
        raise ValueError(f"config.json dtype must be a string, got {name!r}")
    return name.removeprefix("torch.")


def _original_max_positions(config: Json, params: Json) -> int:
    # As transformers: a top-level value (Phi-3 style) wins, else the RoPE dict's, else the model's length.
    value = (
        config.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or config["max_position_embeddings"]
    )
    _check_positive_int(value, "original_max_position_embeddings")
    return value


def _yarn_attention_factor(params: Json, factor: float) -> float | None:
    attention_factor = _number(params, "attention_factor", None)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's form, as transformers reads it
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return attention_factor


def _number(source: Json, key: str, default: float | None) -> float | None:
    value = source.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _required_number(params: Json, key: str, rope_type: str) -> float:
    value = _number(params, key, None)
    if value is None:
        raise ValueError(f"{rope_type} RoPE scaling needs {key!r} in rope_scaling / rope_parameters")
    return value


def _flag(config: Json, key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _optional_token_id(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a token id, got {value!r}")
    return value


def _token_ids(value: object, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(token for token in (_optional_token_id(v, name) for v in values) if token is not None)
