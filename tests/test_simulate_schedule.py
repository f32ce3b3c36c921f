"""The schedule simulator (tools/simulate_schedule.py) drives the real scheduler to the end of a load."""

from __future__ import annotations

from serving.engine.config import BucketSet
from tools.bench_serving import sharegpt_like_dataset
from tools.simulate_schedule import simulate


def test_every_token_is_produced_and_short_rows_pad_less():
    requests = sharegpt_like_dataset(120, 32000, seed=1)
    one_row = simulate(requests, BucketSet((8, 16, 32), (1, 2, 4), (256, 512, 1024), 2048))
    short_rows = simulate(requests, BucketSet((8, 16, 32), (1, 2, 4, 8, 16), (128,), 2048))
    for p in (one_row, short_rows):
        assert p.output_tokens == sum(r.output_len for r in requests)
        assert p.prompt_tokens == sum(len(r.prompt) for r in requests)
        assert p.padded_prompt_tokens >= p.prompt_tokens
        assert p.seconds > p.decode_seconds > 0
    # A prompt spread over 128-token rows pads by less than a row; one row per prompt pads to the longest.
    assert short_rows.padded_prompt_tokens < one_row.padded_prompt_tokens
    assert short_rows.seconds < one_row.seconds
