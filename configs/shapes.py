"""Model shapes for benchmarks with random weights, where real checkpoints cannot be downloaded."""

from __future__ import annotations

from model.config import ModelConfig, RopeConfig

SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig(500000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        torch_dtype="bfloat16", bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    # SmolLM2-135M-Instruct (the real-model tier's checkpoint): the CPU benchmarks' shape.
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(100000.0, "default"), tie_word_embeddings=True, torch_dtype="float32", eos_token_ids=(2,),
    ),
    "tiny": ModelConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, max_position_embeddings=2048, torch_dtype="float32", eos_token_ids=(2,),
    ),
}
