"""``moue-pretrain``: a dry run's report, or a training run started on this job's processes.

``moue.cli`` parses the command line; this checks the run against the job's world size, refuses
what this machine cannot serve before any process group starts, says once (global rank 0) what
the run will use, starts the process groups and hands over to ``moue.training.trainer.train``.
"""

from __future__ import annotations

import json
import os
import sys

from moue.config import RunConfig
from moue.model.megatron_config import top1_post_softmax
from moue.run_check import check_run, check_training, local_attention_warning, plan_run
from parallel import launch
from parallel.capability import Capabilities


def dry_run(cfg: RunConfig, world_size: int | None) -> None:
    """Print the dry run's JSON report for ``world_size`` processes (None: ``$WORLD_SIZE``, else
    the smallest world the layout needs)."""
    from moue.dry_run import report

    if world_size is None and os.environ.get("WORLD_SIZE", "").isdigit():
        world_size = int(os.environ["WORLD_SIZE"])
    print(json.dumps(report(cfg, world_size), indent=2))


def run(cfg: RunConfig) -> None:
    """Check the run, start the process groups, build, train."""
    from moue.training.trainer import train

    env = launch.read_launch_env()
    layout = check_run(cfg, env.world_size)
    check_training(cfg)
    plan = plan_run(cfg)  # what this machine cannot serve is refused before any process group
    launch.init_distributed(layout, device="auto", env=env)
    if env.rank == 0:
        _say_plan(cfg, plan)
    try:
        train(cfg, layout, launch.resolve_device("auto"))
    finally:
        launch.shutdown()


def _say_plan(cfg: RunConfig, plan) -> None:
    pool = (f", pool {plan.expert_impl}" + (f" ({plan.grouped_gemm} grouped GEMM)"
                                             if plan.grouped_gemm else "")
            if plan.expert_impl != "none" else "")
    recipe = f" ({plan.fp8_recipe})" if plan.fp8_recipe else ""
    print(f"moue-pretrain: {plan.transformer_impl} layers{pool}, {plan.precision}{recipe}, "
          f"fusions {'on' if plan.fusions else 'off'}, weight-gradient accumulation "
          f"{'fused' if plan.grad_accum_fusion else 'unfused'}", file=sys.stderr)
    scores = local_attention_warning(cfg, plan, Capabilities.detect())
    if scores:
        print(f"moue-pretrain: warning: {scores}", file=sys.stderr)
    if cfg.data.mock:
        print("moue-pretrain: data: synthetic tokens (data.mock); give data.path=PREFIX (a "
              "moue-preprocess output) to train on a dataset", file=sys.stderr)
    if not cfg.model.dense and top1_post_softmax(cfg.moe):
        print("moue-pretrain: note: moe.topk=1 with post-softmax scores gives every token a gate "
              "of 1, so the router learns only from the balance loss; set moe.pre_softmax=true "
              "for gates that carry the language-model gradient", file=sys.stderr)
