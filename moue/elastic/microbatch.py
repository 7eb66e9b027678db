"""Sub-models per micro-batch and per sample (``elastic.granularity=microbatch``, the default).

As ERNIE 5.0's training code does it, every optimizer step trains the full model: of the step's
``M = global_batch / micro_batch`` micro-batches (counted over the whole global batch, not per
rank) the first ``round(full_share * M)`` are the full model, the others are *elastic*. In an
elastic micro-batch each sample draws
- its depth (full with ``layers_full_prob``, else one of ``elastic.layers``) and its width (full
  with ``experts_full_prob``, else one of ``elastic.experts``), with the sets of the configured
  policies (``moue.elastic.submodel``);
- per MoE layer, its top-k: with probability ``topk_full_prob`` every sample of the micro-batch
  keeps ``k``, else ``k x B`` is split over the ``B`` samples at random, each part between 1 and
  ``topk_max`` (2k - 1 by default) and at most what the sample's width leaves in a window
  (``split_topk``; with ``B = 1`` or ``k = 1`` that is ``k``). A micro-batch's tokens then route
  ``k`` experts each on average, and its (token, expert) assignments number ``T x k`` as under
  the full model: Megatron's dropless dispatchers size their permutation by
  ``T x moe_router_topk``.

Draws come from a generator seeded by ``(train.seed, step, micro-batch index in the global
batch)``: the same under every layout and after a resume, with no communication.

Elastic micro-batches (those that reduce something) do not touch the balance: no balance loss,
no expert-parallel balance loss, no load statistics (ERNIE's gates skip them too), and no
co-activation sampling. A sample that skips a layer is computed by it like the others and its
output replaced by the layer's input (the identity, for the hidden and the trajectory state):
every rank then takes part in every layer's collectives whatever its samples drew, so depth may
differ between samples, micro-batches and expert-parallel ranks. The cost is that a reduced
depth saves no compute here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from moue.elastic.config import Choices, ElasticConfig
from moue.elastic.schedule import kept_sets, pick_size, step_generator


@dataclass(frozen=True)
class SampleDraw:
    layers: tuple[int, ...]  # kept layers (0-based over the model)
    experts: tuple[int, ...]  # kept pool experts
    topk_L: tuple[int, ...]  # per MoE layer

    def label(self, full_topk: int) -> str:
        k = full_topk if all(k == full_topk for k in self.topk_L) else "mixed"
        return f"layers={len(self.layers)},experts={len(self.experts)},topk={k}"


@dataclass(frozen=True)
class MicrobatchDraw:
    """An elastic micro-batch's samples, and the tensors the model reads for it."""

    samples: tuple[SampleDraw, ...]
    skip_Lb: torch.Tensor  # [layers, b] bool: sample b skips layer l
    keep_bE: torch.Tensor | None  # [b, E] bool: pool experts sample b keeps (None: all)
    topk_Lb: torch.Tensor | None  # [MoE layers, b] long: sample b's k at MoE layer l (None: k)


def full_microbatches(full_share: float, num_microbatches: int) -> int:
    """How many of a step's micro-batches train the full model (the first ones)."""
    return int(full_share * num_microbatches + 0.5)


@functools.lru_cache(maxsize=1024)  # a handful of cap patterns recur every step
def _split_counts(k: int, caps: tuple[int, ...]) -> list[list[int]]:
    """``ways[i][n]``: the splits of ``n`` into the parts ``i..`` within their caps (Python
    integers: exact at any size)."""
    count, total = len(caps), k * len(caps)
    ways = [[0] * (total + 1) for _ in range(count + 1)]
    ways[count][0] = 1
    for i in range(count - 1, -1, -1):
        for n in range(total + 1):
            ways[i][n] = sum(ways[i + 1][n - p] for p in range(1, min(caps[i], n) + 1))
    return ways


def split_topk(gen: torch.Generator, k: int, caps: list[int]) -> list[int]:
    """``k * B`` split into ``B`` parts, each between 1 and its cap, uniformly at random over all
    such splits (caps are at least ``k``, so one exists). Exact: part ``i`` is drawn with the
    probability of the splits that can follow it, counted by a table over (parts left, sum left).
    """
    count, total = len(caps), k * len(caps)
    ways = _split_counts(k, tuple(caps))
    parts, left = [], total
    for i in range(count):
        u, acc = torch.rand((), generator=gen).item(), 0.0
        options = range(1, min(caps[i], left) + 1)
        for p in options:  # int / int is exact before rounding, however large the counts
            acc += ways[i + 1][left - p] / ways[i][left]
            if u < acc or p == options[-1]:
                break
        while not ways[i + 1][left - p]:  # rounding at the very end of the range
            p -= 1
        parts.append(p)
        left -= p
    return parts


