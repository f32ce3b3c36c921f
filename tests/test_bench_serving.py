"""tools/bench_serving.py: its datasets, its metric definitions (vLLM's) on synthetic timings, and
short runs against the shared live server."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.http_fixtures import LiveServer, shared_http_server  # noqa: F401 (the `http_server` fixture)
from tests.sentencepiece_tokenizer import VOCAB_SIZE
from tools import bench_serving as bench
from tools.bench_serving import RequestResult


def lengths(requests: list[bench.BenchRequest]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([len(r.prompt) for r in requests]), np.array([r.output_len for r in requests])


def test_random_lengths_are_fixed_at_ratio_zero_and_bounded_otherwise() -> None:
    fixed = bench.random_dataset(50, 32, 8, 0.0, 1000, seed=0)
    assert lengths(fixed)[0].tolist() == [32] * 50 and lengths(fixed)[1].tolist() == [8] * 50
    spread = bench.random_dataset(2000, 100, 40, 0.5, 1000, seed=0)
    inputs, outputs = lengths(spread)
    assert inputs.min() == 50 and inputs.max() == 150 and outputs.min() == 20 and outputs.max() == 60
    assert abs(inputs.mean() - 100) < 3  # uniform around L
    ids = np.concatenate([r.prompt for r in spread])
    assert ids.min() >= bench.MIN_TOKEN_ID and ids.max() < 1000


def test_datasets_are_deterministic_by_seed() -> None:
    for make in (lambda seed: bench.random_dataset(20, 16, 4, 0.3, 32000, seed),
                 lambda seed: bench.sharegpt_like_dataset(20, 32000, seed),
                 lambda seed: bench.shared_prefix_dataset(20, 8, 4, 16, 4, 0.0, 32000, seed)):
        assert make(1) == make(1)
        assert make(1) != make(2)


def test_sharegpt_like_matches_its_documented_distribution() -> None:
    inputs, outputs = lengths(bench.sharegpt_like_dataset(20000, 32000, seed=0))
    # vLLM's ShareGPT filter holds for every pair.
    assert inputs.min() >= 4 and outputs.min() >= 4
    assert inputs.max() <= 1024 and (inputs + outputs).max() <= 2048
    # The documented means (~200 each) and medians (~130), and long tails.
    assert 185 < inputs.mean() < 210 and 185 < outputs.mean() < 210
    assert 120 < np.median(inputs) < 140 and 120 < np.median(outputs) < 140
    assert np.percentile(inputs, 99) > 700 and np.percentile(outputs, 99) > 700


def test_shared_prefix_groups_share_their_prefix() -> None:
    requests = bench.shared_prefix_dataset(10, 12, 4, 6, 5, 0.0, 32000, seed=0)
    inputs, outputs = lengths(requests)
    assert inputs.tolist() == [18] * 10 and outputs.tolist() == [5] * 10
    groups = {tuple(r.prompt[:12]) for r in requests}
    assert len(groups) == 3  # 4 + 4 + 2
    assert sorted(sum(r.prompt[:12] == list(g) for r in requests) for g in groups) == [2, 4, 4]
    assert len({tuple(r.prompt[12:]) for r in requests}) == 10  # the questions differ
    text = [bench.as_text(r.prompt) for r in requests]
    assert len({tuple(t.split()[:12]) for t in text}) == 3  # the chat text keeps prefixes shared
    assert all(len(t.split()) == 18 for t in text)


def test_arrivals_are_poisson_at_the_rate_or_all_at_once() -> None:
    assert bench.arrival_offsets(5, math.inf, 1.0, seed=0).tolist() == [0.0] * 5
    offsets = bench.arrival_offsets(4000, 20.0, 1.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.05) < 0.005 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: cv 1


def test_sse_parser_handles_comments_multiline_data_and_done() -> None:
    parser = bench.SSEParser()
    lines = [": ping", "", "data: {\"a\":", "data:1}", "", "event: x", "data: [DONE]", ""]
    assert [e for line in lines if (e := parser.feed(line)) is not None] == ['{"a":\n1}', "[DONE]"]


def test_chunk_content_skips_role_only_chat_chunks() -> None:
    assert bench.chunk_content({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == (False, "")
    assert bench.chunk_content({"choices": [{"delta": {"content": "hi"}}]}) == (True, "hi")
    assert bench.chunk_content({"choices": [{"text": "", "finish_reason": "length"}]}) == (True, "")
    assert bench.chunk_content({"choices": [], "usage": {"completion_tokens": 3}}) == (False, "")


def test_metrics_follow_vllm_definitions() -> None:
    results = [
        # 5 tokens: TTFT 100 ms, then chunks 20, 30, 10, 40 ms apart -> E2E 200 ms, TPOT 100/4 = 25 ms.
        RequestResult(True, "", start=0.0, ttft=0.1, latency=0.2, itl=[0.02, 0.03, 0.01, 0.04], prompt_tokens=10,
                      output_tokens=5, usage=True),
        # 3 tokens in 2 chunks: TPOT (0.5 - 0.3) / 2 = 100 ms; its one gap joins the pooled ITL.
        RequestResult(True, "", start=0.5, ttft=0.3, latency=0.5, itl=[0.2], prompt_tokens=20, output_tokens=3),
        # 1 token: no TPOT.
        RequestResult(True, "", start=1.0, ttft=0.05, latency=0.05, prompt_tokens=30, output_tokens=1),
        RequestResult(False, "HTTP 503: busy", start=1.0, prompt_tokens=40),
        RequestResult(False, "HTTP 503: busy"),
    ]
    m = bench.compute_metrics(results, duration=2.0, percentiles=[50.0, 99.0], peak_concurrency=3)
    assert (m["completed"], m["failed"], m["errors"]) == (3, 2, {"HTTP 503: busy": 2})
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5 and m["total_token_throughput"] == 34.5
    assert m["tpot_ms"]["mean"] == pytest.approx(62.5) and m["tpot_ms"]["p50"] == pytest.approx(62.5)
    assert m["ttft_ms"]["median"] == pytest.approx(100) and m["ttft_ms"]["mean"] == pytest.approx(150)
    assert m["itl_ms"]["mean"] == pytest.approx(60) and m["itl_ms"]["median"] == pytest.approx(30)
    assert m["e2el_ms"]["mean"] == pytest.approx(250)
    assert m["itl_ms"]["p99"] == pytest.approx(np.percentile([20, 30, 10, 40, 200], 99))
    # One-second bins: request 0's 5 tokens and request 1's first chunk (0.8 s) land in bin 0.
    assert m["peak_output_throughput"] == pytest.approx(6.5) and m["peak_concurrency"] == 3
    empty = bench.compute_metrics([RequestResult()], 1.0, [99.0], 0)
    assert empty["ttft_ms"] == {"mean": None, "median": None, "p99": None} and empty["failed"] == 1


def test_end_to_end_against_the_live_server(http_server: LiveServer, tmp_path) -> None:
    result_json, plot = tmp_path / "result.json", tmp_path / "plot.png"
    report = bench.main([
        "--base-url", http_server.base_url, "--num-prompts", "20", "--input-len", "24", "--output-len", "6",
        "--max-concurrency", "4", "--ignore-eos", "--seed", "1", "--vocab-size", str(VOCAB_SIZE), "--save-detail",
        "--percentiles", "50,90,99",
        "--result-json", str(result_json), "--plot", str(plot),
    ])
    saved = json.loads(result_json.read_text())
    assert saved == json.loads(json.dumps(report))
    m = saved["metrics"]
    assert (m["completed"], m["failed"], m["errors"], m["usage_reported"]) == (20, 0, {}, 20)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (20 * 24, 20 * 6)  # exact: ids and ignore_eos
    assert 1 <= m["peak_concurrency"] <= 4
    assert 0 < m["ttft_ms"]["median"] <= m["e2el_ms"]["median"] and m["tpot_ms"]["p99"] > 0
    assert saved["config"]["model"] == http_server.model_name and "api_key" not in saved["config"]
    assert len(saved["detail"]) == 20 and all(d["success"] for d in saved["detail"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_prefix_run_reports_cache_hits_and_a_speedup_over_a_baseline(http_server: LiveServer, tmp_path) -> None:
    baseline = tmp_path / "baseline.json"
    common = ["--base-url", http_server.base_url, "--dataset", "shared-prefix", "--num-prompts", "8",
              "--prefix-len", "48", "--prompts-per-group", "4", "--input-len", "8", "--output-len", "3",
              "--max-concurrency", "1", "--ignore-eos", "--vocab-size", str(VOCAB_SIZE)]  # fmt: skip
    first = bench.main([*common, "--seed", "3", "--result-json", str(baseline)])["metrics"]
    # One request at a time: every prompt after its group's first finds the 48-token prefix cached
    # (3 whole pages of 16), and the server says so in usage.prompt_tokens_details.
    assert first["completed"] == 8 and first["cached_input_tokens"] >= 6 * 48
    assert first["prefix_cache_hit_rate"] == first["cached_input_tokens"] / first["total_input_tokens"]
    second = bench.main([*common, "--seed", "3", "--baseline-json", str(baseline)])["metrics"]
    assert second["cached_input_tokens"] == 8 * 48, "the same prompts again: every prefix is cached"
    speedup = second["speedup"]
    assert speedup["baseline"] == str(baseline) and speedup["output_throughput"] > 0 and speedup["ttft_median"] > 0


def test_chat_endpoint_and_failures_are_counted(http_server: LiveServer) -> None:
    chat = bench.main(["--base-url", http_server.base_url, "--endpoint", "/v1/chat/completions", "--num-prompts",
                       "4", "--input-len", "16", "--output-len", "4", "--ignore-eos", "--request-rate", "50"])
    assert (chat["metrics"]["completed"], chat["metrics"]["total_output_tokens"]) == (4, 16)
    assert chat["metrics"]["total_input_tokens"] > 4 * 16  # the server's count, with the chat template
    wrong = bench.main(["--base-url", http_server.base_url, "--model", "no-such-model", "--num-prompts", "3",
                        "--input-len", "8", "--output-len", "2"])
    assert wrong["metrics"]["completed"] == 0 and wrong["metrics"]["failed"] == 3
    (error,) = wrong["metrics"]["errors"]
    assert error.startswith("RuntimeError: HTTP 404")


def test_a_concurrency_sweep_plots_its_load_curves(http_server: LiveServer, tmp_path) -> None:
    result_json, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    sweep = bench.main([
        "--base-url", http_server.base_url, "--num-prompts", "8", "--input-len", "16", "--output-len", "4",
        "--max-concurrency", "1", "4", "--ignore-eos", "--vocab-size", str(VOCAB_SIZE),
        "--result-json", str(result_json), "--plot", str(plot),
    ])  # fmt: skip
    assert json.loads(result_json.read_text()) == json.loads(json.dumps(sweep))
    assert (sweep["swept"], sweep["levels"]) == ("max_concurrency", ["1", "4"])
    one, four = (report["metrics"] for report in sweep["sweep"])
    assert [r["config"]["max_concurrency"] for r in sweep["sweep"]] == [1, 4]
    assert one["completed"] == four["completed"] == 8 and one["total_output_tokens"] == 8 * 4
    assert one["peak_concurrency"] == 1 < four["peak_concurrency"] <= 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_one_load_option_may_be_swept() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--request-rate", "1", "2", "--max-concurrency", "1", "4"])
    rates = bench.parse_args(["--request-rate", "1", "inf"])
    assert (rates.sweep, rates.levels, rates.max_concurrency) == ("request_rate", [1.0, math.inf], None)
