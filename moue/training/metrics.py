"""What a run measures each step, and where it goes: metrics.jsonl, TensorBoard, PNG plots.

``step_figures`` turns a step's raw outputs (loss, grad norm, the pool's [L, E] assignment
counts, Megatron's aux-loss tracker) into the logged figures; ``StepClock`` times a step
(tokens/s, TFLOP/s, MFU); ``MetricsLogger`` writes one JSON line per logged step and TensorBoard.

TensorBoard keys follow Megatron-LM where one exists (``lm loss``, ``learning-rate``,
``grad-norm``, ``iteration-time``, ``throughput``, ``lm loss validation``, ``lm loss validation
ppl``); MoUE adds ``moue/balance-loss``, ``moue/pool-load-max-over-mean``, ``moue/pool-load-cv``,
``moue/ep-load-max-over-mean`` (overall and per layer), router entropy per layer, and a
per-layer x per-expert load heatmap image (``moue/expert-load``). Only one rank writes
(``parallel.reduce.is_logging_rank``).

Elastic runs log each step's sub-model (``submodel``, ``submodel_layers``, ``submodel_experts``,
``submodel_topk``) and, per sub-model, the running mean of its last ``SubModelFigures.WINDOW``
losses and tokens/s (``submodel_loss``, ``submodel_tokens_per_s``; TensorBoard
``elastic/loss/<sub-model>`` and ``elastic/tokens-per-s/<sub-model>``). A sub-model step's load
figures cover the experts and layers it kept. Under ``elastic.granularity=microbatch`` a step
trains many: it logs the full-model micro-batches' loss (``loss_full``) apart from the elastic
ones' (``loss_elastic``), the share of its micro-batches that trained the full model
(``microbatches_full``), the share of the step's samples that trained the full model and that
had a reduced depth, width or a top-k other than k at some layer (``samples_*``), and each
sub-model's running loss over its samples (``family_loss``, ``elastic/loss/<sub-model>``).

Expert-parallel balance: pool expert ``e`` sits on EP rank ``e mod EP`` (``moue.model.pool``),
so a layer's tokens per EP rank are its assignment counts summed over ``e mod EP``. Per layer
the figure is max over ranks / mean over ranks (1 = even; the slowest rank sets the layer's
all-to-all and expert time); ``ep_load_max_over_mean`` is its mean over layers. It is reported
at the run's EP, or at ``logging.ep_balance_ranks`` (e.g. the EP of a planned GPU run, from a
smaller test run: the placement is a function of the pool id alone).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from parallel.reduce import tracked_moe_values

TB_NAMES = {"loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm",
            "iteration_time": "iteration-time", "tokens_per_s": "throughput",
            "val_loss": "lm loss validation", "val_ppl": "lm loss validation ppl",
            "balance_loss": "moue/balance-loss", "load_max_over_mean": "moue/pool-load-max-over-mean",
            "load_cv": "moue/pool-load-cv", "router_entropy": "moue/router-entropy",
            "ep_load_max_over_mean": "moue/ep-load-max-over-mean",
            "ep_balance_loss": "moue/ep-balance-loss",
            "tflops": "throughput/tflops", "mfu": "throughput/mfu",
            "router_sharpen_loss": "elastic/router-sharpen-loss", "submodel_layers": "elastic/layers",
            "submodel_experts": "elastic/experts", "submodel_topk": "elastic/topk",
            "loss_full": "elastic/loss-full-model", "loss_elastic": "elastic/loss-elastic-micro-batches",
            "samples_full": "elastic/samples-full-model",
            "microbatches_full": "elastic/micro-batches-full-model",
            "samples_reduced_depth": "elastic/samples-reduced-depth",
            "samples_reduced_width": "elastic/samples-reduced-width",
            "samples_mixed_topk": "elastic/samples-mixed-topk"}
PER_SUBMODEL = {"submodel_loss": "elastic/loss", "submodel_tokens_per_s": "elastic/tokens-per-s"}
PER_LAYER = {"router_entropy_by_layer": "moue/router-entropy",
             "ep_load_max_over_mean_by_layer": "moue/ep-load-max-over-mean"}

# bf16 dense peak FLOP/s of one GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def load_figures(loads_LE: torch.Tensor) -> dict:
    """Pool load statistics of a step from its [L, E] assignment counts."""
    pool_E = loads_LE.sum(dim=0).float()
    mean = pool_E.mean().clamp(min=1e-9)
    return {"load_max_over_mean": (pool_E.max() / mean).item(),
            "load_cv": (pool_E.std(unbiased=False) / mean).item()}


def ep_rank_loads(loads_LE: torch.Tensor, ep: int) -> torch.Tensor:
    """Assignments per MoE layer and EP rank [L, ep]: pool expert e sits on rank e mod ep."""
    layers, experts = loads_LE.shape
    return loads_LE.float().view(layers, experts // ep, ep).sum(dim=1)


def ep_balance_figures(loads_LE: torch.Tensor, ep: int) -> dict:
    """Per layer max/mean tokens per EP rank, its mean over layers, and the assignments per
    layer and rank themselves (summed over steps they give the balance of the mean load, which
    separates a lasting imbalance from one batch's)."""
    per_rank_LR = ep_rank_loads(loads_LE, ep)
    ratio_L = per_rank_LR.max(dim=1).values / per_rank_LR.mean(dim=1).clamp(min=1e-9)
    return {"ep_load_max_over_mean": ratio_L.mean().item(),
            "ep_load_max_over_mean_by_layer": ratio_L.tolist(),
            "ep_rank_tokens_by_layer": per_rank_LR.tolist()}


def step_figures(raw: dict, num_microbatches: int, pg_collection, *, moe_layers: frozenset,
                 ep_ranks: int, reduce: bool = True) -> dict:
    """The logged figures of a step from ``Trainer.train_step``'s raw outputs: ``moe_layers`` are
    the 0-based MoE layers (Megatron's tracker has a slot for every layer), ``ep_ranks`` the EP
    degree of the tokens-per-rank figure (none when 1). Every rank must call it (it reduces
    Megatron's aux-loss tracker). ``reduce=False`` (a step that logs nothing) only clears the
    tracker: no collective, no copy from the GPU."""
    if not reduce:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return dict(raw)
    metrics = dict(raw)
    tracked = tracked_moe_values(num_microbatches, pg_collection)
    metrics["balance_loss"] = sum(tracked.get("balance_loss", []))
    for name in ("ep_balance_loss", "router_sharpen_loss"):
        if name in tracked:
            metrics[name] = sum(tracked[name])
    entropy = [e for i, e in enumerate(tracked.get("router_entropy", [])) if i in moe_layers]
    metrics["router_entropy"] = sum(entropy) / len(entropy) if entropy else None
    metrics["router_entropy_by_layer"] = entropy
    loads_LE = raw.get("loads_LE")
    active_LE = metrics.pop("active_LE", None)  # an elastic sub-model's effective eligibility
    if loads_LE is not None:
        if active_LE is not None:
            rows, cols = active_LE.any(dim=1), active_LE.any(dim=0)
            metrics.update(load_figures(loads_LE[rows][:, cols.to(loads_LE.device)]))
            loads_LE = loads_LE[rows.to(loads_LE.device)]
        else:
            metrics.update(load_figures(loads_LE))
        if ep_ranks > 1:
            metrics.update(ep_balance_figures(loads_LE, ep_ranks))
    return metrics


class SubModelFigures:
    """Running loss and tokens/s of each elastic sub-model over its last ``WINDOW`` steps
    (checkpointed with the trainer, so a resumed run logs what an uninterrupted one does)."""

    WINDOW = 20

    def __init__(self):
        self.history: dict[str, list[tuple[float, float]]] = {}

    def update(self, sub, loss: float, tokens_per_s: float) -> dict:
        seen = self.history.setdefault(sub.label, [])
        seen.append((loss, tokens_per_s))
        del seen[:-self.WINDOW]
        return {"submodel": sub.label, "submodel_layers": len(sub.layers),
                "submodel_experts": len(sub.experts), "submodel_topk": sub.topk,
                "submodel_loss": sum(x for x, _ in seen) / len(seen),
                "submodel_tokens_per_s": sum(t for _, t in seen) / len(seen)}

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: [tuple(x) for x in v] for k, v in state.items()}


