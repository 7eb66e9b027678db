"""The ``elastic:`` config section and the rules that tie it to the model.

Three axes: depth (``layers``: kept layer counts), width (``experts``: kept pool experts) and
top-k. ``granularity`` says where sub-models are drawn:
- ``microbatch`` (the default, as ERNIE 5.0's training code does): the first ``full_share`` of
  each step's micro-batches train the full model, the rest sub-models drawn per sample (depth,
  width) and per sample and MoE layer (top-k: ``k x B`` split over the micro-batch's ``B``
  samples, each between 1 and ``topk_max``, so the mean stays ``k``) - ``moue.elastic.microbatch``;
- ``step``: one sub-model per optimizer step (``moue.elastic.schedule``), top-k from ``topk``.
Each axis takes its full value with probability ``*_full_prob``, else one of its reduced choices
uniformly. A choice list left null takes ERNIE 5.0's defaults (``resolve``): 3/4 of the layers,
half the pool, every k below the configured one. ``elastic.enabled=false`` (the default) changes
nothing in a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from moue.sections import Section, check, one_of, setting
from parallel.errors import UserError


@dataclass(frozen=True, kw_only=True)
class ElasticConfig(Section):
    section = "elastic"
    enabled: bool = setting(False, "train sub-models; false: every step trains the full model, "
                            "exactly as without this section")
    granularity: str = setting(
        "microbatch", "`microbatch` (full model on the first `full_share` of the micro-batches, "
        "per-sample sub-models on the rest; ERNIE 5.0's code) or `step` (one sub-model per step)")
    full_share: float = setting(
        0.75, "`microbatch`: share of each step's `global_batch_size / micro_batch_size` "
        "micro-batches on the full model (rounded; in (0, 1]; below 1 a step needs at least one "
        "micro-batch of each kind; the balance learns from the full-model ones)")
    topk_max: int | None = setting(
        None, "`microbatch`: the largest per-sample top-k of an elastic micro-batch; null: "
        "`2 * moe.topk - 1` (capped at the window)")
    layers: list[int] | None = setting(
        None, "reduced depths (layer counts, 1..`model.num_layers`); null: "
        "`[round(3/4 * num_layers)]`")
    layers_full_prob: float = setting(0.75, "probability of full depth (per elastic sample, or "
                                      "per step)")
    layers_policy: str = setting(
        "spread", "`spread` (evenly spaced, first and last kept; a fixed set per depth) or "
        "`random` (first and last, the rest drawn per step)")
    experts: list[int] | None = setting(
        None, "reduced pool sizes; each a multiple of the number of blocks (`num_experts / "
        "stride` for rotational, the layers for standard, 1 for full) that leaves at least "
        "`moe.topk` experts in every window; null: `[num_experts / 2]` when that is valid")
    experts_full_prob: float = setting(0.8, "probability of the whole pool (per elastic sample, "
                                       "or per step)")
    experts_policy: str = setting("random", "`random` (a fresh subset of each block per draw) "
                                  "or `nested` (the first of each block)")
    topk: list[int] | None = setting(
        None, "`step`: reduced top-k values; null: `1 .. moe.topk - 1` (also the family "
        "`moue-eval --family` reports)")
    topk_full_prob: float = setting(
        0.8, "probability of `moe.topk`: per MoE layer of an elastic micro-batch (else `k x B` "
        "split over its `B` samples, 1..`topk_max` each), or per step")
    coactivation_prob: float = setting(
        0.0, "Elastic MoE's co-activation sampling: the probability that a sequence position "
        "keeps `k` random experts of its `k_ideal` best")
    k_ideal: int | None = setting(None, "null: `moe.topk + 1`; above `moe.topk`, at most the "
                                  "window")
    sharpen_coeff: float = setting(0.0, "coefficient of the router-sharpening loss (0: off)")

    def _validate(self):
        for axis in ("layers", "experts", "topk"):
            prob = getattr(self, f"{axis}_full_prob")
            check(0 <= prob <= 1, f"elastic.{axis}_full_prob", prob,
                  "must be a probability in [0, 1]")
            choices = getattr(self, axis)
            if choices is not None:
                check(all(c >= 1 for c in choices), f"elastic.{axis}", choices,
                      "must be a list of positive integers, e.g. [2, 3] (or null for the default)")
        one_of("elastic.granularity", self.granularity, ("microbatch", "step"))
        check(0 < self.full_share <= 1, "elastic.full_share", self.full_share,
              "must be a share in (0, 1] (1: every micro-batch trains the full model); the "
              "balance learns from the full-model micro-batches only, so some must be")
        check(self.topk_max is None or self.topk_max >= 1,
              "elastic.topk_max", self.topk_max, "must be a positive integer or null (2k - 1)")
        one_of("elastic.layers_policy", self.layers_policy, ("spread", "random"))
        one_of("elastic.experts_policy", self.experts_policy, ("random", "nested"))
        check(0 <= self.coactivation_prob <= 1, "elastic.coactivation_prob",
              self.coactivation_prob, "must be a probability in [0, 1] (0: off)")
        check(self.sharpen_coeff >= 0, "elastic.sharpen_coeff", self.sharpen_coeff,
              "must be >= 0 (0: off)")


@dataclass(frozen=True)
class Choices:
    """The resolved reduced choices of each axis (sorted, below the full value) and the full
    values themselves: what the schedule draws from and what ``--family`` enumerates."""

    layers: tuple[int, ...]
    experts: tuple[int, ...]
    topk: tuple[int, ...]
    num_layers: int
    num_experts: int
    full_topk: int
    block_size: int | None  # pool experts per width block (moue.model.topology)
    k_ideal: int
    window: int = 0  # experts in a layer's window
    topk_max: int = 0  # microbatch granularity: the largest per-sample k (resolved)

    def kept_window(self, width: int) -> int:
        """Experts of each window that a sub-model of ``width`` pool experts keeps."""
        if width == self.num_experts:
            return self.window
        return width * self.block_size // self.num_experts * self.window // self.block_size


def resolve(elastic: ElasticConfig, *, num_layers: int, num_experts: int, topk: int,
            window: int, block_size: int | None) -> Choices:
    """Check the section against the model and fill in the defaults (``UserError`` naming the
    field, the value and the fix). ``block_size`` is the topology's (None: no width axis)."""
    blocks = num_experts // block_size if block_size else None

    def width_ok(m: int) -> bool:
        return bool(blocks) and m % blocks == 0 and (m // blocks) * window // block_size >= topk

    layers = elastic.layers
    if layers is None:
        layers = [d for d in [round(0.75 * num_layers)] if 1 <= d < num_layers]
    for d in layers:
        check(1 <= d <= num_layers, "elastic.layers", elastic.layers,
              f"every depth must be between 1 and model.num_layers={num_layers}")
    experts = elastic.experts
    if experts is None:
        experts = [m for m in [num_experts // 2] if m >= 1 and width_ok(m)]
    elif any(m < num_experts for m in experts) and not block_size:
        raise UserError(f"elastic.experts={experts}: this topology's windows are not made of "
                        "whole blocks of moe.stride experts (moe.num_experts and moe.window must "
                        "be multiples of moe.stride), so width cannot keep every window's share; "
                        "set elastic.experts=[]")
    for m in experts:
        check(m <= num_experts, "elastic.experts", experts,
              f"every width must be at most moe.num_experts={num_experts}")
        check(m == num_experts or width_ok(m), "elastic.experts", experts,
              f"a width must be a multiple of the {blocks} blocks of {block_size} pool experts "
              f"and keep at least moe.topk={topk} experts in every window of {window} "
              f"(e.g. {_widths(num_experts, blocks, block_size, window, topk)})")
    choices = elastic.topk if elastic.topk is not None else list(range(1, topk))
    k_ideal = elastic.k_ideal if elastic.k_ideal is not None else topk + 1
    for k in choices:
        check(1 <= k <= window, "elastic.topk", elastic.topk,
              f"every top-k must be between 1 and the window ({window} experts)")
        smallest = min([window, *((m // blocks) * window // block_size for m in experts)])
        check(k <= smallest, "elastic.topk", elastic.topk,
              f"a top-k must fit the narrowest window of the sub-models ({smallest} experts)")
    if elastic.coactivation_prob > 0:
        check(topk < k_ideal <= window, "elastic.k_ideal", k_ideal,
              f"must be above moe.topk={topk} and at most the window ({window} experts)")
    topk_max = elastic.topk_max if elastic.topk_max is not None else min(2 * topk - 1, window)
    check(topk <= topk_max <= window, "elastic.topk_max", elastic.topk_max,
          f"must be between moe.topk={topk} and the window ({window} experts)")
    return Choices(tuple(sorted({d for d in layers if d < num_layers})),
                   tuple(sorted({m for m in experts if m < num_experts})),
                   tuple(sorted({k for k in choices if k != topk})), num_layers, num_experts,
                   topk, block_size, k_ideal, window, topk_max)


def _widths(num_experts, blocks, block_size, window, topk) -> str:
    if not blocks:
        return "none: this topology has no blocks"
    ok = [j * blocks for j in range(1, block_size + 1) if j * window // block_size >= topk]
    return ", ".join(map(str, ok)) or "none"
