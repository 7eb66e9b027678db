"""Cases: moue-pretrain's training loop (moue.training.trainer) under parallel layouts."""

import contextlib
import json
import os
import shutil
import signal
import tempfile
from functools import partial
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from moue.config import load_config
from moue.training.trainer import train
from parallel.launch import init_model_parallel
from parallel.layout import ParallelLayout
from tests.distributed import Cases

CASES = Cases()
CONFIG = "examples/configs/tiny_cpu.yaml"
# moe.ep_balance_groups pinned: the EP-balance term then trains the same loss on every layout
SHARED = ["moe.ep_balance_groups=2"]
SHORT = [*SHARED, "train.steps=3", "train.warmup_steps=1", "train.eval_interval=3",
         "train.eval_iters=1",
         "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=64",
         "logging.interval=1"]
LAYOUTS = {"single": (1, 1, 1), "dp2": (1, 1, 1), "tp2": (2, 1, 1), "ep2": (1, 1, 2),
           "pp2": (1, 2, 1), "tp2_ep2": (2, 1, 2)}
# Elastic training with every axis reduced often, co-activation sampling and router sharpening:
# the default granularity (micro-batches: 2 of the 4 on the full model, per-sample sub-models on
# the others, so DP=2's second rank has elastic micro-batches only) and one sub-model per step.
ELASTIC = ["train.steps=8", "train.eval_interval=8", "elastic.enabled=true",
           "elastic.layers_full_prob=0.5", "elastic.experts_full_prob=0.5",
           "elastic.topk_full_prob=0.5", "elastic.coactivation_prob=0.5",
           "elastic.sharpen_coeff=0.01"]
ELASTIC_STEP = [*ELASTIC, "elastic.granularity=step"]
ELASTIC = [*ELASTIC, "elastic.full_share=0.5"]


def _train(name: str, *extra: str) -> list | None:
    """Train 3 steps; the logging rank returns the rows of metrics.jsonl, the others None."""
    tp, pp, ep = LAYOUTS[name]
    world = torch.distributed.get_world_size()
    tag = name + ("-elastic" if extra else "") + ("-step" if "elastic.granularity=step" in extra else "")
    out = Path(tempfile.gettempdir()) / f"moue-train-{os.environ['MASTER_PORT']}" / tag
    cfg = load_config(CONFIG, [*SHORT, f"parallel.tp={tp}", f"parallel.pp={pp}",
                               f"parallel.ep={ep}", f"logging.dir={out}", *extra])
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    init_model_parallel(layout)
    train(cfg, layout, torch.device("cpu"))
    torch.distributed.barrier()  # the logging rank has closed the file
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


CASES.add("train[single]", partial(_train, "single"), nproc=1)
for _name in ("tp2", "ep2", "pp2"):
    CASES.add(f"train[{_name}]", partial(_train, _name), nproc=2)
CASES.add("elastic[single]", partial(_train, "single", *ELASTIC), nproc=1)
for _name in ("dp2", "tp2", "ep2", "pp2", "tp2_ep2"):
    CASES.add(f"elastic[{_name}]", partial(_train, _name, *ELASTIC), nproc=2)
CASES.add("elastic_step[single]", partial(_train, "single", *ELASTIC_STEP), nproc=1)
for _name in ("pp2", "tp2_ep2"):
    CASES.add(f"elastic_step[{_name}]", partial(_train, _name, *ELASTIC_STEP), nproc=2)


# --- Checkpoints: exact resume -----------------------------------------------------------------

RESUME = [*SHARED, "train.steps=4", "train.warmup_steps=1", "train.eval_interval=0",
          "train.global_batch_size=8", "train.micro_batch_size=2", "model.seq_length=64"]


def _losses(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: [r["loss"], r.get("submodel"), r.get("submodel_loss"),
                        r.get("family_loss"), r.get("samples_full")] for r in rows if "loss" in r}


_STRAIGHT: dict[tuple, dict] = {}  # (layout, config) -> the uninterrupted run's losses


