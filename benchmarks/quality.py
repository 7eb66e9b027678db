"""Held-out loss: MoUE against the matched MoE baseline, trained side by side in one run.

Every variant trains with moue-pretrain on the same tokens in the same order (the built-in
standard-library corpus, byte tokenizer, unless ``--data`` names another dataset; ``data.seed``
fixed, so every run is also evaluated on the same held-out samples), with the same
initialisation seeds (``train.seed``, one run per seed and variant), the same activated
parameters per token (top-k experts of the same size) and, for the MoE variants, the same pool:
  moe           standard MoE: N private experts in each of the L layers (a pool of L*N)
  moue          rotational MoUE on the same L*N experts: windows of 2N with stride N (each
                expert reachable from 2 layers), trajectory state on, UELB balance
  moue-nostate  the same without the trajectory state
  moue-perlayer the same with per-layer balance instead of UELB
  moue-epbal    moue plus the per-layer balance over expert-parallel groups
                (moe.ep_balance_coeff, groups = --ep-ranks)
  moue-epbias   moue-epbal plus the selection bias per layer and EP group
                (moe.ep_balance_rate = --ep-rate)
  dense         no experts: every MLP as wide as top-k experts (same activated parameters)
Total parameters of the MoE variants differ only by the routers' window rows and U.

Reports the final held-out loss (mean +- std over seeds, and MoUE minus MoE paired by seed), the
pool load max/mean and its coefficient of variation, and the per-layer max/mean tokens per EP
rank at ``--ep-ranks`` (default 4) ranks (each a mean over the last 20% of steps), writes
``quality.png`` (validation curves) into the work directory, and ``--json PATH`` the figures.

    python benchmarks/quality.py --preset cpu          # 2 CPU cores, about 20 minutes
    python benchmarks/quality.py --preset gpu --json quality_gpu.json   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Preset:
    shape: tuple[str, ...]  # config overrides shared by every variant
    experts_per_layer: int  # N of the standard MoE
    seeds: int
    jobs: int  # runs at once (CPU: one per core)
    about: str


_TRAIN = ("train.warmup_steps={warmup}", "train.steps={steps}", "train.lr={lr}",
          "train.min_lr={min_lr}", "train.micro_batch_size={mbs}", "train.global_batch_size={gbs}",
          "train.eval_interval={eval_every}", "train.eval_iters={eval_iters}")


def model_shape(layers, hidden, heads, seq, expert_ffn, topk, **train) -> tuple[str, ...]:
    return (f"model.num_layers={layers}", f"model.hidden_size={hidden}",
            f"model.num_attention_heads={heads}", f"model.seq_length={seq}",
            "model.vocab_size=384", "model.moe_layer_freq=1",
            f"moe.expert_ffn_hidden_size={expert_ffn}", f"moe.topk={topk}",
            "moe.balance_coeff=0.01", "moe.dispatcher=alltoall", "parallel.ep=1",
            *(t.format(**train) for t in _TRAIN))


PRESETS = {
    # 4 layers, hidden 64, 16 experts of 64, top-2; 800 steps of 16 x 128 bytes (1.6M tokens).
    "cpu": Preset(model_shape(4, 64, 4, 128, 64, 2, warmup=40, steps=800, lr=3e-3, min_lr=3e-4, mbs=16,
                         gbs=16, eval_every=200, eval_iters=32),
                  experts_per_layer=4, seeds=2, jobs=2,
                  about="2 CPU cores, about 20 minutes"),
    # 8 layers, hidden 512, 64 experts of 512, top-2; 3000 steps of 32 x 512 bytes (49M tokens).
    "gpu": Preset(model_shape(8, 512, 8, 512, 512, 2, warmup=200, steps=3000, lr=1e-3, min_lr=1e-4,
                         mbs=32, gbs=32, eval_every=250, eval_iters=32),
                  experts_per_layer=8, seeds=3, jobs=1,
                  about="one GPU; not yet run on one"),
    # Two variants, a few steps: the benchmark's own test.
    "smoke": Preset(model_shape(2, 32, 2, 32, 32, 2, warmup=1, steps=6, lr=3e-3, min_lr=3e-4, mbs=4,
                           gbs=4, eval_every=3, eval_iters=2),
                    experts_per_layer=2, seeds=2, jobs=2, about="a few seconds"),
}


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                      "PMIX_RANK")
DATA_SEED = 1234  # one sample order and one held-out sample for every run; seeds vary the init


def variants(preset: Preset, ep_ranks: int = 4, ep_coeff: float = 0.1,
             ep_rate: float = 1e-3) -> dict[str, tuple[str, list[str]]]:
    """Name -> (description, overrides) of the compared models under a preset."""
    from moue.config import load_config

    shape = load_config(None, [*preset.shape, "data.mock=true"])
    n = preset.experts_per_layer
    pool = shape.model.num_layers * n
    moue = [f"moe.num_experts={pool}", "moe.topology=rotational", f"moe.window={2 * n}",
            f"moe.stride={n}", "moe.router_state_dim=32", "moe.balance=uelb"]
    epbal = [*moue, f"moe.ep_balance_coeff={ep_coeff}", f"moe.ep_balance_groups={ep_ranks}"]
    expert_ffn, topk = shape.moe.expert_ffn_hidden_size, shape.moe.topk
    return {
        "moe": (f"standard MoE, {n} experts per layer", [
            f"moe.num_experts={pool}", "moe.topology=standard", "moe.router_state_dim=0",
            "moe.balance=per_layer"]),
        "moue": (f"MoUE, window {2 * n}, state, UELB", moue),
        "moue-nostate": ("MoUE without the state", [*moue, "moe.router_state_dim=0"]),
        "moue-perlayer": ("MoUE, per-layer balance", [*moue, "moe.balance=per_layer"]),
        "moue-epbal": (f"MoUE + EP balance {ep_coeff}", epbal),
        "moue-epbias": (f"MoUE + EP balance {ep_coeff}, EP bias {ep_rate:g}", [
            *epbal, f"moe.ep_balance_rate={ep_rate}"]),
        "dense": (f"dense, MLP {topk} x {expert_ffn}", [
            "model.moe_layer_freq=0", f"model.ffn_hidden_size={topk * expert_ffn}"]),
    }


def prepare_data(work: Path) -> str:
    """The built-in corpus, byte-tokenized, once per work directory."""
    from data_tools.corpus import build_stdlib_corpus
    from data_tools.preprocess import preprocess

    prefix = work / "data" / "stdlib"
    if not Path(f"{prefix}.idx").exists():
        corpus = work / "corpus"
        if not (corpus / "train.jsonl").exists():
            build_stdlib_corpus(corpus)
        preprocess([str(corpus / "train.jsonl")], str(prefix), "byte", append_eod=True,
                   overwrite=True, progress=False)
    return str(prefix)


def train_run(name: str, seed: int, overrides: list[str], run_dir: Path, threads: int) -> dict:
    """One moue-pretrain run in its own process; returns its logged metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "moue.cli", *overrides, f"train.seed={seed}",
           f"logging.dir={run_dir}", "logging.interval=1"]
    # Each run is a world of its own: no rank variables of an enclosing launcher (srun, torchrun).
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = (run_dir / "train.log").read_text()[-2000:]
        raise RuntimeError(f"{name} seed {seed} failed (exit {code}); log {run_dir}/train.log:\n{tail}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"variant": name, "seed": seed, "seconds": time.perf_counter() - start, "rows": rows}


def _summarise(run: dict) -> dict:
    rows = run["rows"]
    steps = rows[-1]["step"]
    tail = [r for r in rows if r["step"] > 0.8 * steps and "load_cv" in r]
    mean = lambda key: statistics.fmean(r[key] for r in tail) if tail else None  # noqa: E731
    return {"variant": run["variant"], "seed": run["seed"], "seconds": run["seconds"],
            "val_loss": rows[-1]["val_loss"], "train_loss": rows[-1]["loss"],
            "load_max_over_mean": mean("load_max_over_mean"), "load_cv": mean("load_cv"),
            "ep_load_max_over_mean": mean("ep_load_max_over_mean"),
            "curve": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]}


