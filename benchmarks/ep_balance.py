"""Each MoE layer's tokens per expert-parallel rank (max over mean) under the shipped config, for
several balance settings side by side.

Trains ``examples/configs/tiny_cpu.yaml`` (elastic training off) on the built-in corpus once per
variant, in one process each, with the EP-balance term over ``--ep`` rank groups
(``moe.ep_balance_groups``) and the figure taken for ``--ep`` ranks
(``logging.ep_balance_ranks``): what a run under ``parallel.ep=--ep`` trains, since the loss and
the routing do not depend on the layout (the layout tests check it). Two runs at a time, one
thread each. Prints, per variant, each layer's mean max/mean over the windows of steps given,
the worst single step, the max/mean of each layer's tokens per rank summed over the window (the
lasting imbalance; what the per-step mean adds to it is each batch's own), and the final
held-out loss.

    python benchmarks/ep_balance.py --data runs/demo/data/stdlib            # ~8 minutes
    python benchmarks/ep_balance.py --data runs/demo/data/stdlib --batches 16 32 64
    python benchmarks/ep_balance.py --preset smoke --data DATA --work-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: overrides. The shipped config (the Switch term at 0.1), the term alone at a higher
# coefficient, and the selection bias per layer and rank group (moe.ep_balance_rate) with the
# term and without it.
SHIPPED = "coeff 0.1, no bias (shipped)"
VARIANTS = {SHIPPED: ["moe.ep_balance_coeff=0.1", "moe.ep_balance_rate=0"],
            "coeff 0.3, no bias": ["moe.ep_balance_coeff=0.3", "moe.ep_balance_rate=0"],
            "coeff 0.1, rate 3e-4": ["moe.ep_balance_coeff=0.1", "moe.ep_balance_rate=3e-4"],
            "coeff 0.1, rate 1e-3": ["moe.ep_balance_coeff=0.1", "moe.ep_balance_rate=1e-3"],
            "coeff 0.1, rate 3e-3": ["moe.ep_balance_coeff=0.1", "moe.ep_balance_rate=3e-3"],
            "rate 1e-3, no term": ["moe.ep_balance_coeff=0", "moe.ep_balance_rate=1e-3"]}
PRESETS = {"cpu": {"steps": 600, "windows": [(101, 200), (101, 600)]},
           "smoke": {"steps": 4, "windows": [(1, 4)]}}


def train(index: int, overrides: list[str], args, steps: int) -> Path:
    out = Path(args.work_dir) / f"variant{index}"
    cmd = [sys.executable, "-m", "moue.cli", "--config", "examples/configs/tiny_cpu.yaml",
           "parallel.ep=1", "data.mock=false", f"data.path={args.data}", "data.tokenizer=byte",
           f"moe.ep_balance_groups={args.ep}", f"logging.ep_balance_ranks={args.ep}",
           f"train.steps={steps}", f"train.warmup_steps={min(30, steps - 1)}",
           f"train.eval_interval={steps}", f"logging.dir={out}", "checkpoint.dir=null",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(overrides)}: moue-pretrain failed:\n{proc.stderr[-3000:]}")
    return out / "metrics.jsonl"


def figures(metrics: Path, windows: list[tuple[int, int]]) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "ep_load_max_over_mean_by_layer" in r]
    result = {"val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1]}
    for lo, hi in windows:
        window = [r for r in steps if lo <= r["step"] <= hi]
        chosen = [r["ep_load_max_over_mean_by_layer"] for r in window]
        # tokens per layer and rank summed over the window: the balance of the mean load
        summed_LR = [[sum(col) for col in zip(*layer, strict=True)]
                     for layer in zip(*(r["ep_rank_tokens_by_layer"] for r in window), strict=True)]
        result[f"{lo}-{hi}"] = {"by_layer": [statistics.mean(c) for c in zip(*chosen, strict=True)],
                                "worst_step": max(max(s) for s in chosen),
                                "of_mean_by_layer": [max(r) / statistics.mean(r) for r in summed_LR]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--data", required=True, help="a preprocessed dataset prefix (byte "
                        "tokenizer), e.g. runs/demo/data/stdlib from make demo")
    parser.add_argument("--ep", type=int, default=4, help="the EP degree (default 4)")
    parser.add_argument("--work-dir", default="/tmp/moue-ep-balance")
    parser.add_argument("--batches", type=int, nargs="+", metavar="B",
                        help="instead of the balance settings: the shipped config with B "
                        "sequences per step (train.global_batch_size), for each B: how much of "
                        "the per-step figure is each batch's own spread")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    variants = VARIANTS if not args.batches else {
        f"shipped, {b} sequences per step": [*VARIANTS[SHIPPED], f"train.global_batch_size={b}"]
        for b in args.batches}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = pool.map(lambda i: train(i, list(variants.values())[i], args, preset["steps"]),
                         range(len(variants)))
        runs = dict(zip(variants, paths, strict=True))
    results = {name: figures(path, preset["windows"]) for name, path in runs.items()}
    print(f"EP={args.ep}, {preset['steps']} steps, {time.perf_counter() - start:.0f} s\n")
    print("| variant | steps | max/mean tokens per EP rank, by layer (mean of steps) | worst step "
          "| of the window's summed tokens | held-out loss |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        for lo, hi in preset["windows"]:
            window = result[f"{lo}-{hi}"]
            layers = " / ".join(f"{x:.3f}" for x in window["by_layer"])
            of_mean = " / ".join(f"{x:.3f}" for x in window["of_mean_by_layer"])
            print(f"| {name} | {lo}-{hi} | {layers} | {window['worst_step']:.2f} | {of_mean} | "
                  f"{result['val_loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ep": args.ep, "preset": args.preset,
                                               "date": time.strftime("%Y-%m-%d"),
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
