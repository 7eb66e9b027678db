"""Cases: weight gradients with gradient-accumulation fusion equal those without it, on the
modules every layer shares (the pool, U) and on every other parameter (test_wgrad_fusion.py).

Each training case builds the Trainer for tiny_cpu.yaml (SwiGLU, a shared expert, tied
embeddings, the trajectory state; 4 micro-batches per step) and takes two optimizer steps,
recording every parameter's ``main_grad`` as the optimizer step begins (what Megatron's optimizer
reads). With fusion the weight gradients are written into ``main_grad`` inside the GEMMs:
Megatron's linears through the CPU stand-in of apex's kernel, the pool's through the stand-ins
of Transformer Engine's (``moue.model.te_standins``), which keep TE's contract.

The build cases record the device of every tensor that reaches a collective while the Trainer is
built, and whether ``build_model`` itself issues any (it must not: the model is not on its device
yet). On GPUs (tests/cases/gpu.py) the same check runs with the CUDA device.
"""

import contextlib
import sys
from functools import partial

import torch

import moue.training.trainer as trainer_module
from moue.config import load_config
from moue.model.pool import ExpertPool, GroupedExpertPool
from moue.training.trainer import Trainer
from parallel.launch import init_model_parallel, resolve_device, seed_everything
from parallel.layout import ParallelLayout
from tests.distributed import Cases

CASES = Cases()
CONFIG = "examples/configs/tiny_cpu.yaml"
SHORT = ["train.steps=2", "train.warmup_steps=0", "train.eval_interval=0",
         "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=32",
         "model.activation=swiglu", "moe.shared_experts=1", "model.tie_embeddings=true",
         "moe.ep_balance_groups=2"]
LAYOUTS = {"single": (1, 1, 1), "pp2": (1, 2, 1), "tp2": (2, 1, 1), "ep2": (1, 1, 2)}
COLLECTIVES = ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_to_all_single", "reduce", "_all_gather_base",
               "_reduce_scatter_base")


def _trainer(layout_name: str, *overrides: str) -> Trainer:
    tp, pp, ep = LAYOUTS[layout_name]
    cfg = load_config(CONFIG, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.ep={ep}", *overrides])
    layout = ParallelLayout(world_size=torch.distributed.get_world_size(), tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    seed_everything(cfg.train.seed)
    return Trainer(cfg, layout, resolve_device("auto"))


def _pool(trainer: Trainer):
    return trainer.model.module.decoder.expert_pool


def _group(name: str) -> str:
    if ".expert_pool." in name:
        return "pool"
    return "U" if "expert_embedding" in name else "other"


def train_recording_main_grads(layout_name: str, pool: str, fusion: bool, *overrides: str,
                               undo_fix: bool = False) -> list[dict]:
    """Two steps; per step the loss, the grad norm, how many pool weights took the fused path,
    and every parameter's main_grad as the optimizer step begins."""
    with _trainer(layout_name, f"moe.expert_impl={pool}",
                  f"train.grad_accum_fusion={str(fusion).lower()}", *overrides) as trainer:
        if undo_fix:  # the pool as it was built before the fix: TE overwrites on the first call
            for sub in _pool(trainer).modules():
                if hasattr(sub, "disable_parameter_transpose_cache"):
                    sub.disable_parameter_transpose_cache = False
        names = {p: n for n, p in trainer.model.module.named_parameters()}
        steps, grads = [], {}
        optimizer_step = trainer.engine.optimizer_step

        def record_then_step():
            grads.clear()
            grads.update({n: p.main_grad.detach().clone() for p, n in names.items()})
            grads["fused"] = sum(1 for p, n in names.items()
                                 if p.grad_added_to_main_grad and _group(n) == "pool")
            return optimizer_step()

        trainer.engine.optimizer_step = record_then_step
        for _ in range(2):
            metrics = trainer.train_step()
            fused = grads.pop("fused")
            steps.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                          "fused_pool_params": fused, "main_grad": dict(grads)})
    return steps