def mean_std(values: list[float], sign: str = "") -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.4f} ± {std:.4f}"


def _params(overrides: list[str]) -> dict:
    from moue.config import load_config
    from moue.dry_run import report

    out = report(load_config(None, [*overrides, "data.mock=true"]), world_size=1)
    return {"total": out["params_total"], "active": out["params_active"],
            "train_flops_per_token": out["train_flops_per_token"]}


def table(results: list[dict], names: dict, params: dict) -> list[str]:
    """Markdown rows: one per variant, means over seeds; differences paired by seed."""
    base = {r["seed"]: r["val_loss"] for r in results if r["variant"] == "moe"}
    lines = ["| variant | params total | params active | held-out loss | minus MoE, paired | "
             "load max/mean | load CV | EP-rank max/mean |", "|---|---|---|---|---|---|---|---|"]
    for v, name in names.items():
        runs = [r for r in results if r["variant"] == v]
        diff = "—" if v == "moe" else mean_std([r["val_loss"] - base[r["seed"]] for r in runs], "+")
        loads = "— | — | —" if runs[0]["load_cv"] is None else (
            f"{statistics.fmean(r['load_max_over_mean'] for r in runs):.2f} | "
            f"{statistics.fmean(r['load_cv'] for r in runs):.3f} | "
            f"{statistics.fmean(r['ep_load_max_over_mean'] for r in runs):.2f}")
        lines.append(f"| {v}: {name} | {params[v]['total']:,} | {params[v]['active']:,} | "
                     f"{mean_std([r['val_loss'] for r in runs])} | {diff} | {loads} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in dict.fromkeys(r["variant"] for r in results):
        curves = [r["curve"] for r in results if r["variant"] == v]
        steps = [s for s, _ in curves[0]]
        by_step = list(zip(*[[loss for _, loss in c] for c in curves], strict=True))[1:]
        line, = ax.plot(steps[1:], [statistics.fmean(s) for s in by_step], label=v)  # no step 0
        ax.fill_between(steps[1:], [min(s) for s in by_step], [max(s) for s in by_step],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("validation loss: mean over seeds, band = min..max")
    save_figure(fig, ax, path)


def save_figure(fig, ax, path: Path) -> None:
    """The benchmarks' plots finished alike: legend, light grid, 120 dpi, closed."""
    import matplotlib.pyplot as plt

    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train MoUE, its ablations, the matched MoE and the dense model on the same "
                    "tokens and seeds; print held-out loss and pool balance side by side.",
        epilog="presets: " + "; ".join(f"{k} ({p.about})" for k, p in PRESETS.items()))
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: the preset's)")
    parser.add_argument("--variants", nargs="+", help="subset to train; moe is always included")
    parser.add_argument("--jobs", type=int, help="runs at once (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each run (OMP_NUM_THREADS; default 1, as the tests "
                             "pin it, so the figures do not depend on --jobs or the core count)")
    parser.add_argument("--data", help="prefix of a byte-tokenized dataset (default: build the "
                                       "built-in corpus in the work directory)")
    parser.add_argument("--work-dir", default="runs/quality", help="runs, logs and the plot")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--ep-ranks", type=int, default=4,
                        help="EP degree of the per-layer tokens-per-rank figure and of moue-epbal")
    parser.add_argument("--ep-coeff", type=float, default=0.1,
                        help="moe.ep_balance_coeff of the moue-epbal and moue-epbias variants")
    parser.add_argument("--ep-rate", type=float, default=1e-3,
                        help="moe.ep_balance_rate of the moue-epbias variant")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, "
                                                     "e.g. train.steps=400")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    names_overrides = variants(preset, args.ep_ranks, args.ep_coeff, args.ep_rate)
    chosen = ["moe", *(v for v in (args.variants or names_overrides) if v != "moe")]
    unknown = [v for v in chosen if v not in names_overrides]
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: choose from {', '.join(names_overrides)}")
    seeds = [1234 + i for i in range(args.seeds or preset.seeds)]
    jobs = args.jobs or preset.jobs
    work = Path(args.work_dir)
    data = args.data or prepare_data(work)
    shared = [*preset.shape, "data.mock=false", f"data.path={data}", "data.tokenizer=byte",
              f"data.seed={DATA_SEED}", f"logging.ep_balance_ranks={args.ep_ranks}",
              *args.overrides]
    plan = [(v, s) for s in seeds for v in chosen]
    threads = args.threads
    from tqdm import tqdm

    results = []
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(plan), desc="runs", unit="run") as bar:
        futures = [pool.submit(train_run, v, s, [*shared, *names_overrides[v][1]],
                               work / f"{v}-seed{s}", threads) for v, s in plan]
        for future in as_completed(futures):
            results.append(_summarise(future.result()))
            bar.set_postfix(last=f"{results[-1]['variant']}/{results[-1]['seed']}")
            bar.update(1)
    results.sort(key=lambda r: (chosen.index(r["variant"]), r["seed"]))
    names = {v: names_overrides[v][0] for v in chosen}
    params = {v: _params([*shared, *names_overrides[v][1]]) for v in chosen}
    steps = results[0]["curve"][-1][0]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} thread(s) per run"
               + gpu_name())
    print(f"\nHeld-out loss after {steps} steps, preset {args.preset}, seeds {seeds} - {machine}\n")
    for line in table(results, names, params):
        print(line)
    plot(results, work / "quality.png")
    print(f"\nvalidation curves: {work / 'quality.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "preset": args.preset, "seeds": seeds, "overrides": shared,
             "variants": {v: names_overrides[v][1] for v in chosen}, "params": params,
             "runs": results}, indent=2))
    return 0


def gpu_name() -> str:
    import torch

    return f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"


if __name__ == "__main__":
    raise SystemExit(main())