def _resume_case(name: str, interrupt: str, *extra_config: str,
                 written_by=contextlib.nullcontext) -> dict:
    """Uninterrupted 4 steps vs. interrupted after step 2 (how: ``interrupt``) and resumed;
    ``written_by``: a context the interrupted run (which writes the checkpoint) runs in."""
    import moue.training.checkpoint as checkpoint
    import moue.training.trainer as training

    tp, pp, ep = LAYOUTS[name]
    world = torch.distributed.get_world_size()
    base = Path(tempfile.gettempdir()) / f"moue-resume-{os.environ['MASTER_PORT']}" / interrupt
    layout = ParallelLayout(world_size=world, tp=tp, pp=pp, ep=ep)
    par = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"]

    base = base / ("elastic" if extra_config else "plain") / written_by.__name__

    def run(tag, *extra):
        cfg = load_config(CONFIG, [*RESUME, *par, f"logging.dir={base / tag}", *extra,
                                   *extra_config])
        init_model_parallel(layout)
        train(cfg, layout, torch.device("cpu"))
        torch.distributed.barrier()

    key = (name, extra_config)
    if key not in _STRAIGHT:  # the same 4 steps whichever way the other run is interrupted
        run("straight")
        _STRAIGHT[key] = _losses(base / "straight" / "metrics.jsonl")
    ckpt = [f"checkpoint.dir={base / 'ckpt'}", "checkpoint.interval=2"]
    original_step, original_save = training.Trainer.train_step, checkpoint.dist_checkpointing.save

    def step_then(trainer):
        metrics = original_step(trainer)
        if interrupt == "sigterm" and trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: save, then stop
        if interrupt == "crash_after_checkpoint" and trainer.state.step == 3:
            raise RuntimeError("simulated crash")
        return metrics

    def failing_save(state, path, *args, **kwargs):
        if "step_0000004" in str(path):
            raise RuntimeError("simulated crash during save")
        return original_save(state, path, *args, **kwargs)

    training.Trainer.train_step = step_then
    checkpoint.dist_checkpointing.save = failing_save if interrupt == "crash_during_save" else original_save
    try:
        with written_by():
            run("interrupted", *ckpt)
    except RuntimeError:
        torch.distributed.barrier()
    finally:
        training.Trainer.train_step = original_step
        checkpoint.dist_checkpointing.save = original_save
    latest = (base / "ckpt" / "latest").read_text().strip()
    stored = dist_checkpointing.load_tensors_metadata(str(base / "ckpt" / latest))
    run("resumed", *ckpt)
    return {"straight": _STRAIGHT[key],
            "resumed": _losses(base / "resumed" / "metrics.jsonl"),
            "latest_after_interrupt": latest,
            "stored_ep_bias": "decoder.pool_balance.bias_LE" in stored}


@contextlib.contextmanager
def _without_the_ep_bias():
    """Checkpoints as moue wrote them before the EP selection bias existed: no bias_LE."""
    from moue.model.balance import Balance

    original = Balance.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._non_persistent_buffers_set.add("bias_LE")

    Balance.__init__ = init
    try:
        yield
    finally:
        Balance.__init__ = original


CASES.add("resume[single,older_checkpoint]",
          partial(_resume_case, "single", "crash_after_checkpoint",
                  written_by=_without_the_ep_bias), nproc=1)
for _how in ("sigterm", "crash_after_checkpoint", "crash_during_save"):
    CASES.add(f"resume[single,{_how}]", partial(_resume_case, "single", _how), nproc=1)
CASES.add("resume[ep2,sigterm]", partial(_resume_case, "ep2", "sigterm"), nproc=2)
# Elastic micro-batches with reduced sub-models in steps 3 and 4.
ELASTIC_RESUME = ("elastic.enabled=true", "elastic.layers_full_prob=0.5",
                  "elastic.experts_full_prob=0.5", "elastic.topk_full_prob=0.5",
                  "elastic.coactivation_prob=0.5", "elastic.sharpen_coeff=0.01",
                  "moe.balance=aux_free")
CASES.add("resume[ep2,sigterm,elastic]",
          partial(_resume_case, "ep2", "sigterm", *ELASTIC_RESUME), nproc=2)