def _difference(run: list[dict], reference: list[dict]) -> list[dict]:
    """Per step and parameter group: ||g - g_ref|| / ||g_ref|| over this rank's main_grads."""
    out = []
    for step, ref in zip(run, reference, strict=True):
        diff, norm = {}, {}
        for name, want in ref["main_grad"].items():
            group = _group(name)
            diff[group] = diff.get(group, 0.0) + float((step["main_grad"][name] - want).square().sum())
            norm[group] = norm.get(group, 0.0) + float(want.square().sum())
        out.append({"loss": step["loss"], "grad_norm": step["grad_norm"],
                    "reference_loss": ref["loss"], "reference_grad_norm": ref["grad_norm"],
                    "fused_pool_params": step["fused_pool_params"],
                    "reference_fused_pool_params": ref["fused_pool_params"],
                    "relative": {g: (diff[g] / norm[g]) ** 0.5 for g in norm if norm[g] > 0}})
    return out


def compare(layout_name: str, pool: str, *overrides: str) -> dict:
    """Fused against unfused (and, in one process, fused with the fix undone)."""
    unfused = train_recording_main_grads(layout_name, pool, False, *overrides)
    result = {"fused": _difference(train_recording_main_grads(layout_name, pool, True, *overrides),
                                   unfused)}
    if torch.distributed.get_world_size() == 1:
        result["before_fix"] = _difference(
            train_recording_main_grads(layout_name, pool, True, *overrides, undo_fix=True),
            unfused)
    return result


for _pool_impl in ("sequential", "grouped"):
    CASES.add(f"{_pool_impl}[single]", partial(compare, "single", _pool_impl), nproc=1)
    for _layout in ("pp2", "ep2"):
        CASES.add(f"{_pool_impl}[{_layout}]", partial(compare, _layout, _pool_impl), nproc=2)


@contextlib.contextmanager
def recording_collectives():
    """Record (collective, calling module, devices of its tensors) for every collective."""
    seen = []
    originals = {name: getattr(torch.distributed, name) for name in COLLECTIVES
                 if hasattr(torch.distributed, name)}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a
                        if torch.is_tensor(t)]
            caller = sys._getframe(1).f_globals.get("__name__", "")
            seen.append((name, caller, sorted({str(t.device) for t in tensors})))
            return fn(*args, **kwargs)
        return recorded

    for name, fn in originals.items():
        setattr(torch.distributed, name, wrap(name, fn))
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)


def build_collectives(layout_name: str) -> dict:
    """The collectives moue's own code issues in ``build_model`` (Megatron's GPTModel issues its
    own there: under PP it sums the tied embedding over the first and last stage, on weights it
    creates on the run's device), and the devices of every collective's tensors while the whole
    Trainer is built (model, engine, datasets)."""
    original = trainer_module.build_model
    during_build = []

    def build_model(*args, **kwargs):
        with recording_collectives() as seen:
            model = original(*args, **kwargs)
        during_build.extend(seen)
        return model

    trainer_module.build_model = build_model  # the name the Trainer calls
    try:
        with recording_collectives() as seen:
            trainer = _trainer(layout_name)
    finally:
        trainer_module.build_model = original
    trainer.close()
    return {"device": str(trainer.device),
            "moue_in_build_model": [c for c in during_build if not c[1].startswith("megatron.")],
            "megatron_in_build_model": [c for c in during_build if c[1].startswith("megatron.")],
            "devices": sorted({d for *_, devices in seen for d in devices}),
            "collectives": len(seen),
            "pool": isinstance(_pool(trainer), (ExpertPool, GroupedExpertPool))}


CASES.add("build[pp2]", partial(build_collectives, "pp2"), nproc=2)
CASES.add("build[ep2]", partial(build_collectives, "ep2"), nproc=2)
