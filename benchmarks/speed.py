"""Training-step time and peak memory: MoUE against the matched MoE baseline, side by side.

Variants (same shapes, same top-k, same activated parameters per token):
  (a) standard MoE: 4 layers x 4 private experts (16), top-2
  (b) rotational MoUE with the trajectory state: one pool of 8 experts shared by the 4 layers,
      windows of 4 with stride 2, top-2
  (c) the same MoUE without the state
  (d) dense: each layer's MLP as wide as 2 experts
Each runs forward + backward + optimizer step in its own process group (one process, then
2 processes with EP=2; the dense model uses DP=2), on CPU or on the GPU when present.
Prints a Markdown table with ratios to (a); ``--json PATH`` writes the figures.

    python benchmarks/speed.py [--steps 10] [--json speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
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
}


def _worker(variant: str, steps: int, out: str) -> None:
    """One variant under torchrun: median step time and peak memory of this rank."""
    import resource
    import time

    import torch

    from moue.config import load_config
    from moue.training import Trainer
    from parallel import launch

    name, overrides = VARIANTS[variant]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep = 2 if world == 2 and variant != "d" else 1
    cfg = load_config(None, [*SHAPE, *overrides, f"parallel.ep={ep}", f"train.steps={steps + 3}",
                             f"logging.dir={tempfile.mkdtemp()}", "train.eval_interval=0"])
    layout = launch.init_distributed(ep=ep, device="auto")
    launch.seed_everything(cfg.train.seed)
    device = launch.resolve_device("auto")
    trainer = Trainer(cfg, layout, device)
    times = []
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    Path(f"{out}.rank{torch.distributed.get_rank()}").write_text(json.dumps(
        {"variant": variant, "name": name, "world": world, "ep": ep,
         "step_s": sorted(times)[len(times) // 2], "peak_bytes": peak,
         "params": sum(p.numel() for p in trainer.model.parameters()), "device": device.type}))
    launch.shutdown()


def _run_variant(variant: str, nproc: int, steps: int) -> dict:
    out = tempfile.mktemp(prefix="moue-speed-")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(max(1, os.cpu_count() // nproc)),
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__)), "--worker", variant,
           "--steps", str(steps), "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"variant {variant} (nproc {nproc}) failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]
    return {**ranks[0], "step_s": max(r["step_s"] for r in ranks),
            "peak_bytes": max(r["peak_bytes"] for r in ranks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which variants to run; (a) is always included: ratios are to it")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.steps, args.out)
        return 0
    chosen = ["a", *(v for v in args.variants if v != "a")]
    rows = [_run_variant(v, n, args.steps) for n in args.nproc for v in chosen]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, device {rows[0]['device']}"
    print(f"Training step (forward+backward+optimizer), median of {args.steps} - {machine}\n")
    print("| processes | variant | params | step ms | ratio to (a) | peak MB | ratio to (a) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["world"] == row["world"] and r["variant"] == "a")
        print(f"| {row['world']} (ep={row['ep']}) | ({row['variant']}) {row['name']} | "
              f"{row['params']:,} | {row['step_s'] * 1e3:.1f} | {row['step_s'] / base['step_s']:.2f} | "
              f"{row['peak_bytes'] / 2**20:.0f} | {row['peak_bytes'] / base['peak_bytes']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
