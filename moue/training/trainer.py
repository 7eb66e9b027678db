"""moue-pretrain's training loop, on Megatron-Core's components.

``Trainer`` builds, in order: the model (``moue.model.builder``), the engine
(``moue.training.engine``: DDP, optimizer, schedule) and the datasets
(``data_tools.megatron_data``). ``fit()`` steps it; step metrics are derived in
``moue.training.metrics`` and checkpoints written by ``moue.training.checkpoint``. Each build
is a method a subclass may override (``build_module``, ``build_engine``, ``build_datasets``):
the tests swap the data for random tokens, or the model for Megatron's own GPT MoE, and keep
everything else.

Elastic training (``elastic.enabled``): under ``elastic.granularity=microbatch`` each micro-batch's
draw (``moue.elastic.microbatch``: None for the full model, else per-sample sub-models) is put
onto the model by the forward step, just before that micro-batch's forward on each stage; under
``step`` the step's sub-model (``moue.elastic.schedule``) before the step
(``moue.elastic.apply``). Draws depend on ``(train.seed, step, micro-batch)`` alone. Evaluation
runs the full model.

Data order: step ``k`` (from 0) reads global samples ``[N + k*G, N + (k+1)*G)`` of the train
split (``G`` the global batch, ``N`` = ``data.start_sample``), each data-parallel rank its
contiguous slice in micro-batches, so the order is the same under every layout and a resumed run
continues exactly (``moue.training.batches`` loads them ahead of the step).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from tqdm import tqdm

from data_tools.megatron_data import gpt_datasets
from data_tools.tokenizer import load_tokenizer
from moue.config import RunConfig
from moue.elastic import microbatch
from moue.elastic.apply import apply_submodel
from moue.elastic.schedule import Schedule
from moue.elastic.submodel import SubModel
from moue.elastic.submodel import full as full_submodel
from moue.model.builder import balance_modules, build_model, pipeline_shapes
from moue.model.chunk import build_chunk
from moue.model.size import flops_per_token
from moue.model.widening import set_widening
from moue.run_check import check_run, check_training, plan_run
from moue.training import checkpoint
from moue.training.batches import TrainBatches, collate
from moue.training.engine import Engine, build_engine, build_forward_engine
from moue.training.metrics import (
    FamilyLosses,
    MetricsLogger,
    StepClock,
    SubModelFigures,
    step_figures,
)
from parallel import launch
from parallel.errors import UserError
from parallel.layout import ParallelLayout
from parallel.pool_sync import finish_step_loads
from parallel.reduce import any_rank, data_parallel_slice, is_logging_rank, step_mean, step_rows


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0


class NonFiniteLoss(UserError):
    """A NaN/Inf loss under ``train.on_nan=stop``: the message names the step and the fixes."""


class _StopOnSignal:
    """Records SIGTERM/SIGINT instead of dying mid-step; the loop saves and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _forward_step(data_iterator, model):
    mb = next(data_iterator)
    per_token = model(mb["tokens"], mb["position_ids"], attention_mask=None, labels=mb["labels"])

    def loss_func(output):
        mask = mb["loss_mask"].float()
        loss = (output.float() * mask).sum() / mask.sum().clamp(min=1)
        # clone: Megatron divides the returned loss in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


