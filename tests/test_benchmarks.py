"""The benchmark scripts still run (one timed step; the figures themselves are not tested)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/speed.py", "--nproc", "1", "--steps", "1",
                           "--variants", "a", "b", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert "(b) MoUE, state" in proc.stdout and "ratio to (a)" in proc.stdout
