"""The benchmark's bookkeeping: which repeat of a run is reported, and which GEMM rate MFU divides by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import train_bench  # noqa: E402


def run(tokens_per_s: float, rss: int = 2000, loss: float = 9.99) -> dict:
    return {"name": "llama-sft", "tokens_per_s": tokens_per_s, "peak_rss_mb": rss, "eval_loss": loss}


def test_median_repeat_is_reported_with_every_repeat_listed():
    chosen = train_bench.median_run([run(610.0, 2300), run(540.0, 2350), run(700.0, 2280)])
    assert (chosen["tokens_per_s"], chosen["peak_rss_mb"]) == (610.0, 2300)
    assert [r["tokens_per_s"] for r in chosen["repeats"]] == [610.0, 540.0, 700.0]


def test_even_count_reports_the_slower_middle_and_skips_failures():
    failed = {"name": "llama-sft", "error": "exit status 1"}
    chosen = train_bench.median_run([run(700.0), failed, run(600.0)])
    assert chosen["tokens_per_s"] == 600.0
    assert chosen["repeats"][1] == failed
    assert train_bench.median_run([failed]) == failed
    assert "repeats" not in train_bench.median_run([run(650.0)])


def test_mfu_divides_by_the_best_rate_measured_for_its_dtype():
    rates = {"float32": 300.0, "bfloat16": 900.0}
    runs = [
        {"name": "original-bs8", "dtype": "float32", "gemm_gflops": 280.0},
        {"name": "llama-sft", "dtype": "bfloat16", "gemm_gflops": 1600.0},
        {"name": "llama-sft", "dtype": "bfloat16", "gemm_gflops": 700.0},
        {"name": "trl", "error": "failed"},
    ]
    assert train_bench.best_gemm_rates(rates, runs) == {"float32": 300.0, "bfloat16": 1600.0}


def test_step_ablation_builds_each_variant_through_the_switch(tmp_path):
    """Each variant is set up by speedups.apply from the flags it names and stepped by the trainer."""
    out = tmp_path / "ablation.json"
    bench = Path(__file__).resolve().parents[1] / "bench"
    args = ["--quick", "--reps", "1", "--variants", "all,off,-fused_head,-labelled_logits", "--out", str(out)]
    args += ["--data", str(tmp_path / "absent.json")]  # the generated demo data, shared/ or not
    result = subprocess.run(
        [sys.executable, str(bench / "step_ablation.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report["rows"]] == ["all", "off", "-labelled_logits", "-fused_head"]
    assert all(row["median_ms"] > 0 for row in report["rows"])
    states = report["speedups"]
    assert states["all"]["fused_head"].startswith("applied")
    assert states["-fused_head"]["fused_head"] == "skipped: --skip_speedups"
    assert states["-fused_head"]["labelled_logits"].startswith("applied")
    assert states["-labelled_logits"]["labelled_logits"] == "skipped: --skip_speedups"
    assert all(state.startswith("skipped: --speedups off") for state in states["off"].values())