class Trainer:
    def __init__(self, cfg: RunConfig, layout: ParallelLayout, device: torch.device,
                 pg_collection: ProcessGroupCollection | None = None, datasets: bool = True,
                 training: bool = True):
        """``datasets=False``: no training or validation split (a caller that evaluates arrays
        of its own); ``train_data`` and ``valid_data`` are None. ``training=False``: forward
        passes only (``evaluate``): no DDP buffers, no optimizer (``optimizer`` is None)."""
        self.cfg, self.layout, self.device = cfg, layout, device
        self.pg = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.plan = plan_run(cfg)  # refuses what this machine cannot run, before building
        model = build_chunk(cfg.model, cfg.moe, cfg.train, cfg.topology(), layout, self.plan,
                            device, self.pg, build=self.build_module)
        self.balances = balance_modules([model])
        self.engine = self.build_engine(model) if training else build_forward_engine(model)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        try:
            self.train_data, self.valid_data = self.build_datasets() if datasets else (None, None)
        except BaseException:  # a refused dataset (say, its vocabulary): no Trainer to close
            self.engine.close()
            raise
        self.state = TrainState()
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)
        self.clock = StepClock(flops_per_token(cfg.model, cfg.moe, cfg.topology()), device,
                               layout.world_size)
        self.moe_layers = frozenset(cfg.model.moe_layers)  # for the per-layer figures
        self.ep_ranks = cfg.logging.ep_balance_ranks or layout.ep  # of the EP-balance figure
        choices, e = cfg.elastic_choices(), cfg.elastic
        self.schedule = (Schedule(e, choices, cfg.train.seed)
                         if e.enabled and e.granularity == "step" else None)
        self.microbatches = (
            microbatch.MicrobatchSchedule(e, choices, cfg.train.seed, cfg.model.moe_layer_freq)
            if e.enabled and e.granularity == "microbatch" else None)
        self.full = full_submodel(choices) if choices else None
        self.submodel_figures, self.family_losses = SubModelFigures(), FamilyLosses()
        self._batches, self._batches_at = None, None  # the training stream (_train_batches)
        self._flops: dict[SubModel, float] = {}

    def build_module(self, megatron_config) -> torch.nn.Module:
        """This rank's model chunk (a Megatron module whose ``config`` the engine steps with).
        A subclass may build another model on the same engine."""
        cfg = self.cfg
        return build_model(cfg.model, cfg.moe, cfg.topology(), megatron_config, self.pg, self.plan)

    def build_engine(self, module: torch.nn.Module) -> Engine:
        """What trains the chunk: Megatron DDP, its distributed optimizer and the LR schedule
        (``moue.training.engine``). A subclass may step with another (the tests compare
        Megatron's plain optimizer with it)."""
        return build_engine(module, module.config, self.cfg.train)

    # --- checkpointed state beside the model and the optimizer ---

    def state_dict(self) -> dict:
        return {"scheduler": self.engine.scheduler.state_dict(), "state": asdict(self.state),
                "submodel_figures": self.submodel_figures.state_dict(),
                "family_losses": self.family_losses.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainState(**state["state"])
        self.submodel_figures.load_state_dict(state.get("submodel_figures", {}))
        self.family_losses.load_state_dict(state.get("family_losses", {}))

    # --- elastic sub-models ---

    def use_submodel(self, sub: SubModel | None, routing_seed: int = 0) -> torch.Tensor | None:
        """Compute ``sub`` (None: the full model) from the next forward on; returns its effective
        eligibility (None when it is the whole mask)."""
        if self.full is None:
            return None
        e = self.cfg.elastic
        return apply_submodel(self.model.module, sub or self.full,
                       coactivation_prob=e.coactivation_prob if e.enabled else 0.0,
                       k_ideal=self.cfg.elastic_choices().k_ideal, routing_seed=routing_seed,
                       sharpen_coeff=e.sharpen_coeff if e.enabled else 0.0)

    def _elastic_forward_step(self, plan: list) -> tuple:
        """Megatron's forward step for a step of elastic micro-batches: each micro-batch's draw
        (``plan``, by index in the global batch) goes onto the model just before its forward on
        this stage, and the last stage keeps per micro-batch its loss and its samples' losses."""
        mbs = self.cfg.train.micro_batch_size
        first = data_parallel_slice(self.cfg.train.global_batch_size, self.pg.dp)[0] // mbs
        seen, rows = itertools.count(first), []

        def forward_step(data_iterator, model):
            microbatch.apply_microbatch(self.model.module, plan[next(seen)])
            mb = next(data_iterator)
            per_token, loss_func = _forward_step(iter([mb]), model)

            def keep_losses(output):
                loss, reduced = loss_func(output)
                mask = mb["loss_mask"].float()
                per_sample = (output.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                rows.append(torch.cat([reduced["lm loss"].view(1), per_sample.detach()]))
                return loss, reduced

            return per_token, keep_losses

        return forward_step, rows

    def _submodel_flops(self, sub: SubModel) -> float:
        if sub not in self._flops:  # per Trainer: a class-level cache would keep every Trainer
            cfg = self.cfg
            self._flops[sub] = flops_per_token(cfg.model, cfg.moe, cfg.topology(), sub)
        return self._flops[sub]

    def close(self) -> None:
        """Release the engine (``Engine.close``); the Trainer's data and model stay readable."""
        self.engine.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self) -> None:
        ckpt = self.cfg.checkpoint
        checkpoint.save_checkpoint(
            ckpt.dir, step=self.state.step, model=self.model.module, optimizer=self.optimizer,
            extra_state=self.state_dict(), run_config=self.cfg, pg_collection=self.pg,
            keep_last=ckpt.keep_last)

    def resume(self) -> None:
        """Load the checkpoint ``checkpoint.dir/latest`` names, if there is one; else start
        from ``checkpoint.init``'s weights (and optimizer state), if it is set."""
        ckpt = self.cfg.checkpoint
        path = checkpoint.latest_checkpoint(ckpt.dir) if ckpt.dir else None
        start = path is None
        if start:
            path = checkpoint.initial_checkpoint(self.cfg)
        if path is None:
            return
        state = checkpoint.load_checkpoint(path, model=self.model.module,
                                           optimizer=self.optimizer, run_config=self.cfg,
                                           pg_collection=self.pg, start=start)
        if state is not None:  # None: a new run from step 0 (model-only or checkpoint.init)
            self.load_state_dict(state)
        elif start and torch.distributed.get_rank() == 0:
            print(checkpoint.describe_start(path, self.cfg), file=sys.stderr)

    # --- data ---

    def build_datasets(self) -> tuple:
        """The training and validation splits (``data``): Megatron's GPT datasets, or its mock
        tokens. A subclass may give others; a sample is a dict of the ``BATCH_KEYS`` of
        ``moue.training.batches`` (tokens, labels, loss_mask, position_ids: each [seq_length])."""
        cfg, t = self.cfg, self.cfg.train
        blend = cfg.data.blend or ([cfg.data.path] if cfg.data.path else None)
        tokenizer = None if cfg.data.mock else load_tokenizer(cfg.data.tokenizer)
        if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                            f"tokenizer's vocabulary ({tokenizer.vocab_size}, "
                            f"data.tokenizer={cfg.data.tokenizer}); raise model.vocab_size")
        valid_samples = max(1, t.eval_iters) * t.global_batch_size
        train, valid, _ = gpt_datasets(
            seq_length=cfg.model.seq_length, seed=cfg.data_seed, split=cfg.data.split,
            num_samples=(cfg.data.start_sample + t.steps * t.global_batch_size, valid_samples,
                         0),
            tokenizer=tokenizer, blend=None if cfg.data.mock else blend,
            vocab_size=cfg.model.vocab_size)
        return train, valid

    def _microbatches(self, dataset, first_sample: int):
        """This data-parallel rank's micro-batches of the global batch starting at a sample."""
        offset, count = data_parallel_slice(self.cfg.train.global_batch_size, self.pg.dp)
        mbs = self.cfg.train.micro_batch_size
        for i in range(first_sample + offset, first_sample + offset + count, mbs):
            yield {k: v.to(self.device) for k, v in
                   collate([dataset[j % len(dataset)] for j in range(i, i + mbs)]).items()}

    def _train_batches(self, first_sample: int) -> TrainBatches:
        """The training stream's next global batch, loaded ahead; started anew (from
        ``first_sample`` to the end of training) when the run is not where it left off."""
        t = self.cfg.train
        if self._batches is None or self._batches_at != first_sample:
            if self._batches is not None:
                self._batches.close()
            offset, count = data_parallel_slice(t.global_batch_size, self.pg.dp)
            workers = self.cfg.data.num_workers
            self._batches = TrainBatches(
                self.train_data, first_sample=first_sample, global_batch=t.global_batch_size,
                micro_batch=t.micro_batch_size, offset=offset, count=count,
                steps=max(1, t.steps - self.state.step), device=self.device,
                workers=(2 if self.device.type == "cuda" else 0) if workers is None else workers)
        self._batches_at = first_sample + t.global_batch_size  # the schedule takes one batch
        return self._batches

    # --- steps ---

    def _run_schedule(self, dataset, first_sample: int, forward_only: bool,
                      forward_step=_forward_step) -> float:
        shapes = (pipeline_shapes(self.cfg.moe.router_state_dim)
                  if self.layout.pp > 1 and not self.cfg.model.dense else None)
        if self.cfg.moe.widen_block and not self.cfg.model.dense:
            set_widening([self.model], self.state.step, self.cfg.moe.widen_steps)
        batches = (self._train_batches(first_sample)
                   if dataset is self.train_data and not forward_only
                   else self._microbatches(dataset, first_sample))
        losses = self.engine.forward_backward(
            forward_step, batches,
            num_microbatches=self.num_microbatches, seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
            adjust_tensor_shapes_fn=shapes)
        return step_mean(losses, "lm loss", self.device, self.pg)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (the same numbers on every rank)."""
        sub = active_LE = plan = None
        forward_step = _forward_step
        if self.microbatches is not None:
            t, step = self.cfg.train, self.state.step
            self.use_submodel(None, self.microbatches.routing_seed(step))
            count = t.global_batch_size // t.micro_batch_size
            plan = [self.microbatches.draw(step, j, count, t.micro_batch_size)
                    for j in range(count)]
            forward_step, rows = self._elastic_forward_step(plan)
        if self.schedule is not None:
            draw = self.schedule.draw(self.state.step)
            sub = draw.submodel
            active_LE = self.use_submodel(sub, draw.routing_seed)
            self.clock.flops_per_token = self._submodel_flops(sub)
        self.clock.start()
        loss = self._run_schedule(self.train_data, self.first_sample, forward_only=False,
                                  forward_step=forward_step)
        if plan is not None:
            microbatch.finish_step(self.model.module)
            losses_Mb = step_rows(rows, self.num_microbatches, 1 + self.cfg.train.micro_batch_size,
                                  self.device, self.pg)
            figures, by_label = microbatch.step_figures(plan, losses_Mb, self.cfg.elastic_choices())
        if not math.isfinite(loss):
            if self.cfg.train.on_nan == "stop":
                raise NonFiniteLoss(f"step {self.state.step + 1}: loss is {loss}; lower train.lr or "
                                    "check the data, or set train.on_nan=skip to skip such steps")
            return self._skip_step(loss)
        ok, grad_norm, lr = self.engine.optimizer_step()
        loads_LE = finish_step_loads(self.balances)
        self._advance()
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        metrics = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "skipped": not ok, **self.clock.stop(tokens), "loads_LE": loads_LE}
        if sub is not None:
            metrics["active_LE"] = active_LE
            metrics.update(self.submodel_figures.update(sub, loss, metrics["tokens_per_s"]))
        if plan is not None:
            metrics.update(figures, family_loss=self.family_losses.update(by_label))
        return metrics

    def _note_stop(self, bar, step: int) -> None:
        """Say once (global rank 0) that the run stopped cleanly on a signal, also into
        ``$MOUE_STOP_FILE`` (set by the launch scripts, whose torchrun exits 1 after a signal)."""
        ckpt = self.cfg.checkpoint.dir
        note = (f"moue: stopped by signal after step {step}; "
                + (f"checkpoint saved in {ckpt}: run the same command again to resume"
                   if ckpt else "no checkpoint.dir, so nothing was saved"))
        if torch.distributed.get_rank() != 0:
            return
        bar.write(note)
        stop_file = os.environ.get("MOUE_STOP_FILE")
        if stop_file:
            Path(stop_file).write_text(note + "\n")

    def _skip_step(self, loss: float) -> dict:
        """train.on_nan=skip: no update, the step's expert counts are dropped, data moves on."""
        for balance in self.balances:
            balance.counts_LE.zero_()
        self.engine.scheduler.step(increment=1)
        self._advance()
        return {"step": self.state.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": None, "skipped": True, **self.clock.stop(0), "loads_LE": None}

    @property
    def first_sample(self) -> int:
        """The first global sample of the train split the next step reads."""
        return self.cfg.data.start_sample + self.state.consumed_samples

    def _advance(self) -> None:
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size

    @torch.no_grad()
    def evaluate(self, dataset=None, forward_step=_forward_step) -> float:
        """Mean loss over the first ``eval_iters`` global batches of ``dataset`` (default: the
        validation split), of the full model (elastic runs) unless a sub-model was put on with
        ``use_submodel`` after. ``forward_step`` replaces the language-model loss's (Megatron's
        forward-step contract: it returns the output and a loss function)."""
        dataset = self.valid_data if dataset is None else dataset
        self.model.eval()
        try:
            g = self.cfg.train.global_batch_size
            losses = [self._run_schedule(dataset, i * g, forward_only=True,
                                         forward_step=forward_step)
                      for i in range(self.cfg.train.eval_iters)]
        finally:
            self.model.train()
        return sum(losses) / len(losses)

    # --- the loop ---

    def fit(self, logger: MetricsLogger) -> None:
        """Train to ``train.steps``: evaluate, log, and save as configured. SIGTERM/SIGINT save a
        checkpoint (when checkpoint.dir is set) and return after the current step."""
        t, ckpt = self.cfg.train, self.cfg.checkpoint
        stop = _StopOnSignal()
        if t.eval_interval and self.state.step == 0:
            logger.log(0, {"val_loss": self.evaluate()})  # the untrained model, for reference
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not logger.enabled,
                   desc="train", unit="step")
        while self.state.step < t.steps:
            raw = self.train_step()
            step = self.state.step
            evaluating = bool(t.eval_interval) and (step % t.eval_interval == 0 or step == t.steps)
            # The routers' figures are reduced over ranks only on the steps that log them.
            metrics = step_figures(raw, self.num_microbatches, self.pg, moe_layers=self.moe_layers,
                                   ep_ranks=self.ep_ranks,
                                   reduce=logger.logs(step, last=step == t.steps) or evaluating)
            if evaluating:
                self.use_submodel(None)
                metrics["val_loss"] = self.evaluate()
            logger.log_step(step, metrics, last=step == t.steps)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            stopping = any_rank(stop.requested)  # every rank must take the same decision
            if ckpt.dir and (stopping or step == t.steps
                             or (ckpt.interval and step % ckpt.interval == 0)):
                self.save()
            if stopping:
                self._note_stop(bar, step)
                break
        bar.close()
        stop.restore()
        if self._batches is not None:
            self._batches.close()


def train(cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> Trainer:
    """Build and train on an initialised world (``moue.commands.pretrain`` starts one; tests
    reuse theirs). Returns
    the Trainer, closed (``Trainer.close``): its model and data stay readable."""
    if check_run(cfg, layout.world_size) != layout:
        raise ValueError(f"the layout {layout.describe()} is not the one cfg.parallel gives")
    check_training(cfg)
    with checkpoint.run_lock(cfg.checkpoint.dir, cfg.logging.dir):
        checkpoint.initial_checkpoint(cfg)  # a bad checkpoint.init is named before building
        launch.seed_everything(cfg.train.seed)
        with Trainer(cfg, layout, device) as trainer:  # closed however the run ends
            trainer.resume()
            logger = MetricsLogger(cfg.logging.dir, cfg.logging.metrics_file,
                                   enabled=is_logging_rank(trainer.pg),
                                   start_step=trainer.state.step, interval=cfg.logging.interval)
            try:
                trainer.fit(logger)
            finally:
                logger.close()
    return trainer
