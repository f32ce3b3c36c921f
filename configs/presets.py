"""Bucket presets: the shapes each platform compiles at start-up.

GPU: decode batches in powers of two up to 256 and prefill chunks up to 8192 tokens (LMDeploy's
--max-prefill-token-num default). CPU: small, so start-up compiles stay quick. Test: the fewest shapes
that still exercise chunking, batching and padding, to keep the CI run short.

Plain data: `serving.engine.config.preset_buckets` turns a preset into a `BucketSet`, so configs never
import the engine.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "gpu": dict(
        decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        prefill_rows=(1, 2, 4, 8, 16, 32),
        prefill_tokens=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
        max_prefill_tokens=8192,
    ),
    "cpu": dict(
        decode_batch=(1, 2, 4, 8, 16),
        prefill_rows=(1, 2, 4),
        prefill_tokens=(16, 32, 64, 128, 256),
        max_prefill_tokens=512,
    ),
    "test": dict(
        decode_batch=(1, 2, 4, 8),
        prefill_rows=(1, 2, 4),
        prefill_tokens=(16, 32, 64),
        max_prefill_tokens=128,
    ),
}

