"""Bucket presets: the shapes each platform compiles at start-up.

GPU: decode batches in powers of two up to 256; prefill packed (a step's matmuls compute its real prompt
tokens end to end, padded to a power of two up to 8192, LMDeploy's --max-prefill-token-num default) over
attention rows of 128 tokens; and mixed steps, in which up to 64 decoding rows ride in a prefill step. Packed
prefill is B2's best server; mixed steps made B4 18% faster, met the latency target and cost B2 ~1%
(docs/benchmarks.md, "Round two, fourteenth session"). It also compiles fewer programs than rows x
lengths would.

CPU: few programs, because XLA:CPU takes seconds to compile each one and start-up compiles them all:
decode at 1, 4 and 16 rows (padding a partial batch up to the next costs less than compiling every power
of two), prefill in one or four rows of 64 tokens (a longer prompt takes several rows of a step; a CPU
prefill step costs what its tokens cost, padding included). The measurements behind it:
docs/perf-notes.md, "CPU: the XLA attention loop and the cpu preset".

Test: the fewest shapes that still exercise chunking, batching and padding, to keep the CI run short.

Plain data: `serving.engine.config.preset_buckets` turns a preset into a `BucketSet`, so configs never
import the engine.
"""

from __future__ import annotations

PRESETS: dict[str, dict[str, object]] = {
    "gpu": dict(
        decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        prefill_rows=(1, 2, 4, 8, 16, 32, 64),
        prefill_tokens=(128,),
        max_prefill_tokens=8192,
        packed_prefill=(128, 256, 512, 1024, 2048, 4096, 8192),
        mixed_decode=(64,),
    ),
    "cpu": dict(
        decode_batch=(1, 4, 16),
        prefill_rows=(1, 4),
        prefill_tokens=(64,),
        max_prefill_tokens=256,
    ),
    "test": dict(
        decode_batch=(1, 2, 4, 8),
        prefill_rows=(1, 2, 4),
        prefill_tokens=(16, 32, 64),
        max_prefill_tokens=128,
    ),
}

