"""Cases: the pools, activations, recompute and precisions of the GPU path, through the Trainer
(test_gpu_path.py on CPU processes; test_gpu.py runs the same cases on GPUs).

Each case trains tiny_cpu.yaml (SwiGLU, 4 steps) under a layout and returns its losses and grad
norms per step. With ``save_at`` it stops after that step (SIGTERM: a checkpoint is written);
with ``resume_from`` it starts from the checkpoint another case wrote, under its own settings
(the other pool, precision or layout), and trains the remaining steps.
"""

import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch

from moue.config import load_config
from parallel.launch import init_model_parallel, resolve_device
from parallel.layout import ParallelLayout
from tests.cases.reshard import train_stopping_after
from tests.distributed import Cases

CASES = Cases()
CONFIG = "examples/configs/tiny_cpu.yaml"
SHORT = ["moe.ep_balance_groups=2", "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0",
         "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=64",
         "model.activation=swiglu", "train.lr=1e-3"]
LAYOUTS = {"single": (1, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1), "tp2": (2, 1, 1)}


def _base() -> Path:
    return Path(os.environ["MOUE_GPU_PATH_DIR"])


def run(tag: str, layout_name: str, *overrides: str, save_at: int | None = None,
        resume_from: str | None = None) -> dict:
    """Train under ``layout_name`` with ``overrides``; step -> [loss, grad norm]."""
    base = _base()
    tp, pp, ep = LAYOUTS[layout_name]
    world = torch.distributed.get_world_size()
    ckpt = base / tag / "ckpt"
    if resume_from is not None and torch.distributed.get_rank() == 0:
        source = base / resume_from / "ckpt"
        name = (source / "latest").read_text().strip()
        shutil.copytree(source / name, ckpt / name, dirs_exist_ok=True)
        (ckpt / "latest").write_text(name + "\n")
    torch.distributed.barrier()
    cfg = load_config(CONFIG, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.ep={ep}", f"logging.dir={base / tag}",
                               f"checkpoint.dir={ckpt}", *overrides])
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    trainer = train_stopping_after(cfg, layout, resolve_device("auto"), save_at)
    torch.distributed.barrier()
    rows = [json.loads(x) for x in (base / tag / "metrics.jsonl").read_text().splitlines()]
    return {"steps": {r["step"]: [r["loss"], r["grad_norm"]] for r in rows if "loss" in r},
            "plan": trainer.plan.describe(), "fp8": fp8_state(trainer.model.module)}


def fp8_state(model) -> dict:
    """What Transformer Engine's modules say of their last forward, in the pool and elsewhere:
    how many there are, how many ran in FP8 (TE sets ``fp8`` from its autocast on every
    forward) and the recipes in their ``fp8_meta`` (none on a CPU: no TE modules)."""
    pool = {id(m) for m in model.decoder.expert_pool.modules()} if hasattr(
        model.decoder, "expert_pool") else set()
    out = {}
    for part, wanted in (("pool", True), ("other", False)):
        te = [m for m in model.modules() if hasattr(m, "fp8_meta") and (id(m) in pool) == wanted]
        out[part] = {"modules": len(te), "ran_fp8": sum(bool(getattr(m, "fp8", False)) for m in te),
                     "recipes": sorted({type(m.fp8_meta.get("recipe")).__name__ for m in te
                                        if m.fp8_meta.get("recipe") is not None})}
    return out


SEQ = "moe.expert_impl=sequential"
GROUPED = "moe.expert_impl=grouped"

# The pools train alike; a checkpoint of either resumes in the other, under another layout too.
CASES.add("sequential[ep2]", partial(run, "seq_ep2", "ep2", SEQ), nproc=2)
CASES.add("grouped[tp2]", partial(run, "grouped_tp2", "tp2", GROUPED), nproc=2)
CASES.add("save_sequential[ep2]", partial(run, "save_seq", "ep2", SEQ, save_at=2), nproc=2)
CASES.add("save_grouped[ep2]", partial(run, "save_grouped", "ep2", GROUPED, save_at=2), nproc=2)
CASES.add("sequential_to_grouped[ep2]",
          partial(run, "seq_to_grouped", "ep2", GROUPED, resume_from="save_seq"), nproc=2)
CASES.add("grouped_to_sequential[single]",
          partial(run, "grouped_to_seq", "single", SEQ, resume_from="save_grouped"), nproc=1)

# Recompute: the same numbers as keeping the activations (the trajectory state threads through
# full recompute; co-activation draws alike in the no-grad pass and the recomputed one).
# Dense layers between the MoE layers and a shared expert, so "mlp" and "shared_experts" apply.
# Elastic micro-batches with every axis reduced often: under PP=2 a micro-batch's recomputation
# comes after later micro-batches have put their draws on the model. The EP selection bias on,
# at a rate that changes choices within the 4 steps: state every router reads, which must be the
# same in a micro-batch's first pass and its recomputation (it moves only after the step).
ELASTIC = ("elastic.enabled=true", "elastic.coactivation_prob=0.5", "elastic.sharpen_coeff=0.01",
           "elastic.layers_full_prob=0.5", "elastic.experts_full_prob=0.5",
           "elastic.topk_full_prob=0.5", "model.moe_layer_freq=2", "moe.shared_experts=1",
           "moe.ep_balance_rate=0.03")
CASES.add("no_recompute[pp2]", partial(run, "norecompute_pp2", "pp2", *ELASTIC), nproc=2)
CASES.add("full_recompute[pp2]",
          partial(run, "full_pp2", "pp2", "train.recompute=full", *ELASTIC), nproc=2)
CASES.add("selective_recompute[pp2]",
          partial(run, "selective_pp2", "pp2", "train.recompute=selective",
                  "train.recompute_modules=[core_attn,mlp,shared_experts]", *ELASTIC), nproc=2)

# Precision: a bf16 run's checkpoint resumes in fp32.
CASES.add("save_bf16[ep2]", partial(run, "save_bf16", "ep2", "train.precision=bf16", save_at=2),
          nproc=2)
CASES.add("bf16_to_fp32[ep2]", partial(run, "bf16_to_fp32", "ep2", "train.precision=fp32",
                                       resume_from="save_bf16"), nproc=2)
