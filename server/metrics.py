"""Prometheus metrics, named as SPEC.md names them. Request and token series carry `model`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from engine.stats import EngineStats

disable_created_metrics()  # the *_created series only double what a scrape already shows

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class _EngineCollector(Collector):
    """Reads the engine's latest published ``EngineStats`` at scrape time (the engine owns the
    numbers; we only read its snapshot)."""

    def __init__(self, snapshot: Callable[[], EngineStats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self._snapshot()
        gauges = (
            ("candlewick_num_requests_running", "Sequences in the running batch", s.num_running),
            ("candlewick_num_requests_waiting", "Sequences waiting to be scheduled", s.num_waiting),
            ("candlewick_kv_cache_usage_ratio", "Fraction of KV blocks in use", s.kv_usage),
            ("candlewick_adapters_loaded", "LoRA adapters resident", s.adapters_loaded),
            ("candlewick_tensor_parallel_ranks", "Ranks sharing the model", s.tensor_parallel_size),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("candlewick_prefix_cache_queries", "Prompt tokens looked up", s.prefix_cache_queries),
            ("candlewick_prefix_cache_hits", "Prompt tokens found cached", s.prefix_cache_hits),
            ("candlewick_preemptions", "Sequences preempted for KV space", s.num_preemptions),
            ("candlewick_adapter_swaps", "Adapter versions replaced or loaded", s.adapter_loads),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        mask = s.mask_seconds
        cumulative, buckets = 0, []
        for bound, count in zip((*mask.bounds, float("inf")), mask.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "candlewick_structured_mask_seconds",
            "Time to compute a constrained row's token mask",
            buckets=buckets,
            sum_value=mask.total,
        )


class ServerMetrics:
    """Every series in one registry per app (so tests can build many apps)."""

    def __init__(self, snapshot: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "candlewick_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "candlewick_inter_token_latency_seconds", "Time between output tokens", ["model"],
            buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "candlewick_e2e_request_latency_seconds", "Request latency", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "candlewick_request_queue_time_seconds", "Time waiting before first scheduled",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "candlewick_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "candlewick_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.requests = Counter(
            "candlewick_requests", "Finished requests", ["model", "finish_reason"], registry=r
        )
        self.embedding_requests = Counter(
            "candlewick_embedding_requests", "Embedding requests answered", ["model"], registry=r
        )
        self.embedding_tokens = Counter(
            "candlewick_embedding_tokens", "Input tokens embedded", ["model"], registry=r
        )
        self.embedding_latency = Histogram(
            "candlewick_embedding_request_latency_seconds", "Embedding request latency",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(snapshot))
        self._series: dict[str, ModelSeries] = {}

    def series(self, model: str) -> ModelSeries:
        """The per-token series of one model, labelled once (a label lookup takes a lock and a
        dict probe; a stream touches these for every token)."""
        if (found := self._series.get(model)) is None:
            found = self._series[model] = ModelSeries(
                generation_tokens=self.generation_tokens.labels(model),
                ttft=self.ttft.labels(model),
                itl=self.itl.labels(model),
                queue_time=self.queue_time.labels(model),
            )
        return found


@dataclass(frozen=True, slots=True)
class ModelSeries:
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    queue_time: Histogram
