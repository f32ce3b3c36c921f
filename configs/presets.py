"""Bucket presets: the shapes each platform compiles at start-up.

GPU: decode batches in powers of two up to 256 and prefill chunks up to 8192 tokens (LMDeploy's
--max-prefill-token-num default). CPU: few shapes, because XLA:CPU takes seconds per program and start-up
compiles them all (SmolLM2-135M: ~1-3 s a step program, plus 3 sampler programs per row count): decode at
1, 4 and 16 rows (a 16-row step costs a few 1-row steps on CPU, so padding a partial batch up is cheap
next to compiling every power of two), prefill in rows of 64 or 128 tokens, one or four rows. Test: the
fewest shapes that still exercise chunking, batching and padding, to keep the CI run short.
"""

from __future__ import annotations

from serving.engine.config import BucketSet

PRESETS: dict[str, BucketSet] = {
    "gpu": BucketSet(
        decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        prefill_rows=(1, 2, 4, 8, 16, 32),
        prefill_tokens=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
        max_prefill_tokens=8192,
    ),
    "cpu": BucketSet(
        decode_batch=(1, 4, 16),
        prefill_rows=(1, 4),
        prefill_tokens=(64, 128),
        max_prefill_tokens=512,
    ),
    "test": BucketSet(
        decode_batch=(1, 2, 4, 8),
        prefill_rows=(1, 2, 4),
        prefill_tokens=(16, 32, 64),
        max_prefill_tokens=128,
    ),
}


def preset_buckets(name: str, platform: str) -> BucketSet:
    """The named preset; `auto` picks `gpu` on accelerators and `cpu` elsewhere."""
    if name == "auto":
        name = "cpu" if platform == "cpu" else "gpu"
    if name not in PRESETS:
        raise ValueError(f"unknown bucket preset {name!r}; choose one of auto, {', '.join(PRESETS)}")
    return PRESETS[name]
