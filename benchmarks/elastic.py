"""Elastic training: plain against elastic MoUE on the same tokens and steps, then the family.

Trainings of the same rotational MoUE (pool of L*N, windows of 2N with stride N, trajectory
state, UELB), on the same tokens in the same order and the same seeds:
  plain          elastic.enabled=false
  elastic        elastic.enabled=true alone: the default granularity, micro-batches (ERNIE 5.0's
                 code: 3 of each step's 4 micro-batches on the full model; in the 4th, per
                 sample, full depth 0.75 else 3/4 of the layers, full width 0.8 else half the
                 pool, and per MoE layer with 0.2 a top-k split of k x B over the samples, 1..2k-1)
  elastic-step   one sub-model per optimizer step (elastic.granularity=step; the same axis
                 probabilities, smaller k only)
  elastic-nested elastic with nested width (the first experts of each block, always the same
                 ones: the set evaluation and export use); not in the default set
  elastic-emoe   elastic-step plus Elastic MoE's options: co-activation sampling (probability
                 0.3, k_ideal = k+2) and router sharpening (0.01); not in the default set
Then ``moue-eval --family`` of each final checkpoint (every combination of depth, width and top-k,
fixed sets: spread layers, the first experts of each block) and the larger top-k ``k+1``,
``k+2``, all on the same held-out batches. Reports
- the family table: held-out loss of every sub-model for each training (mean ± std over seeds);
- the ERNIE 5.0 ablation's form: per axis the full model plain vs elastic, and the reduced one;
- the step time of each sub-model the elastic run drew, relative to its full-model steps.

    python benchmarks/elastic.py --preset cpu          # 2 CPU cores, about 25 minutes
    python benchmarks/elastic.py --preset trend        # plain vs elastic at 3200 steps, ~30 min
    python benchmarks/elastic.py --preset gpu --json elastic_gpu.json   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import (  # noqa: E402
    DATA_SEED,
    LAUNCHER_VARIABLES,
    gpu_name,
    mean_std,
    model_shape,
    prepare_data,
    train_run,
)


@dataclass(frozen=True)
class Preset:
    shape: tuple[str, ...]
    experts_per_layer: int  # N: pool L*N, windows 2N, stride N
    topk: int
    seeds: int
    jobs: int
    about: str
    variants: tuple[str, ...] = ("plain", "elastic", "elastic-step")


PRESETS = {
    # The quality benchmark's CPU model: 4 layers, hidden 64, 16 experts of 64, top-2, 800 steps.
    # Micro-batches of 4: a step of 4, so that elastic micro-batches can be 1 of them.
    "cpu": Preset(model_shape(4, 64, 4, 128, 64, 2, warmup=40, steps=800, lr=3e-3, min_lr=3e-4,
                              mbs=4, gbs=16, eval_every=200, eval_iters=32),
                  experts_per_layer=4, topk=2, seeds=3, jobs=2, about="2 CPU cores, about 25 minutes"),
    # The same at 4x the steps (6.6M tokens): does the full model's gap shrink with training?
    "trend": Preset(model_shape(4, 64, 4, 128, 64, 2, warmup=40, steps=3200, lr=3e-3,
                                min_lr=3e-4, mbs=4, gbs=16, eval_every=800, eval_iters=32),
                    experts_per_layer=4, topk=2, seeds=2, jobs=2, about="2 CPU cores, ~35 minutes",
                    variants=("plain", "elastic")),
    # 8 layers, hidden 512, 64 experts of 512, top-4; 3000 steps of 32 x 512 bytes.
    "gpu": Preset(model_shape(8, 512, 8, 512, 512, 4, warmup=200, steps=3000, lr=1e-3,
                              min_lr=1e-4, mbs=8, gbs=32, eval_every=250, eval_iters=32),
                  experts_per_layer=8, topk=4, seeds=2, jobs=1, about="one GPU; not yet run on one"),
    "smoke": Preset(model_shape(4, 32, 2, 32, 32, 2, warmup=1, steps=8, lr=3e-3, min_lr=3e-4,
                                mbs=1, gbs=4, eval_every=4, eval_iters=2),
                    experts_per_layer=2, topk=2, seeds=2, jobs=2, about="a few seconds"),
}


def variants(preset: Preset) -> dict[str, list[str]]:
    n, layers = preset.experts_per_layer, _layers(preset)
    moue = [f"moe.num_experts={layers * n}", "moe.topology=rotational", f"moe.window={2 * n}",
            f"moe.stride={n}", "moe.router_state_dim=32", "moe.balance=uelb"]
    elastic = [*moue, "elastic.enabled=true"]
    step = [*elastic, "elastic.granularity=step"]
    return {"plain": moue, "elastic": elastic, "elastic-step": step,
            "elastic-nested": [*elastic, "elastic.experts_policy=nested"],
            "elastic-emoe": [*step, "elastic.coactivation_prob=0.3",
                             f"elastic.k_ideal={preset.topk + 2}", "elastic.sharpen_coeff=0.01"]}


def _layers(preset: Preset) -> int:
    return next(int(o.split("=")[1]) for o in preset.shape if o.startswith("model.num_layers="))


def evaluate_family(run_dir: Path, topk: int, threads: int) -> list[dict]:
    """moue-eval --family (plus top-k k+1 and k+2) of a run's final checkpoint."""
    out = run_dir / "family.json"
    cmd = [sys.executable, "-m", "moue.cli", "eval", "--load", str(run_dir / "ckpt"), "--family",
           "--submodel", f"topk={topk + 1}", "--submodel", f"topk={topk + 2}", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"moue-eval of {run_dir} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())["rows"]


def step_times(rows: list[dict]) -> dict[str, float]:
    """Mean step time per sub-model over the run's last 90% of steps (after warm-up)."""
    last = rows[-1]["step"]
    by_label: dict[str, list[float]] = {}
    for r in rows:
        if "submodel" in r and r["step"] > 0.1 * last:
            by_label.setdefault(r["submodel"], []).append(r["iteration_time"])
    return {k: statistics.fmean(v) for k, v in by_label.items()}


def family_table(results: list[dict], names: list[str]) -> list[str]:
    labels = [r["submodel"] for r in results[0]["family"]]
    head = "| sub-model | params total | params active | fwd MFLOP/token | " + " | ".join(names) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(names)]
    for label in labels:
        row = next(r for r in results[0]["family"] if r["submodel"] == label)
        cells = []
        for v in names:
            losses = [next(x["loss"] for x in r["family"] if x["submodel"] == label)
                      for r in results if r["variant"] == v]
            cells.append(mean_std(losses))
        lines.append(f"| {label} | {row['params_total']:,} | {row['params_active']:,} | "
                     f"{row['fwd_flops_per_token'] / 1e6:.2f} | " + " | ".join(cells) + " |")
    return lines


