"""bench_gpu's choice of the run it reports when the many-stream load is repeated."""

from __future__ import annotations

from types import SimpleNamespace

from loadtests.bench_gpu import median_run, parse


def runs(*rates: float) -> list[SimpleNamespace]:
    return [SimpleNamespace(output_tok_s=r, tag=i) for i, r in enumerate(rates)]


def test_the_reported_run_is_the_median_one():
    assert median_run(runs(1200.0, 900.0, 1500.0)).tag == 0
    assert median_run(runs(1500.0)).tag == 0
    assert median_run(runs(1700.0, 1100.0, 1300.0, 1500.0)).tag == 2  # the lower middle


def test_one_run_unless_asked():
    assert parse(["--model", "m", "--out", "o/b.json"]).repeats == 1
    assert parse(["--model", "m", "--out", "o/b.json", "--repeats", "3"]).repeats == 3
