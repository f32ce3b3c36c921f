"""bench_engine's phase table: where a run's turns, prompt tokens and output tokens fall in time."""

from __future__ import annotations

from serving.engine.engine import TurnRecord
from tools.bench_engine import phase_table


def test_phases_split_the_run_and_keep_every_turn_and_token():
    # Four 1-second turns: the host waits 0.5 s for the device in the first two, 0.1 s in the last two.
    turns = [TurnRecord(start=float(i), dispatched=i + 0.1, device_ready=i + (0.6 if i < 2 else 0.2),
                        read=i + 0.9, decode_rows=8 * i, prefill_tokens=100 if i == 0 else 0) for i in range(4)]
    records = [{"times": [0.95, 1.9, 2.95]}, {"times": [3.5, 3.9]}]  # the last token ends the run
    table = phase_table(turns, records, phases=2)
    assert [row["turns"] for row in table] == [2, 2]
    assert [row["t0_s"] for row in table] == [0.0, 1.95]
    assert [round(row["wait_ms"]) for row in table] == [500, 100]
    assert [row["decode_rows"] for row in table] == [4.0, 20.0]
    assert [row["prefill_tokens"] for row in table] == [100, 0]
    assert [row["output_tokens"] for row in table] == [2, 3]


def test_embed_mode_times_embeddings_against_transformers(tiny_llama, tmp_path, monkeypatch):
    """`bench_engine embed --baseline transformers`: input tokens per second of embedding requests, beside the
    decoder's forward in transformers, whose last-token states must be xlserve's vectors."""
    import json
    import sys

    from tools import bench_engine

    out = tmp_path / "embed.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_engine", "--model", str(tiny_llama), "--session-len", "128", "--preset", "test", "--page-size", "16",
        "--num-pages", "40", "--bandwidth", "1e10", "--baseline", "transformers", "--json", str(out),
        "embed", "--num-prompts", "12", "--input-len", "20"])
    bench_engine.main()
    result = json.loads(out.read_text())
    assert result["mode"] == "embed" and result["input_tok_s"] > 0 and result["compilations_after_warmup"] == 0
    baseline = result["baseline"]
    assert baseline["input_tok_s"] > 0 and baseline["ratio"] == result["input_tok_s"] / baseline["input_tok_s"]
    assert baseline["max_unit_difference"] < 1e-4
