"""Fine-tuning's series: jobs per state, and the training numbers of the latest step."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.fine_tuning.jobs import STATES
from server.fine_tuning.manager import FineTuningManager


class FineTuningCollector(Collector):
    def __init__(self, manager: FineTuningManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counts = self.manager.jobs.count_by_status()
        jobs = GaugeMetricFamily(
            "candlewick_fine_tuning_jobs", "Fine-tuning jobs by state", labels=["state"]
        )
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        n = self.manager.numbers
        yield GaugeMetricFamily(
            "candlewick_fine_tuning_tokens_per_second",
            "Training tokens per second of the latest step (its micro-batches' device time)",
            value=n.tokens_per_second,
        )
        if n.step_loss is not None:
            yield GaugeMetricFamily(
                "candlewick_fine_tuning_step_loss", "Loss of the latest training step",
                value=n.step_loss,
            )  # fmt: skip
        yield CounterMetricFamily(
            "candlewick_fine_tuning_tokens", "Tokens trained on, since start",
            value=n.tokens_total,
        )  # fmt: skip
        yield CounterMetricFamily(
            "candlewick_fine_tuning_steps", "Training steps done, since start",
            value=n.steps_total,
        )  # fmt: skip
