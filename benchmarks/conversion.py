"""Held-out loss of continuing a trained standard MoE as itself or as a progressively widened MoUE.

Per seed, on the same tokens in the same order (``benchmarks/quality.py``'s data and shape):
  base            a standard MoE (N experts in each of L layers) trained for S1 steps
and then, each for S2 more steps from base's weights, reading the train split from where base
stopped (sample S1 x G: ``moue-export`` and ``moue-convert widen`` write ``data.start_sample``),
with a warmup + cosine schedule of S2 steps:
  moe-adam        the standard continuation: the same standard MoE with base's Adam state
                  (``checkpoint.init`` of base's training checkpoint, ``init_optimizer=true``)
and, with a fresh Adam state, as a changed architecture must start:
  moe             the same standard MoE (``moue-export`` of the full model)
  widened W/R     ``moue-convert widen``: rotational windows of W experts opened over R steps,
                  swept over the preset's windows at its middle ramp and over its ramps at 2N
  widened-state   windows of 2N at the middle ramp, with the trajectory state added
beside
  moue-scratch    the rotational MoUE (windows of 2N) with the state trained from scratch for
                  S1 + S2 steps on the same S1 + S2 distinct batches.
Every variant ends after S1 + S2 steps on S1 + S2 distinct batches and is evaluated on the same
held-out samples; the table gives the final held-out loss (mean +- std over seeds), its
difference from the continued MoE paired by seed, and the gain relative to it:
``(loss_moe - loss) / loss_moe`` in percent (positive: lower loss than continuing the MoE),
and the same gain relative to ``moe-adam``.

    python benchmarks/conversion.py --preset cpu     # 2 CPU cores, 11-16 minutes
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
    experts_per_layer: int
    first: int  # S1
    second: int  # S2
    ramps: tuple[int, ...]  # R, swept at 2N; the middle one is the window sweep's
    windows: tuple[int, ...]  # W, swept at the middle ramp; must hold 2N
    seeds: int
    about: str

    @property
    def ramp(self) -> int:
        return self.ramps[len(self.ramps) // 2]


def _shape(layers, hidden, heads, seq, expert_ffn, topk, steps, mbs, eval_iters):
    return model_shape(layers, hidden, heads, seq, expert_ffn, topk, warmup=0, steps=steps,
                       lr=3e-3, min_lr=3e-4, mbs=mbs, gbs=mbs, eval_every=0,
                       eval_iters=eval_iters)


PRESETS = {
    # 4 layers, hidden 64, 4 experts of 64 per layer, top-2; 16 x 128 bytes per step.
    "cpu": Preset(_shape(4, 64, 4, 128, 64, 2, 1, 16, 32), experts_per_layer=4, first=400,
                  second=400, ramps=(50, 100, 200), windows=(6, 8, 12), seeds=2,
                  about="2 CPU cores, 11-16 minutes"),
    "smoke": Preset(_shape(2, 32, 2, 32, 32, 2, 1, 4, 2), experts_per_layer=2, first=3,
                    second=3, ramps=(1, 2), windows=(3, 4), seeds=1, about="about a minute"),
}


def variants(preset: Preset) -> dict[str, tuple[str, int, int, bool]]:
    """name -> (description, window, ramp, state) of the widened continuations."""
    n = preset.experts_per_layer
    grid = [(w, preset.ramp) for w in preset.windows] + [(2 * n, r) for r in preset.ramps]
    out = {f"widened W={w} R={r}": (f"windows of {w}, opened over {r} steps", w, r, False)
           for w, r in dict.fromkeys(grid)}
    out["widened-state"] = (f"windows of {2 * n} over {preset.ramp}, + trajectory state",
                            2 * n, preset.ramp, True)
    return out


def _steps(total: int, warmup: int) -> list[str]:
    return [f"train.steps={total}", f"train.warmup_steps={warmup}",
            f"train.eval_interval={total}"]


def _cli(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "moue.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"moue {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")


def one_seed(preset: Preset, shared: list[str], work: Path, seed: int) -> list[dict]:
    """base, its three continuations and MoUE from scratch, for one seed (runs in sequence)."""
    n = preset.experts_per_layer
    layers = int(next(o for o in preset.shape if o.startswith("model.num_layers=")).split("=")[1])
    standard = [f"moe.num_experts={layers * n}", "moe.topology=standard",
                "moe.router_state_dim=0", "moe.balance=per_layer"]
    moue = [f"moe.num_experts={layers * n}", "moe.topology=rotational", f"moe.window={2 * n}",
            f"moe.stride={n}", "moe.router_state_dim=32", "moe.balance=uelb"]
    root = work / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base" / "ckpt"
    warm = max(1, preset.second // 20)
    train_run("base", seed, [*shared, *standard, *_steps(preset.first, warm),
                             f"checkpoint.dir={base}"], root / "base", 1)
    starts = {"moe": ("export", "--load", str(base), "--submodel",
                      f"layers={layers},experts={layers * n},topk=2", "--output")}
    for name, (_, window, ramp, state) in variants(preset).items():
        starts[name] = ("convert", "widen", "--load", str(base), "--window", str(window),
                        "--steps", str(ramp), *(["moe.router_state_dim=32"] if state else []),
                        "--output")
    batch = int(next(o for o in shared if o.startswith("train.global_batch_size=")).split("=")[1])
    results = [train_run("moe-adam", seed, [
        *shared, *standard, *_steps(preset.second, warm), f"checkpoint.init={base}",
        "checkpoint.init_optimizer=true", f"data.start_sample={preset.first * batch}"],
        root / "moe-adam", 1)]
    for name, start in starts.items():
        ckpt = root / name.replace(" ", "_").replace("=", "") / "ckpt"
        _cli(*start, str(ckpt))
        run = train_run(name, seed, [
            "--config", str(ckpt / "config.yaml"), f"checkpoint.dir={ckpt}",
            *_steps(preset.second, warm), *[o for o in shared if o.startswith(("data.", "train.micro", "train.global"))]],
            ckpt.parent, 1)
        results.append(run)
    results.append(train_run("moue-scratch", seed, [
        *shared, *moue, *_steps(preset.first + preset.second, warm)], root / "moue-scratch", 1))
    return results


def _gain(runs: list[dict], reference: dict[int, float]) -> str:
    """Mean +- std over seeds of ``(reference - loss) / reference`` in percent, paired by seed."""
    gains = [100 * (reference[r["seed"]] - r["val_loss"]) / reference[r["seed"]] for r in runs]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return f"{statistics.fmean(gains):+.2f}% ± {spread:.2f}%"


def table(results: list[dict], preset: Preset) -> list[str]:
    by_seed = {v: {r["seed"]: r["val_loss"] for r in results if r["variant"] == v}
               for v in ("moe", "moe-adam")}
    names = {"moe-adam": "standard MoE, continued with its Adam state",
             "moe": "standard MoE, continued with a fresh Adam",
             **{k: v[0] for k, v in variants(preset).items()},
             "moue-scratch": "MoUE from scratch"}
    lines = ["| variant | held-out loss | minus continued MoE, paired | gain vs continued MoE "
             "| gain vs continued MoE with its Adam |", "|---|---|---|---|---|"]
    for v, name in names.items():
        runs = [r for r in results if r["variant"] == v]
        diff = "—" if v == "moe" else mean_std(
            [r["val_loss"] - by_seed["moe"][r["seed"]] for r in runs], "+")
        gain = "—" if v == "moe" else _gain(runs, by_seed["moe"])
        gain_adam = "—" if v == "moe-adam" else _gain(runs, by_seed["moe-adam"])
        lines.append(f"| {v}: {name} | {mean_std([r['val_loss'] for r in runs])} | {diff} "
                     f"| {gain} | {gain_adam} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="presets: " + "; ".join(
                                         f"{k} ({p.about})" for k, p in PRESETS.items()))
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--data", help="prefix of a byte-tokenized dataset (default: build the "
                                       "built-in corpus in the work directory)")
    parser.add_argument("--work-dir", default="runs/conversion")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    work = Path(args.work_dir)
    data = args.data or prepare_data(work)
    shared = [*preset.shape, "data.mock=false", f"data.path={data}", "data.tokenizer=byte",
              f"data.seed={DATA_SEED}"]
    seeds = [1234 + i for i in range(preset.seeds)]
    with ThreadPoolExecutor(min(len(seeds), os.cpu_count() or 1)) as pool:
        runs = [r for rs in pool.map(lambda s: one_seed(preset, shared, work, s), seeds)
                for r in rs]
    results = [{"variant": r["variant"], "seed": r["seed"], "seconds": r["seconds"],
                "val_loss": next(x["val_loss"] for x in reversed(r["rows"]) if "val_loss" in x)}
               for r in runs]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs" + gpu_name()
    print(f"\nHeld-out loss after {preset.first} + {preset.second} steps, the continuations on "
          f"unseen data, preset {args.preset}, seeds {seeds} - {machine}\n")
    for line in table(results, preset):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "preset": args.preset, "seeds": seeds, "overrides": shared,
             "first": preset.first, "second": preset.second, "ramps": preset.ramps,
             "windows": preset.windows,
             "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
