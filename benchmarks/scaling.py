"""Held-out loss of the matched MoE, MoUE and the dense model at three sizes, side by side.

At each size, ``benchmarks/quality.py``'s comparison on the same tokens and seeds:
  moe         standard MoE: N private experts in each of the L layers (a pool of L*N)
  moue        MoUE with the shipped settings on the same pool: rotational windows of 2N with
              stride N, the trajectory state, UELB and the balance over expert-parallel ranks
              (quality.py's ``moue-epbal``)
  dense       every MLP as wide as top-k experts: the same activated parameters
The sizes grow hidden and depth together (hidden 64 / 4 layers, 96 / 6, 128 / 8 on the CPU
preset; N = 4 experts of the hidden size per layer, top-2) and the tokens grow with them, but
slower than a compute-optimal rule asks: Chinchilla's rule keeps tokens in proportion to
parameters (x2.9 and x6.3 here), which would take the largest size alone to about 6 hours on 2
CPU cores; the CPU preset grows them as the square root of the activated parameters (800, 1350,
2000 steps of 16 x 128 byte tokens), so the larger sizes see fewer tokens per parameter, and the
table says how many. Measured step times on 2 CPU cores (one thread per run): 0.16 / 0.30 /
0.52 s for the MoE and 0.19 / 0.34 / 0.54 s for MoUE at the three sizes; the preset takes about
1.5-2 hours.

Prints one row per size (held-out loss, mean +- std over seeds; MoUE and dense minus MoE paired
by seed; tokens per activated parameter; the training FLOPs; MoUE's per-layer tokens per EP
rank at ``--ep-ranks``), writes ``scaling.png`` (held-out loss against training FLOPs, one line
per variant) into the work directory, and ``--json PATH`` the figures.

    python benchmarks/scaling.py --preset cpu --json benchmarks/results_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import (  # noqa: E402
    DATA_SEED,
    Preset,
    _params,
    _summarise,
    gpu_name,
    mean_std,
    model_shape,
    prepare_data,
    save_figure,
    train_run,
    variants,
)

VARIANTS = {"moe": "moe", "moue": "moue-epbal", "dense": "dense"}  # name here: quality.py's


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    steps: int
    seeds: int

    @property
    def label(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers"

    def preset(self, seq: int, batch: int, experts_per_layer: int, eval_iters: int) -> Preset:
        shape = model_shape(self.layers, self.hidden, 4, seq, self.hidden, 2,
                            warmup=max(1, self.steps // 20), steps=self.steps, lr=3e-3,
                            min_lr=3e-4, mbs=batch, gbs=batch, eval_every=self.steps,
                            eval_iters=eval_iters)
        return Preset(shape, experts_per_layer, self.seeds, jobs=2, about=self.label)


SERIES = {
    # tokens in proportion to the square root of the MoE's activated parameters (181,824,
    # 519,648 and 1,153,152: x2.86 and x6.34), from 800 steps at the smallest size
    "cpu": dict(sizes=(Size(4, 64, 800, 3), Size(6, 96, 1350, 3), Size(8, 128, 2000, 2)),
                seq=128, batch=16, experts_per_layer=4, eval_iters=32,
                about="2 CPU cores, about 1.5-2 hours"),
    "smoke": dict(sizes=(Size(2, 32, 4, 2), Size(3, 48, 6, 1)), seq=32, batch=4,
                  experts_per_layer=2, eval_iters=2, about="under a minute"),
}


def run_series(name: str, data: str, work: Path, ep_ranks: int, jobs: int) -> list[dict]:
    """Every (size, variant, seed) run, the longest first so that the two cores stay busy."""
    series = SERIES[name]
    plan = []
    for size in series["sizes"]:
        preset = size.preset(series["seq"], series["batch"], series["experts_per_layer"],
                             series["eval_iters"])
        overrides = variants(preset, ep_ranks)
        shared = [*preset.shape, "data.mock=false", f"data.path={data}", "data.tokenizer=byte",
                  f"data.seed={DATA_SEED}", f"logging.ep_balance_ranks={ep_ranks}"]
        for variant, theirs in VARIANTS.items():
            config = [*shared, *overrides[theirs][1]]
            params = _params(config)
            for seed in range(1234, 1234 + size.seeds):
                plan.append((size, variant, seed, config, params))
    plan.sort(key=lambda p: -p[0].steps * p[0].hidden ** 2 * p[0].layers)
    from tqdm import tqdm

    results = []
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(plan), desc="runs", unit="run") as bar:
        futures = {pool.submit(train_run, variant, seed, config,
                               work / f"{size.hidden}x{size.layers}" / f"{variant}-seed{seed}",
                               1): (size, params) for size, variant, seed, config, params in plan}
        for future in as_completed(futures):
            size, params = futures[future]
            tokens = size.steps * series["batch"] * series["seq"]
            results.append({**_summarise(future.result()), "size": size.label,
                            "params_active": params["active"], "tokens": tokens,
                            "train_flops": params["train_flops_per_token"] * tokens})
            bar.update(1)
    order = [s.label for s in series["sizes"]]
    results.sort(key=lambda r: (order.index(r["size"]), list(VARIANTS).index(r["variant"]),
                                r["seed"]))
    return results


def table(results: list[dict]) -> list[str]:
    lines = ["| size | params active (MoE) | tokens / active param | training TFLOP (MoE) "
             "| moe | moue | dense | moue minus moe, paired | dense minus moe, paired "
             "| moue EP-rank max/mean |", "|---" * 10 + "|"]
    for size in dict.fromkeys(r["size"] for r in results):
        runs = {v: [r for r in results if r["size"] == size and r["variant"] == v]
                for v in VARIANTS}
        base = {r["seed"]: r["val_loss"] for r in runs["moe"]}
        moe = runs["moe"][0]
        paired = {v: mean_std([r["val_loss"] - base[r["seed"]] for r in runs[v]], "+")
                  for v in ("moue", "dense")}
        losses = " | ".join(mean_std([r["val_loss"] for r in runs[v]]) for v in VARIANTS)
        ep = statistics.fmean(r["ep_load_max_over_mean"] for r in runs["moue"])
        lines.append(f"| {size} | {moe['params_active']:,} | "
                     f"{moe['tokens'] / moe['params_active']:.1f} | {moe['train_flops'] / 1e12:.1f} "
                     f"| {losses} | {paired['moue']} | {paired['dense']} | {ep:.2f} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        points = {}
        for r in results:
            if r["variant"] == variant:
                points.setdefault(r["size"], []).append((r["train_flops"], r["val_loss"]))
        xs = [statistics.fmean(f for f, _ in p) for p in points.values()]
        ys = [statistics.fmean(v for _, v in p) for p in points.values()]
        ax.plot(xs, ys, marker="o", label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6 x applied parameters per token + attention, x tokens)")
    ax.set_ylabel("held-out loss (nats/token), mean over seeds")
    ax.set_title("held-out loss against training compute, one point per size")
    save_figure(fig, ax, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="presets: " + "; ".join(f"{k} ({v['about']})" for k, v in SERIES.items()))
    parser.add_argument("--preset", choices=list(SERIES), default="cpu")
    parser.add_argument("--data", help="prefix of a byte-tokenized dataset (default: build the "
                                       "built-in corpus in the work directory)")
    parser.add_argument("--work-dir", default="runs/scaling", help="runs, logs and the plot")
    parser.add_argument("--ep-ranks", type=int, default=4,
                        help="EP degree of MoUE's EP-rank balance and of its figure")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--from-json", metavar="PATH",
                        help="train nothing: print the table and draw the plot of the figures "
                             "a previous --json wrote")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if args.from_json:
        recorded = json.loads(Path(args.from_json).read_text())
        results, machine, preset = recorded["runs"], recorded["machine"], recorded["preset"]
    else:
        data = args.data or prepare_data(work)
        results = run_series(args.preset, data, work, args.ep_ranks, args.jobs)
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread per run" + gpu_name()
        preset = args.preset
    minutes = sum(r["seconds"] for r in results) / 60
    print(f"\nHeld-out loss by size, preset {preset} - {machine}; {minutes:.0f} run-minutes "
          f"in all\n")
    for line in table(results):
        print(line)
    work.mkdir(parents=True, exist_ok=True)
    plot(results, work / "scaling.png")
    print(f"\nloss against training FLOPs: {work / 'scaling.png'}")
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "preset": args.preset, "data_seed": DATA_SEED,
             "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
