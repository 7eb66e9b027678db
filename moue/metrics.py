"""Run logging: one JSON line per logged step, TensorBoard, and PNG plots at the end.

TensorBoard keys follow Megatron-LM where one exists (``lm loss``, ``learning-rate``,
``grad-norm``, ``iteration-time``, ``throughput``, ``lm loss validation``, ``lm loss validation
ppl``); MoUE adds ``moue/balance-loss``, ``moue/pool-load-max-over-mean``,
``moue/pool-load-cv`` and a per-layer x per-expert load heatmap image (``moue/expert-load``).
Only one rank writes (``parallel.reduce.is_logging_rank``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TB_NAMES = {"loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm",
            "iteration_time": "iteration-time", "tokens_per_s": "throughput",
            "val_loss": "lm loss validation", "val_ppl": "lm loss validation ppl",
            "balance_loss": "moue/balance-loss", "load_max_over_mean": "moue/pool-load-max-over-mean",
            "load_cv": "moue/pool-load-cv", "router_entropy": "moue/router-entropy", "tflops": "throughput/tflops", "mfu": "throughput/mfu"}


def load_figures(loads_LE: torch.Tensor) -> dict:
    """Pool load statistics of a step from its [L, E] assignment counts."""
    pool_E = loads_LE.sum(dim=0).float()
    mean = pool_E.mean().clamp(min=1e-9)
    return {"load_max_over_mean": (pool_E.max() / mean).item(),
            "load_cv": (pool_E.std(unbiased=False) / mean).item()}


def _heatmap(loads_LE: torch.Tensor, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = loads_LE.float() / loads_LE.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(max(4, loads_LE.shape[1] * 0.35), 1 + loads_LE.shape[0] * 0.4))
    image = ax.imshow(share.cpu().numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("pool expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the layer's assignments")
    fig.tight_layout()
    return fig


class MetricsLogger:
    def __init__(self, log_dir: str, metrics_file: str | None, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self.metrics_path = Path(metrics_file) if metrics_file else self.dir / "metrics.jsonl"
        self.writer = None
        self.last_loads = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            # A new run starts a new file. A resumed one keeps the rows up to its checkpoint and
            # drops any a crashed run logged after it, so every step appears once.
            kept = []
            if start_step and self.metrics_path.exists():
                kept = [line for line in self.metrics_path.read_text().splitlines()
                        if json.loads(line)["step"] <= start_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
            self.writer = SummaryWriter(str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict, loads_LE: torch.Tensor | None = None) -> None:
        if not self.enabled:
            return
        if loads_LE is not None:
            metrics = {**metrics, **load_figures(loads_LE)}
            self.last_loads = loads_LE.detach().cpu()
        if "val_loss" in metrics:
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if key in TB_NAMES and value is not None and math.isfinite(value):
                self.writer.add_scalar(TB_NAMES[key], value, step)
        for layer, value in enumerate(metrics.get("router_entropy_by_layer") or []):
            self.writer.add_scalar(f"moue/router-entropy/moe-layer-{layer}", value, step)

    def log_heatmap(self, step: int) -> None:
        if self.enabled and self.last_loads is not None:
            self.writer.add_figure("moue/expert-load", _heatmap(self.last_loads, f"step {step}"), step)

    def close(self) -> None:
        """Flush TensorBoard and write loss.png and expert_load.png into the log directory."""
        if not self.enabled:
            return
        self.writer.close()
        self._plots()

    def _plots(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.metrics_path.exists():
            return  # the run stopped before its first logged step
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.set_title("MoUE training")
        ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
                label="train loss")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "loss.png", dpi=120)
        if self.last_loads is not None:
            _heatmap(self.last_loads, "expert load, last step").savefig(self.dir / "expert_load.png",
                                                                         dpi=120)
        plt.close("all")


def report(log_dir: str) -> str:
    """A short account of a finished run: losses, and where its files are."""
    path = Path(log_dir) / "metrics.jsonl"
    every = [json.loads(line) for line in path.read_text().splitlines()]
    rows, val = [r for r in every if "loss" in r], [r for r in every if "val_loss" in r]
    lines = [f"trained {rows[-1]['step']} steps; train loss {rows[0]['loss']:.3f} -> "
             f"{rows[-1]['loss']:.3f}"]
    if val:
        lines.append(f"validation loss {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> "
                     f"{val[-1]['val_loss']:.3f} (step {val[-1]['step']})")
    lines += [f"metrics:     {path}", f"loss curve:  {Path(log_dir) / 'loss.png'}",
              f"expert load: {Path(log_dir) / 'expert_load.png'}",
              f"TensorBoard: tensorboard --logdir {Path(log_dir) / 'tensorboard'}"]
    checkpoints = Path(log_dir) / "checkpoints" / "latest"
    if checkpoints.exists():
        lines.append(f"checkpoint:  {checkpoints.parent / checkpoints.read_text().strip()} "
                     "(run the same command again to resume from it)")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(report(sys.argv[1]))
