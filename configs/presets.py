"""Bucket presets: the shapes each platform compiles at start-up.

GPU: decode batches in powers of two up to 256 and prefill chunks up to 8192 tokens (LMDeploy's
--max-prefill-token-num default). CPU: few programs, because XLA:CPU takes seconds to compile each one
(SmolLM2-135M's decode step: ~3.7 s of CPU; each row count adds 3 sampler programs) and start-up compiles
them all: decode at 1, 4 and 16 rows (padding a partial batch up to the next costs less than compiling
every power of two), prefill in one or four rows of 64 tokens (a longer prompt takes several rows of a
step). A CPU prefill step costs what its tokens cost, padding included: 16 prompts of 64 tokens took
1.2 s in [4 x 64] steps and 2.1 s in [4 x 128] (2 cores, quiet). Test: the fewest shapes that still
exercise chunking, batching and padding, to keep the CI run short.
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
        prefill_tokens=(64,),
        max_prefill_tokens=256,
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