class MicrobatchSchedule:
    def __init__(self, elastic: ElasticConfig, choices: Choices, seed: int, moe_layer_freq: int):
        self.elastic, self.choices, self.seed = elastic, choices, seed
        self.moe_layers = [i for i in range(choices.num_layers) if i % moe_layer_freq == 0]

    def routing_seed(self, step: int) -> int:
        """The step's seed of co-activation sampling (full-model micro-batches)."""
        return int(torch.randint(2**62, (), generator=step_generator(self.seed, step)).item())

    def draw(self, step: int, index: int, num_microbatches: int,
             size: int) -> MicrobatchDraw | None:
        """Micro-batch ``index`` (of ``num_microbatches`` in the global batch, ``size`` samples)
        of step ``step``; None when it trains the full model (one of the first ``full_share``,
        or an elastic one whose every sample drew the full model: it then counts as one)."""
        if index < full_microbatches(self.elastic.full_share, num_microbatches):
            return None
        e, c = self.elastic, self.choices
        gen = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + step) * 1_000_033 + index + 1) % (2**63))
        sets = []
        for _ in range(size):
            depth = pick_size(gen, c.num_layers, c.layers, e.layers_full_prob)
            width = pick_size(gen, c.num_experts, c.experts, e.experts_full_prob)
            sets.append(kept_sets(e, c, depth, width, gen))
        caps = [min(c.topk_max, c.kept_window(len(experts))) for _, experts in sets]
        topk_bL = [[] for _ in range(size)]
        for _ in self.moe_layers:
            coin = torch.rand((), generator=gen).item()
            parts = ([c.full_topk] * size if coin < e.topk_full_prob or size == 1
                     or all(cap <= c.full_topk for cap in caps)
                     else split_topk(gen, c.full_topk, caps))
            for b, k in enumerate(parts):
                topk_bL[b].append(k)
        samples = tuple(SampleDraw(layers, experts, tuple(ks))
                        for (layers, experts), ks in zip(sets, topk_bL, strict=True))
        skip_Lb = torch.ones(c.num_layers, size, dtype=torch.bool)
        keep_bE = torch.zeros(size, c.num_experts, dtype=torch.bool)
        for b, s in enumerate(samples):
            skip_Lb[list(s.layers), b] = False
            keep_bE[b, list(s.experts)] = True
        topk_Lb = torch.tensor(topk_bL, dtype=torch.long).t().contiguous()
        all_k = bool((topk_Lb == c.full_topk).all())
        if all_k and not skip_Lb.any() and keep_bE.all():
            return None  # every sample drew the full model: the micro-batch is the full model
        return MicrobatchDraw(samples, skip_Lb, None if keep_bE.all() else keep_bE,
                              None if all_k else topk_Lb)


def apply_microbatch(chunk: torch.nn.Module, draw: MicrobatchDraw | None) -> None:
    """Make ``chunk`` (an unwrapped GPTModel stage, with the full model applied for the step)
    compute micro-batch ``draw`` (None: the full model) from its next forward on."""
    decoder = chunk.decoder
    device = decoder.pool_balance.loads_E.device
    for layer in decoder.layers:
        skip = None if draw is None else draw.skip_Lb[layer.layer_number - 1]
        layer.skip_b = None if skip is None or not skip.any() else skip.to(device)
    routers = [layer.mlp.router for layer in decoder.layers if layer.is_moe_layer]
    if not routers:
        return
    shared = routers[0].shared

    def on_device(t):
        return None if t is None else t.to(device)

    groups = None
    if draw is not None and draw.topk_Lb is not None:  # per MoE layer: (k, its samples), on host
        groups = [[(k, on_device((row == k).nonzero().squeeze(1))) for k in row.unique().tolist()]
                  for row in draw.topk_Lb]
    shared.elastic = replace(shared.elastic, sub_batch=draw is not None,
                             keep_bE=on_device(draw and draw.keep_bE), topk_groups=groups)


def finish_step(chunk: torch.nn.Module) -> None:
    """After a step of elastic micro-batches: the full model again, and every micro-batch that
    full recompute queued recomputed (a leftover would replay the wrong micro-batch later)."""
    apply_microbatch(chunk, None)
    left = [layer.layer_number for layer in chunk.decoder.layers if layer.recompute_queue]
    if left:
        raise RuntimeError(f"layers {left} kept micro-batches queued for a recomputation that "
                           "never ran; is a checkpointed forward running without a backward?")


def step_figures(plan: list[MicrobatchDraw | None], losses_Mb: torch.Tensor,
                 choices: Choices) -> tuple[dict, dict[str, float]]:
    """A step's elastic figures from its draws (one per micro-batch of the global batch) and its
    losses ``[M, 1 + B]`` (per micro-batch: its loss, then each sample's): the logged shares and
    losses, and each sub-model's mean loss over its samples."""
    c = choices
    full = SampleDraw(tuple(range(c.num_layers)), tuple(range(c.num_experts)), ())
    samples = [s for d in plan for s in (d.samples if d else [full] * (losses_Mb.shape[1] - 1))]
    is_full_M = torch.tensor([d is None for d in plan])
    losses_M, losses_S = losses_Mb[:, 0].cpu(), losses_Mb[:, 1:].reshape(-1).cpu()
    count = len(samples)
    figures = {
        "microbatches_full": is_full_M.float().mean().item(),
        "loss_full": losses_M[is_full_M].mean().item() if is_full_M.any() else None,
        "loss_elastic": losses_M[~is_full_M].mean().item() if not is_full_M.all() else None,
        "samples_reduced_depth": sum(len(s.layers) < c.num_layers for s in samples) / count,
        "samples_reduced_width": sum(len(s.experts) < c.num_experts for s in samples) / count,
        "samples_mixed_topk": sum(s.label(c.full_topk).endswith("mixed") for s in samples) / count,
    }
    by_label: dict[str, list[float]] = {}
    for s, loss in zip(samples, losses_S.tolist(), strict=True):
        by_label.setdefault(s.label(c.full_topk), []).append(loss)
    figures["samples_full"] = len(by_label.get(full.label(c.full_topk), [])) / count
    return figures, {k: sum(v) / len(v) for k, v in by_label.items()}