CASES.add("elastic_always_full[single]",
          partial(_train, "single", "elastic.enabled=true", "elastic.layers_full_prob=1",
                  "elastic.experts_full_prob=1", "elastic.topk_full_prob=1"), nproc=1)


# --- Continuing a trained model on the data it has not seen (data.start_sample) -----------------


def _continue_case() -> dict:
    """At a constant LR: 4 steps straight; 2 steps, saved as a model-only checkpoint and as a
    training one; the model-only one trained on from data.start_sample = 2 global batches, and
    from 0; the training one as checkpoint.init from 2 global batches, without and with its
    Adam state."""
    from moue.checkpoint import save_model

    base = Path(tempfile.gettempdir()) / f"moue-continue-{os.environ['MASTER_PORT']}"
    shutil.rmtree(base, ignore_errors=True)
    layout = ParallelLayout(world_size=1)
    constant = [*RESUME, "parallel.ep=1", "train.warmup_steps=0", "train.min_lr=0.003",
                "train.lr=0.003"]

    def run(tag, *extra):
        cfg = load_config(CONFIG, [*constant, f"logging.dir={base / tag}", *extra])
        init_model_parallel(layout)
        trainer = train(cfg, layout, torch.device("cpu"))
        return cfg, trainer, [v[0] for v in _losses(base / tag / "metrics.jsonl").values()]

    _, _, straight = run("straight")
    cfg, trainer, first_two = run("two", "train.steps=2", f"checkpoint.dir={base / 'trained'}")
    weights = base / "weights"
    save_model(weights / "step_0000000", trainer.model.module, cfg, trainer.pg)
    (weights / "latest").write_text("step_0000000\n")
    batch = cfg.train.global_batch_size
    losses = {"straight": straight, "first_two": first_two}
    for start in (2 * batch, 0):  # each from its own copy: a run saves into its checkpoint.dir
        copy = shutil.copytree(weights, base / f"weights_{start}")
        losses[f"from_{start}"] = run(f"from_{start}", f"checkpoint.dir={copy}",
                                      f"data.start_sample={start}", "train.steps=2")[2]
    for adam in ("false", "true"):
        losses[f"init_{adam}"] = run(f"init_{adam}", f"checkpoint.init={base / 'trained'}",
                                     f"checkpoint.init_optimizer={adam}",
                                     f"data.start_sample={2 * batch}", "train.steps=2")[2]
    return {**losses, "batch": batch}


CASES.add("continue[single]", _continue_case, nproc=1)


# --- Non-finite losses ---------------------------------------------------------------------


def _nan_at_step_2(on_nan: str) -> dict:
    """The loss of step 2 reads NaN: stop names the step; skip leaves the weights untouched."""
    import moue.training.trainer as training

    base = Path(tempfile.gettempdir()) / f"moue-nan-{os.environ['MASTER_PORT']}" / on_nan
    cfg = load_config(CONFIG, [*RESUME, "parallel.ep=1", f"train.on_nan={on_nan}",
                               f"logging.dir={base}"])
    layout = ParallelLayout(world_size=1)
    init_model_parallel(layout)
    original = training.Trainer._run_schedule

    def schedule(trainer, dataset, first, forward_only, **kwargs):
        loss = original(trainer, dataset, first, forward_only, **kwargs)
        return float("nan") if trainer.state.step == 1 and not forward_only else loss

    training.Trainer._run_schedule = schedule
    try:
        with training.Trainer(cfg, layout, torch.device("cpu")) as trainer:
            trainer.train_step()
            before = [p.detach().clone() for p in trainer.model.parameters()]
            try:
                metrics = trainer.train_step()
            except training.NonFiniteLoss as err:
                return {"error": str(err)}
            unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                              strict=True))
            return {"skipped": metrics["skipped"], "unchanged": unchanged,
                    "step": trainer.state.step, "next_loss": trainer.train_step()["loss"]}
    finally:
        training.Trainer._run_schedule = original


CASES.add("nan[stop]", partial(_nan_at_step_2, "stop"), nproc=1)
CASES.add("nan[skip]", partial(_nan_at_step_2, "skip"), nproc=1)
