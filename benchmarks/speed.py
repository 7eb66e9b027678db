"""Training-step time and peak memory: MoUE against the matched MoE baseline, side by side.

Variants (same shapes, same top-k, same activated parameters per token):
  (m) Megatron-Core's own MoE, built from its own local layer spec (4 layers x 4 experts, its
      Switch aux loss): the anchor that shows what the moue machinery costs
  (a) standard MoE: 4 layers x 4 private experts (16), top-2 (moue's standard topology)
  (b) rotational MoUE with the trajectory state: one pool of 8 experts shared by the 4 layers,
      windows of 4 with stride 2, top-2
  (c) the same MoUE without the state
  (d) dense: each layer's MLP as wide as 2 experts
  (e) the MoUE of (b) with elastic training on, drawing the full model every step: what the
      elastic machinery (the draw, putting the sub-model on the model) costs per step
A step is forward + backward + optimizer, on one process, then on 2 with EP=2 (the dense model:
DP=2), on CPU or on the GPU when present.

Time: the variants live in one process group and take their steps in turn (a, b, c, d, m, then
b, c, d, m, a, ...), so a slow spell of the machine hits them alike. The ratio to (a) is the median
of the per-step ratios, with their interquartile range. The dense model cannot run under EP=2,
so with 2 processes it is timed in its own run and its ratio is unpaired.
Memory: each variant alone in a process (peak RSS on CPU, peak allocated on GPU).
Prints a Markdown table; ``--json PATH`` writes the figures.

    python benchmarks/speed.py [--steps 20] [--json speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
ROOT = Path(__file__).resolve().parents[1]

SHAPE = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
         "model.seq_length=256", "model.vocab_size=512", "moe.expert_ffn_hidden_size=128",
         "moe.topk=2", "train.micro_batch_size=4", "train.global_batch_size=8",
         "train.warmup_steps=0", "moe.balance_coeff=0.01"]
VARIANTS = {
    "a": ("standard MoE", ["moe.topology=standard", "moe.num_experts=16", "moe.router_state_dim=0",
                           "moe.balance=per_layer"]),
    "b": ("MoUE, state", ["moe.topology=rotational", "moe.num_experts=8", "moe.window=4",
                          "moe.stride=2", "moe.router_state_dim=32", "moe.balance=uelb"]),
    "c": ("MoUE, no state", ["moe.topology=rotational", "moe.num_experts=8", "moe.window=4",
                             "moe.stride=2", "moe.router_state_dim=0", "moe.balance=uelb"]),
    "d": ("dense", ["model.moe_layer_freq=0", "model.ffn_hidden_size=256"]),  # 2 x 128
    "e": ("MoUE, state, elastic on (full model drawn)", [
        "moe.topology=rotational", "moe.num_experts=8", "moe.window=4", "moe.stride=2",
        "moe.router_state_dim=32", "moe.balance=uelb", "elastic.enabled=true",
        "elastic.layers_full_prob=1", "elastic.experts_full_prob=1", "elastic.topk_full_prob=1"]),
    "m": ("Megatron-Core MoE", ["moe.topology=standard", "moe.num_experts=16",
                                "moe.router_state_dim=0", "moe.balance=per_layer"]),
}
WARMUP = 3  # untimed steps first


def _megatron_moe_trainer():
    """A Trainer whose model is Megatron-Core's own GPT with MoE from its own layer spec (local,
    or Transformer Engine's where the run plan has it): N private experts per layer, Megatron's
    router and Switch aux loss (``moue.model.builder.build_megatron_moe``); the same engine
    steps it."""
    from moue.model.builder import build_megatron_moe
    from moue.training.trainer import Trainer

    class MegatronMoETrainer(Trainer):
        def build_module(self, megatron_config):
            cfg = self.cfg
            return build_megatron_moe(cfg.model, cfg.moe, megatron_config, self.pg, self.plan)

    return MegatronMoETrainer


def _build(variant: str, layout, steps: int):
    from moue.config import load_config
    from moue.training.trainer import Trainer
    from parallel import launch

    cfg = load_config(None, [*SHAPE, *VARIANTS[variant][1], f"parallel.ep={layout.ep}",
                             f"train.steps={steps + WARMUP}", f"logging.dir={tempfile.mkdtemp()}",
                             "train.eval_interval=0"])
    launch.seed_everything(cfg.train.seed)
    cls = _megatron_moe_trainer() if variant == "m" else Trainer
    return cls(cfg, layout, launch.resolve_device("auto"))


def _timed_step(trainer) -> float:
    import torch

    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    trainer.train_step()
    sync()
    return time.perf_counter() - start


def _timing_worker(variants: list[str], steps: int, out: str) -> None:
    """All ``variants`` in one process group, stepped in turn: step i of a, of b, ... (the order
    rotating), so a slow spell of the machine hits every variant alike."""
    import torch

    from parallel import launch
    from parallel.layout import ParallelLayout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = launch.init_distributed(
        ParallelLayout(world_size=world, ep=1 if variants == ["d"] else world), device="auto")
    trainers = {v: _build(v, layout, steps) for v in variants}
    for trainer in trainers.values():
        for _ in range(WARMUP):
            trainer.train_step()
    times = {v: [] for v in variants}
    for i in range(steps):
        for k in range(len(variants)):
            v = variants[(i + k) % len(variants)]
            times[v].append(_timed_step(trainers[v]))
    Path(f"{out}.rank{torch.distributed.get_rank()}").write_text(json.dumps(
        {"times": times, "device": trainers[variants[0]].device.type}))
    launch.shutdown()


def _memory_worker(variant: str, out: str) -> None:
    """One variant alone in its process: peak memory (and parameters) of this rank."""
    import resource

    import torch

    from parallel import launch
    from parallel.layout import ParallelLayout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = launch.init_distributed(
        ParallelLayout(world_size=world, ep=1 if variant == "d" else world), device="auto")
    trainer = _build(variant, layout, 2)
    for _ in range(WARMUP + 2):
        trainer.train_step()
    peak = (torch.cuda.max_memory_allocated() if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    Path(f"{out}.rank{torch.distributed.get_rank()}").write_text(json.dumps(
        {"peak_bytes": peak, "params": sum(p.numel() for p in trainer.model.parameters())}))
    launch.shutdown()


def _torchrun(nproc: int, *worker_args: str) -> list[dict]:
    out = tempfile.mktemp(prefix="moue-speed-")
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    # On GPUs Megatron's fusions are compiled (torch.compile), as in a real run; on CPUs
    # compilation only costs time.
    import torch

    env.update({"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if torch.cuda.is_available()
               else {"TORCHDYNAMO_DISABLE": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__)), *worker_args, "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(worker_args)} (nproc {nproc}) failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(nproc: int, variants: list[str], steps: int) -> list[dict]:
    """Rows for one process count: step time (interleaved) and peak memory (alone)."""
    # The dense model cannot take EP>1 (it has no experts): with 2 processes it runs apart.
    groups = [variants] if nproc == 1 else [[v for v in variants if v != "d"],
                                            *([["d"]] if "d" in variants else [])]
    times, device = {}, None
    for group in groups:
        ranks = _torchrun(nproc, "--time", ",".join(group), "--steps", str(steps))
        device = ranks[0]["device"]
        for v in group:  # a step lasts as long as its slowest rank
            times[v] = [max(step) for step in zip(*(r["times"][v] for r in ranks), strict=True)]
    rows = []
    for v in variants:
        memory = _torchrun(nproc, "--memory", v)
        paired = any(v in g and "a" in g for g in groups)
        ratios = ([t / b for t, b in zip(times[v], times["a"], strict=True)] if paired
                  else [_quantile(times[v], 0.5) / _quantile(times["a"], 0.5)])
        rows.append({"variant": v, "name": VARIANTS[v][0], "world": nproc,
                     "ep": 1 if v == "d" else nproc, "device": device,
                     "step_s": _quantile(times[v], 0.5), "times": times[v],
                     "ratio": _quantile(ratios, 0.5), "paired": paired,
                     "ratio_iqr": [_quantile(ratios, 0.25), _quantile(ratios, 0.75)],
                     "peak_bytes": max(r["peak_bytes"] for r in memory),
                     "params": memory[0]["params"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run; (a) is always included: ratios are to it")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time:
        _timing_worker(args.time.split(","), args.steps, args.out)
        return 0
    if args.memory:
        _memory_worker(args.memory, args.out)
        return 0
    chosen = ["a", *(v for v in args.variants if v != "a")]
    rows = [row for n in args.nproc for row in measure(n, chosen, args.steps)]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, device {rows[0]['device']}"
    print(f"Training step (forward+backward+optimizer), median of {args.steps} steps taken in "
          f"turn - {machine}\n")
    print("| processes | variant | params | step ms | ratio to (a) | ratio IQR | peak MB | "
          "ratio to (a) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["world"] == row["world"] and r["variant"] == "a")
        low, high = row["ratio_iqr"]
        spread = f"{low:.2f}-{high:.2f}" if row["paired"] else "separate run"
        print(f"| {row['world']} (ep={row['ep']}) | ({row['variant']}) {row['name']} | "
              f"{row['params']:,} | {row['step_s'] * 1e3:.1f} | {row['ratio']:.2f} | {spread} | "
              f"{row['peak_bytes'] / 2**20:.0f} | {row['peak_bytes'] / base['peak_bytes']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