class FamilyLosses:
    """Elastic micro-batches (``elastic.granularity=microbatch``): the running mean of each
    sub-model's per-step loss (over its samples) over the last ``WINDOW`` steps it trained in,
    reported for the sub-models of the step; checkpointed with the trainer."""

    WINDOW = SubModelFigures.WINDOW

    def __init__(self):
        self.history: dict[str, list[float]] = {}

    def update(self, step_losses: dict[str, float]) -> dict[str, float]:
        for label, loss in step_losses.items():
            seen = self.history.setdefault(label, [])
            seen.append(loss)
            del seen[:-self.WINDOW]
        return {label: sum(self.history[label]) / len(self.history[label])
                for label in step_losses}

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state.items()}


class StepClock:
    """Wall time of a step, and the throughput figures derived from it."""

    def __init__(self, flops_per_token: float, device: torch.device, world_size: int):
        self.flops_per_token = flops_per_token
        peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
        self.peak = peak * world_size if peak else None
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self, tokens: int) -> dict:
        seconds = time.perf_counter() - self.started
        flops = self.flops_per_token * tokens / seconds
        return {"iteration_time": seconds, "tokens_per_s": tokens / seconds,
                "tflops": flops / 1e12, "mfu": flops / self.peak if self.peak else None}


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
    def __init__(self, log_dir: str, metrics_file: str | None, enabled: bool, start_step: int = 0,
                 interval: int = 1):
        self.enabled, self.interval = enabled, interval
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

    def logs(self, step: int, last: bool) -> bool:
        """Whether a training step's figures are logged (``log_step``), evaluations aside."""
        return step % self.interval == 0 or last

    def log_step(self, step: int, metrics: dict, last: bool) -> None:
        """A training step's figures: logged every ``logging.interval`` steps, at the last step
        and with every evaluation (which also draws the expert-load heatmap)."""
        if self.logs(step, last) or "val_loss" in metrics:
            self.log(step, metrics)
        if "val_loss" in metrics:
            self.log_heatmap(step)

    def log(self, step: int, metrics: dict) -> None:
        """One JSON line and the TensorBoard scalars; a ``loads_LE`` entry (the step's [L, E]
        counts) is kept for the heatmap, not written."""
        if not self.enabled:
            return
        metrics = dict(metrics)
        loads_LE = metrics.pop("loads_LE", None)
        if loads_LE is not None:
            self.last_loads = loads_LE.detach().cpu()
        if "val_loss" in metrics:
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if key in TB_NAMES and value is not None and math.isfinite(value):
                self.writer.add_scalar(TB_NAMES[key], value, step)
        for key, tag in PER_LAYER.items():
            for layer, value in enumerate(metrics.get(key) or []):
                self.writer.add_scalar(f"{tag}/moe-layer-{layer}", value, step)
        for key, tag in PER_SUBMODEL.items():
            if key in metrics:
                self.writer.add_scalar(f"{tag}/{metrics['submodel']}", metrics[key], step)
        for label, value in (metrics.get("family_loss") or {}).items():
            self.writer.add_scalar(f"elastic/loss/{label}", value, step)

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
        if any("submodel" in r or "family_loss" in r for r in rows):  # an elastic run
            lines.append(f"sub-models:  moue-eval --load {checkpoints.parent} --family")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(report(sys.argv[1]))
