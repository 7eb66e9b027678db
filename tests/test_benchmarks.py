"""The benchmark scripts still run (one timed step; the figures themselves are not tested).
The smoke runs are `slow` (`make test-slow`, which CI runs); their presets' configs are checked
in `make test`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a training benchmark at its smoke preset on a small built-in corpus (``extra``: more
    arguments); returns the process and its --json figures."""
    from data_tools.corpus import build_stdlib_corpus
    from data_tools.preprocess import preprocess

    corpus = build_stdlib_corpus(tmp_path / "corpus", limit_bytes=2_000_000)
    preprocess([str(corpus.train)], str(tmp_path / "stdlib"), "byte", append_eod=True,
               progress=False)
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, script, "--preset", "smoke",
                           "--data", str(tmp_path / "stdlib"), "--work-dir", str(tmp_path / "runs"),
                           "--json", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_speed_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "benchmarks/speed.py", "--nproc", "1", "--steps", "2",
                           "--variants", "a", "b", "m", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["a", "b", "m"]
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 and len(r["times"]) == 2 for r in rows)
    low, high = rows[1]["ratio_iqr"]
    assert low <= rows[1]["ratio"] <= high and rows[0]["ratio"] == 1.0 and rows[1]["paired"]
    assert "(b) MoUE, state" in proc.stdout and "ratio to (a)" in proc.stdout


@pytest.mark.slow
def test_quality_benchmark_trains_matched_variants_on_the_same_data(tmp_path):
    proc, figures = _smoke("benchmarks/quality.py", tmp_path)
    runs, params = figures["runs"], figures["params"]
    names = ["moe", "moue", "moue-nostate", "moue-perlayer", "moue-epbal", "moue-epbias", "dense"]
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, s) for v in names for s in (1234, 1235)]
    for run in runs:  # every variant trained: held-out loss fell from the untrained model's
        assert run["curve"][0][0] == 0 and run["val_loss"] < run["curve"][0][1] - 0.01, run
    # Matched: the same pool and top-k; MoUE's routers have 2N rows instead of N (hidden 32,
    # 2 layers, N=2), U adds E x d_r; the dense model has no routers at all.
    assert params["moue-nostate"]["total"] - params["moe"]["total"] == 2 * 2 * 32
    assert params["moue"]["total"] - params["moue-nostate"]["total"] == 4 * 32
    assert params["moe"]["active"] - params["dense"]["active"] == 2 * 2 * 32
    seeds = {r["seed"]: r["val_loss"] for r in runs if r["variant"] == "moe"}
    assert seeds[1234] != seeds[1235]  # the seeds are different runs
    assert "| moue: MoUE, window 4, state, UELB |" in proc.stdout
    assert "EP-rank max/mean" in proc.stdout  # per layer, at --ep-ranks 4 (pool of 4: 1 each)
    assert all(r["ep_load_max_over_mean"] >= 1.0 for r in runs if r["variant"] != "dense")
    assert (tmp_path / "runs" / "quality.png").stat().st_size > 0


def test_every_quality_preset_builds_valid_matched_configs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality  # dataclasses look their module up there
    spec.loader.exec_module(quality)
    for name, preset in quality.PRESETS.items():
        params = {v: quality._params([*preset.shape, *overrides])
                  for v, (_, overrides) in quality.variants(preset).items()}
        # Same activated parameters up to the routers' rows and U: within 1% of the MoE's.
        for v, p in params.items():
            assert abs(p["active"] / params["moe"]["active"] - 1) < 0.01, (name, v, p)


def test_every_scaling_size_builds_valid_matched_configs():
    from benchmarks import scaling

    for name, series in scaling.SERIES.items():
        ep_ranks = 2 if name == "smoke" else 4  # the smoke test's --ep-ranks
        active = []
        for size in series["sizes"]:
            preset = size.preset(series["seq"], series["batch"], series["experts_per_layer"],
                                 series["eval_iters"])
            overrides = scaling.variants(preset, ep_ranks)
            params = {v: scaling._params([*preset.shape, *overrides[theirs][1]])
                      for v, theirs in scaling.VARIANTS.items()}
            for v, p in params.items():  # matched: the MoE's activated parameters within 1%
                assert abs(p["active"] / params["moe"]["active"] - 1) < 0.01, (name, size, v)
            active.append(params["moe"]["active"])
        assert active == sorted(active) and len(set(active)) == len(active)  # sizes grow


