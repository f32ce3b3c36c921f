"""Prometheus metrics (served at GET /metrics) under vLLM's names, so existing vLLM dashboards and alerts work.

Names and meanings follow vLLM where they match (`vllm:num_requests_running`,
`vllm:time_to_first_token_seconds`, ...; times in seconds, `model_name` label on every series); what
vLLM has no name for is `xlserve:*` (the compile counter that must stay 0, admission and HTTP gauges,
refusals and errors). Counts are per engine request, i.e. per choice: a request with `n=4` is four.

Gauges are read from the engine, the admission queue and the in-flight set when scraped, so they
cannot drift from the truth; counters and histograms are fed by the engine bridge as choices end.
Each app has its own registry (several apps may live in one process, e.g. in tests), plus the
standard process collector (resident memory, CPU, open files).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sized
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from serving.engine.client import EngineClient
    from serving.http.admission import Admission

# vLLM's buckets, so histograms from both servers can be compared and aggregated.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)


def one_two_five_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > limit:
                return tuple(buckets)
            buckets.append(value)
        scale *= 10


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        tokens = one_two_five_buckets(max_model_len)

        def counter(name: str, help: str, *extra: str) -> Counter:
            return Counter(name, help, [*labels, *extra], registry=self.registry)

        def histogram(name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help, labels, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed (per choice).")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "vllm:request_success", "Choices that ended, by finish reason (abort: client gone).", "finished_reason"
        )
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.rejected = counter("xlserve:requests_rejected", "Requests refused with 503 before running.", "reason")
        self.errors = counter("xlserve:request_errors", "Requests that failed after admission.", "code")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds", "Mean time between tokens after the first.", TPOT_BUCKETS
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token.", E2E_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt length per choice.", tokens)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per choice.", tokens
        )
        self.request_params_n = histogram("vllm:request_params_n", "Choices asked for per request.", N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "max_tokens asked for (the session length if unset).", tokens
        )
        ProcessCollector(registry=self.registry)

    def watch(self, engine: EngineClient, admission: Admission, in_flight: Collection[object], sessions: Sized) -> None:
        """Export the live state of these as gauges read at scrape time."""
        self.registry.register(_LiveState(self.model_name, engine, admission, in_flight, sessions))

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def fail(self, code: str) -> None:
        self.errors.labels(self.model_name, code).inc()

    def observe_request(self, n: int, max_tokens: int) -> None:
        self.request_params_n.labels(self.model_name).observe(n)
        self.request_params_max_tokens.labels(self.model_name).observe(max_tokens)

    def observe_choice(
        self,
        *,
        finish_reason: str,
        prompt_tokens: int,
        cached_tokens: int,
        generated_tokens: int,
        arrival: float,
        first_token: float | None,
        last_token: float | None,
    ) -> None:
        """Record one ended choice (times on one clock, in seconds)."""
        name = self.model_name
        self.request_success.labels(name, finish_reason).inc()
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generated_tokens)
        self.prefix_cache_queries.labels(name).inc(prompt_tokens)
        self.prefix_cache_hits.labels(name).inc(cached_tokens)
        self.request_prompt_tokens.labels(name).observe(prompt_tokens)
        self.request_generation_tokens.labels(name).observe(generated_tokens)
        if first_token is not None and last_token is not None:
            self.ttft.labels(name).observe(first_token - arrival)
            self.e2e.labels(name).observe(last_token - arrival)
            if generated_tokens > 1:
                self.tpot.labels(name).observe((last_token - first_token) / (generated_tokens - 1))

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper's Accept header asks for (Prometheus text 0.0.4 by
        default, OpenMetrics on request), and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _LiveState:
    """A custom collector: gauges computed from the live objects at every scrape."""

    def __init__(
        self, model_name: str, engine: EngineClient, admission: Admission, in_flight: Collection[object],
        sessions: Sized,
    ):
        self.model_name = model_name
        self.engine = engine
        self.admission = admission
        self.in_flight = in_flight
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        def counter(name: str, help: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help, labels=["model_name"])
            family.add_metric([self.model_name], value)
            return family

        yield gauge("vllm:num_requests_running", "Choices in the engine's running batch.", stats.num_running)
        yield gauge(
            "vllm:num_requests_waiting",
            "Choices waiting: in the engine's queue or for an admission slot.",
            stats.num_waiting + self.admission.queued,
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache pages in use (1 = full).",
            stats.num_pages_used / max(stats.num_pages_total, 1),
        )
        # vLLM's info gauge, by which the Gateway API Inference Extension (llm-d) sizes its prefix-cache
        # scorer and our proxy learns a node's page size; vLLM's label values are strings.
        config_info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV-cache configuration: page size in tokens, usable pages, whether prefix caching is on.",
            labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        prefix_caching = self.engine.engine_config.enable_prefix_caching
        config_info.add_metric(
            [self.model_name, str(self.engine.page_size), str(stats.num_pages_total), str(prefix_caching)], 1
        )
        yield config_info
        yield counter("vllm:num_preemptions", "Sequences preempted for lack of KV pages.", stats.num_preemptions)
        # vllm:prompt_tokens counts every prompt token; this, only those not taken from the cache.
        yield counter(
            "xlserve:prompt_tokens_computed",
            "Prompt tokens prefilled (including recomputation after preemption), i.e. not found in the KV cache.",
            stats.prompt_tokens_computed,
        )
        yield gauge(
            "xlserve:interactive_sessions", "Sessions /v1/chat/interactive keeps a history for.", len(self.sessions)
        )
        yield gauge(
            "xlserve:pinned_sessions", "Sessions whose KV pages the engine keeps pinned.", stats.num_pinned_sessions
        )
        yield counter(
            "xlserve:shared_prefix_steps",
            "Decode steps that read shared prefix pages once per tile of rows (shared-prefix attention).",
            stats.shared_prefix_steps,
        )
        yield counter(
            "xlserve:mixed_steps",
            "Steps that ran decoding rows beside prompt chunks as one program (--mixed-decode-buckets).",
            stats.mixed_steps,
        )
        yield counter(
            "xlserve:shared_prefix_rows",
            "Decode rows that read their shared prefix with a tile, summed over steps.",
            stats.shared_prefix_rows,
        )
        yield gauge(
            "xlserve:startup_buckets_remaining",
            "Buckets (and sampler branches) still compiling in the background after the server became ready.",
            stats.startup_buckets_remaining,
        )
        yield gauge(
            "xlserve:startup_buckets_unrun",
            "Compiled buckets not run yet: the engine runs each once while idle, since a program's first run costs"
            " more than the next, so 0 here and above means no request pays one.",
            stats.startup_buckets_unrun,
        )
        yield counter(
            "xlserve:compilations_after_warmup",
            "XLA compilations after start-up; anything but 0 is a bug.",
            stats.compilations_after_warmup,
        )
        yield gauge("xlserve:admission_slots_running", "Admission slots held by running requests.",
                    self.admission.running)
        yield gauge("xlserve:admission_slots_queued", "Admission slots queued.", self.admission.queued)
        yield gauge("xlserve:http_requests_in_flight", "HTTP requests being served.", len(self.in_flight))

