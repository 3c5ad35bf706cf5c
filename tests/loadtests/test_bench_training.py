"""The training benchmark runs end to end on a tiny model: our trainer and `mlx_lm.lora`, each
reporting tokens/s over the same data and settings (a change to the trainer's API once broke
it without any test noticing)."""

from __future__ import annotations

import json

from loadtests import bench_training


def test_bench_training_runs_both_trainers_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    # the benchmark re-executes itself with the CLI's BLAS; a test process stays as it is
    monkeypatch.setattr(bench_training, "reexec_with_blas", lambda: None)
    argv = ["--preset", "tiny", "--out", str(tmp_path), "--steps", "3", "--warmup", "1"]
    assert bench_training.main([*argv, "--rounds", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert [r["tool"] for r in rows] == ["candlewick", "mlx_lm"]
    assert all(r["tokens_per_second"] > 0 for r in rows)
    assert (tmp_path / "mlx_lm_lora.log").is_file()


def test_mlx_lm_rates_reads_its_table_with_thousands_separators():
    from loadtests.bench_training import mlx_lm_rates

    table = """  iter   train_loss     tok/s     tokens
     1    val 6.309    0.85s
     1    6.306 \x1b[32m▼\x1b[0m      551      0.9k
     2    6.293 ▼    2,516      1.7k
     3    val 6.272    0.92s
    10    6.280 ▲   12,040.5    25.1k
train ██████████████████████████████ 100% ·     3/3"""
    assert mlx_lm_rates(table) == [551.0, 2516.0, 12040.5]