@pytest.mark.slow
def test_elastic_benchmark_trains_plain_and_elastic_and_tables_their_families(tmp_path):
    proc, figures = _smoke("benchmarks/elastic.py", tmp_path)
    runs = figures["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for v in ("plain", "elastic", "elastic-step") for s in (1234, 1235)]
    for run in runs:  # 2 x 2 x 2 family members, then k+1 and k+2
        labels = [row["submodel"] for row in run["family"]]
        assert len(labels) == 10 and labels[0] == "layers=4,experts=8,topk=2"
        assert labels[-2:] == ["layers=4,experts=8,topk=3", "layers=4,experts=8,topk=4"]
        assert abs(run["family"][0]["loss"] - run["val_loss"]) < 1e-5 * run["val_loss"]
    assert all(len(r["step_times"]) > 1 for r in runs if r["variant"] == "elastic-step")
    assert all(sorted(r["val_curve"]) == ["0", "4", "8"] for r in runs)  # JSON keys
    assert "ERNIE 5.0 ablation form" in proc.stdout and "| depth (4L / 3L) |" in proc.stdout
    assert "| elastic | " in proc.stdout.split("Full model against plain")[1]


@pytest.mark.slow
def test_scaling_benchmark_compares_the_variants_at_every_size(tmp_path):
    proc, figures = _smoke("benchmarks/scaling.py", tmp_path, "--ep-ranks", "2")
    runs = figures["runs"]
    sizes = ["hidden 32, 2 layers", "hidden 48, 3 layers"]
    assert [(r["size"], r["variant"], r["seed"]) for r in runs] == [
        (size, v, s) for size, seeds in zip(sizes, ((1234, 1235), (1234,)), strict=True)
        for v in ("moe", "moue", "dense") for s in seeds]
    small, large = (next(r for r in runs if r["size"] == s and r["variant"] == "moe")
                    for s in sizes)
    assert large["params_active"] > small["params_active"]
    assert large["train_flops"] > small["train_flops"] and large["tokens"] > small["tokens"]
    assert all(r["val_loss"] > 0 for r in runs)
    assert "| hidden 48, 3 layers |" in proc.stdout and "moue minus moe, paired" in proc.stdout
    assert (tmp_path / "runs" / "scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_conversion_benchmark_continues_base_as_moe_and_widened_moue(tmp_path):
    proc, figures = _smoke("benchmarks/conversion.py", tmp_path)
    assert [(r["variant"], r["seed"]) for r in figures["runs"]] == [
        (v, 1234) for v in ("moe-adam", "moe", "widened W=3 R=2", "widened W=4 R=2", "widened W=4 R=1",
                            "widened-state", "moue-scratch")]
    assert all(r["val_loss"] > 0 for r in figures["runs"])
    assert "| widened W=4 R=1: windows of 4, opened over 1 steps |" in proc.stdout
    assert "gain vs continued MoE with its Adam" in proc.stdout
    loss = {r["variant"]: r["val_loss"] for r in figures["runs"]}
    assert loss["moe-adam"] != loss["moe"]  # the same weights and data, another Adam state


@pytest.mark.slow
def test_conversion_memory_benchmark_measures_every_tool(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "benchmarks/conversion_memory.py", "--preset", "smoke",
                           "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["tool"] for r in rows] == ["transformers", "moue import", "moue export",
                                         "import 2 procs", "export 2 procs"]
    assert all(r["peak_rss"] > r["model_bytes"] > 0 and r["seconds"] > 0 for r in rows)
    assert "peak RSS GB" in proc.stdout


@pytest.mark.slow
def test_ep_balance_benchmark_reports_every_variant_and_layer(tmp_path):
    from data_tools.corpus import build_stdlib_corpus
    from data_tools.preprocess import preprocess

    corpus = build_stdlib_corpus(tmp_path / "corpus", limit_bytes=2_000_000)
    preprocess([str(corpus.train)], str(tmp_path / "stdlib"), "byte", append_eod=True,
               progress=False)
    out = tmp_path / "ep.json"
    proc = subprocess.run([sys.executable, "benchmarks/ep_balance.py", "--preset", "smoke",
                           "--data", str(tmp_path / "stdlib"), "--work-dir", str(tmp_path / "runs"),
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 6 and all(len(r["1-4"]["by_layer"]) == 4 for r in results.values())
    assert all(r["1-4"]["worst_step"] >= 1.0 for r in results.values())
    assert "tokens per EP rank" in proc.stdout
    proc = subprocess.run([sys.executable, "benchmarks/ep_balance.py", "--preset", "smoke",
                           "--data", str(tmp_path / "stdlib"), "--work-dir", str(tmp_path / "b"),
                           "--batches", "8", "16", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(json.loads(out.read_text())["results"]) == [
        "shipped, 8 sequences per step", "shipped, 16 sequences per step"]