def _loss(results, variant, label) -> list[float]:
    return [next(x["loss"] for x in r["family"] if x["submodel"] == label)
            for r in results if r["variant"] == variant]


def ablation_table(results: list[dict], full: tuple[int, int, int], reduced: tuple) -> list[str]:
    """ERNIE 5.0's form: per axis, the full model plain vs elastic, then the reduced value."""
    layers, experts, k = full
    label = lambda d, m, t: f"layers={d},experts={m},topk={t}"  # noqa: E731
    axes = [("depth", label(layers, experts, k), label(reduced[0], experts, k),
             f"{layers}L", f"{reduced[0]}L"),
            ("width", label(layers, experts, k), label(layers, reduced[1], k),
             f"{experts}e", f"{reduced[1]}e"),
            ("top-k", label(layers, experts, k), label(layers, experts, reduced[2]),
             f"k{k}", f"k{reduced[2]}")]
    lines = ["| axis | plain, full | elastic, full | plain, reduced | elastic, reduced |",
             "|---|---|---|---|---|"]
    for axis, whole, part, a, b in axes:
        cells = [mean_std(_loss(results, v, lbl)) for lbl in (whole, part)
                 for v in ("plain", "elastic")]
        lines.append(f"| {axis} ({a} / {b}) | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return lines


def _paired(results, variant, label, base="plain", base_label=None) -> list[float]:
    """Per seed: the variant's loss of ``label`` minus the base's of ``base_label``."""
    mine = {r["seed"]: r for r in results if r["variant"] == variant}
    other = {r["seed"]: r for r in results if r["variant"] == base}
    loss = lambda r, lbl: next(x["loss"] for x in r["family"] if x["submodel"] == lbl)  # noqa: E731
    return [loss(mine[s], label) - loss(other[s], base_label or label)
            for s in sorted(mine) if s in other]


def summary_table(results: list[dict], names: list[str], full: tuple, topk: int) -> list[str]:
    """The full model against plain (paired by seed), and top-k k+1 against each run's own k."""
    whole = f"layers={full[0]},experts={full[1]},topk={full[2]}"
    wider = f"layers={full[0]},experts={full[1]},topk={topk + 1}"
    lines = ["Full model against plain (paired by seed), and k+1 against the same run's k:", "",
             "| variant | full model | minus plain | minus plain, % | k+1 minus k |",
             "|---|---|---|---|---|"]
    plain = [_loss(results, "plain", whole)] if "plain" in names else []
    for v in names:
        gap = _paired(results, v, whole) if plain else []
        rel = [100 * g / p for g, p in zip(gap, plain[0], strict=True)] if gap else []
        extra = _paired(results, v, wider, base=v, base_label=whole)
        lines.append(f"| {v} | {mean_std(_loss(results, v, whole))} | "
                     f"{mean_std(gap) if gap else '-'} | {mean_std(rel) if rel else '-'} | "
                     f"{mean_std(extra)} |")
    return lines


def curve_table(results: list[dict], names: list[str]) -> list[str]:
    """Held-out loss of the full model at each evaluation during training."""
    steps = sorted({int(k) for r in results for k in r["val_curve"]} - {0})
    lines = ["Held-out loss of the full model during training:", "",
             "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in steps:
        cells = [mean_std([r["val_curve"][step] for r in results
                           if r["variant"] == v and step in r["val_curve"]]) for v in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a MoUE model plainly and elastically on the same tokens, then print "
                    "the held-out loss of every sub-model of both side by side.",
        epilog="presets: " + "; ".join(f"{k} ({p.about})" for k, p in PRESETS.items()))
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: the preset's)")
    parser.add_argument("--variants", nargs="+", choices=list(variants(PRESETS["smoke"])),
                        help="trainings to compare (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs at once (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each run (OMP_NUM_THREADS; default 1, as the tests "
                             "pin it, so the figures do not depend on --jobs or the core count)")
    parser.add_argument("--data", help="prefix of a byte-tokenized dataset (default: the "
                                       "built-in corpus, built in the work directory)")
    parser.add_argument("--work-dir", default="runs/elastic", help="runs, logs, checkpoints")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    seeds = [1234 + i for i in range(args.seeds or preset.seeds)]
    jobs = args.jobs or preset.jobs
    work = Path(args.work_dir)
    data = args.data or prepare_data(work)
    shared = [*preset.shape, "data.mock=false", f"data.path={data}", "data.tokenizer=byte",
              f"data.seed={DATA_SEED}", *args.overrides]
    every = variants(preset)
    names = {v: every[v] for v in (args.variants or preset.variants)}
    threads = args.threads
    plan = [(v, s) for s in seeds for v in names]
    from tqdm import tqdm

    def one(v, s):
        run_dir = work / f"{v}-seed{s}"
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # a rerun trains afresh
        run = train_run(v, s, [*shared, *names[v], f"checkpoint.dir={run_dir / 'ckpt'}",
                               "checkpoint.interval=0"], run_dir, threads)
        return {"variant": v, "seed": s, "seconds": run["seconds"],
                "val_loss": run["rows"][-1]["val_loss"], "step_times": step_times(run["rows"]),
                "val_curve": {r["step"]: r["val_loss"] for r in run["rows"] if "val_loss" in r},
                "family": evaluate_family(run_dir, preset.topk, threads)}

    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(plan), desc="runs", unit="run") as bar:
        futures = {pool.submit(one, v, s): (v, s) for v, s in plan}
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
    results.sort(key=lambda r: (list(names).index(r["variant"]), r["seed"]))
    from moue.config import load_config

    cfg = load_config(None, [*preset.shape, *every["elastic"], "data.mock=true"])
    c = cfg.elastic_choices()
    full, reduced = (c.num_layers, c.num_experts, c.full_topk), (c.layers[-1], c.experts[-1], c.topk[0])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} thread(s) per run"
               + gpu_name())
    print(f"\nHeld-out loss of every sub-model, preset {args.preset}, seeds {seeds} - {machine}\n")
    lines = family_table(results, list(names))
    if {"plain", "elastic"} <= set(names):
        lines += ["", "ERNIE 5.0 ablation form (held-out loss):", "",
                  *ablation_table(results, full, reduced)]
    lines += ["", *summary_table(results, list(names), full, preset.topk),
              "", *curve_table(results, list(names))]
    times = [r["step_times"] for r in results if r["variant"] == "elastic-step"]
    whole = f"layers={full[0]},experts={full[1]},topk={full[2]}"
    lines += ["", "Step time of each sub-model the elastic runs drew, relative to their full-model "
              "steps:", "", "| sub-model | steps' time / full model's |", "|---|---|"]
    order = [r["submodel"] for r in results[0]["family"]]
    for label in sorted({k for t in times for k in t}, key=order.index):
        ratios = [t[label] / t[whole] for t in times if label in t and whole in t]
        if ratios:
            lines.append(f"| {label} | {mean_std(ratios)} ({len(ratios)} runs) |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "preset": args.preset, "seeds": seeds, "overrides": shared,
             "variants": names, "runs": results, "tables": lines}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
