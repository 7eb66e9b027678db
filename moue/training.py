"""moue-pretrain's training loop, on Megatron-Core's components.

``Trainer`` builds, in order: the model (``moue.model``), Megatron's ``DistributedDataParallel``,
``get_megatron_optimizer`` (distributed optimizer), ``OptimizerParamScheduler`` (warmup, then
cosine or warmup-stable-decay) and the datasets (``data_tools.megatron_data``). ``fit()`` runs
``get_forward_backward_func`` (so pipeline parallelism works) step by step; logging lives in
``moue.metrics`` and checkpoints in ``moue.checkpoint``.

Data order: step ``k`` reads global samples ``[k*G, (k+1)*G)`` of the train split (``G`` the
global batch), each data-parallel rank its contiguous slice in micro-batches, so the order is
the same under every layout and a resumed run continues exactly.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from tqdm import tqdm

from data_tools.megatron_data import gpt_datasets
from data_tools.tokenizer import load_tokenizer
from moue.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moue.config import RunConfig
from moue.dry_run import flops_per_token, moe_dims, peak_flops
from moue.init import init_by_global_key
from moue.megatron_config import transformer_config
from moue.metrics import MetricsLogger
from moue.model import balance_modules, build_model, pipeline_shapes
from parallel import launch
from parallel.layout import ParallelLayout
from parallel.pool_sync import finish_step_loads
from parallel.reduce import (
    any_rank,
    data_parallel_slice,
    is_logging_rank,
    step_mean,
    tracked_moe_values,
)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0


class NonFiniteLoss(RuntimeError):
    pass


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
    def __init__(self, cfg: RunConfig, layout: ParallelLayout, device: torch.device):
        self.cfg, self.layout, self.device = cfg, layout, device
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        self.config = transformer_config(cfg, layout, device=device,
                                         params_dtype=torch.bfloat16 if bf16 else torch.float32)
        model = build_model(cfg, self.config, ProcessGroupCollection.use_mpu_process_groups())
        init_by_global_key(model, cfg.train.seed, self.config.init_method_std, cfg.model.num_layers)
        self.balances = balance_modules([model])
        self.model = DistributedDataParallel(
            self.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                       use_distributed_optimizer=True),
            module=model.to(device))
        t = cfg.train
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            clip_grad=t.clip_grad, adam_beta1=0.9, adam_beta2=0.95, bf16=bf16,
                            params_dtype=self.config.params_dtype, use_distributed_optimizer=True),
            [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.steps,
            lr_decay_style="WSD" if t.schedule == "wsd" else "cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps,
            wd_incr_style="constant", wsd_decay_steps=max(1, t.steps // 5),
            lr_wsd_decay_style="linear")
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.train_data, self.valid_data = self._datasets()
        self.state = TrainState()
        self.flops_per_token = flops_per_token(cfg)
        self.peak = (peak_flops(torch.cuda.get_device_name()) * layout.world_size
                     if device.type == "cuda" and peak_flops(torch.cuda.get_device_name()) else None)

    def _datasets(self):
        cfg, t = self.cfg, self.cfg.train
        blend = cfg.data.blend or ([cfg.data.path] if cfg.data.path else None)
        tokenizer = None if cfg.data.mock else load_tokenizer(cfg.data.tokenizer)
        if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({tokenizer.vocab_size}, "
                             f"data.tokenizer={cfg.data.tokenizer}); raise model.vocab_size")
        valid_samples = max(1, t.eval_iters) * t.global_batch_size
        train, valid, _ = gpt_datasets(
            seq_length=cfg.model.seq_length, seed=cfg.data_seed, split=cfg.data.split,
            num_samples=(t.steps * t.global_batch_size, valid_samples, 0),
            tokenizer=tokenizer, blend=None if cfg.data.mock else blend,
            vocab_size=cfg.model.vocab_size)
        return train, valid

    def _microbatches(self, dataset, first_sample: int):
        """This data-parallel rank's micro-batches of the global batch starting at a sample."""
        offset, count = data_parallel_slice(self.cfg.train.global_batch_size)
        mbs = self.cfg.train.micro_batch_size
        for i in range(first_sample + offset, first_sample + offset + count, mbs):
            samples = [dataset[j % len(dataset)] for j in range(i, i + mbs)]
            yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(self.device)
                   for k in BATCH_KEYS}

    def _run_schedule(self, dataset, first_sample: int, forward_only: bool) -> float:
        t = self.cfg.train
        kwargs = {}
        if self.layout.pp > 1 and self.cfg.moe.router_state_dim:
            # The trajectory state rides after the hidden channels between stages.
            kwargs["adjust_tensor_shapes_fn"] = pipeline_shapes(self.cfg.moe.router_state_dim)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=self._microbatches(dataset, first_sample),
            model=[self.model], num_microbatches=t.global_batch_size // (t.micro_batch_size * self.layout.dp),
            seq_length=self.cfg.model.seq_length, micro_batch_size=t.micro_batch_size,
            forward_only=forward_only, **kwargs)
        return step_mean(losses, "lm loss", self.device)

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (the same numbers on every rank)."""
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = self._run_schedule(self.train_data, self.state.consumed_samples, forward_only=False)
        if not math.isfinite(loss):
            if self.cfg.train.on_nan == "stop":
                raise NonFiniteLoss(f"step {self.state.step + 1}: loss is {loss}; lower train.lr or "
                                    "check the data, or set train.on_nan=skip to skip such steps")
            return self._skip_step(loss, start)
        # Advance the schedule first: step k trains at lr(k), so warmup's first step is not lr 0.
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        loads_LE = finish_step_loads(self.balances)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        seconds = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        flops = self.flops_per_token * tokens / seconds
        return {"step": self.state.step, "loss": loss, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "skipped": not ok, "iteration_time": seconds, "tokens_per_s": tokens / seconds,
                "tflops": flops / 1e12, "mfu": flops / self.peak if self.peak else None,
                "loads_LE": loads_LE}

    def fit(self, logger: MetricsLogger) -> None:
        """Train to ``train.steps``: evaluate, log, and save as configured. SIGTERM/SIGINT save a
        checkpoint (when checkpoint.dir is set) and return after the current step."""
        t, every, ckpt = self.cfg.train, self.cfg.logging.interval, self.cfg.checkpoint
        stop = _StopOnSignal()
        num_micro = t.global_batch_size // (t.micro_batch_size * self.layout.dp)
        moe_layers = set(self.cfg.model.moe_layers)  # Megatron's tracker has every layer's slot
        if t.eval_interval and self.state.step == 0:
            logger.log(0, {"val_loss": self.evaluate()})  # the untrained model, for reference
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not logger.enabled,
                   desc="train", unit="step")
        while self.state.step < t.steps:
            metrics = self.train_step()
            loads_LE = metrics.pop("loads_LE")
            tracked = tracked_moe_values(num_micro)
            metrics["balance_loss"] = sum(tracked.get("balance_loss", []))
            entropy = [e for i, e in enumerate(tracked.get("router_entropy", [])) if i in moe_layers]
            metrics["router_entropy"] = sum(entropy) / len(entropy) if entropy else None
            metrics["router_entropy_by_layer"] = entropy
            step = self.state.step
            if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
                metrics["val_loss"] = self.evaluate()
            if step % every == 0 or step == t.steps or "val_loss" in metrics:
                logger.log(step, metrics, loads_LE)
            if "val_loss" in metrics:
                logger.log_heatmap(step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
            stopping = any_rank(stop.requested)  # every rank must take the same decision
            if ckpt.dir and (stopping or step == t.steps
                             or (ckpt.interval and step % ckpt.interval == 0)):
                save_checkpoint(self, ckpt.dir, ckpt.keep_last)
            if stopping:
                bar.write(f"stopped by signal after step {step}"
                          + (f"; checkpoint in {ckpt.dir}" if ckpt.dir else ""))
                break
        bar.close()
        stop.restore()

    def _skip_step(self, loss: float, start: float) -> dict:
        """train.on_nan=skip: no update, the step's expert counts are dropped, data moves on."""
        for balance in self.balances:
            balance.counts_LE.zero_()
        self.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        return {"step": self.state.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": None, "skipped": True,
                "iteration_time": time.perf_counter() - start, "tokens_per_s": 0.0,
                "loads_LE": None}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first ``eval_iters`` global batches of the validation split."""
        self.model.eval()
        try:
            g = self.cfg.train.global_batch_size
            losses = [self._run_schedule(self.valid_data, i * g, forward_only=True)
                      for i in range(self.cfg.train.eval_iters)]
        finally:
            self.model.train()
        return sum(losses) / len(losses)



def run(cfg: RunConfig) -> None:
    """``moue-pretrain``: start the processes' groups, build, train, write logs and plots."""
    p, m = cfg.parallel, cfg.model
    layout = launch.init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, device="auto")
    layout.check_model(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                       num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
                       **moe_dims(cfg), seq_length=m.seq_length)
    if cfg.train.global_batch_size % (cfg.train.micro_batch_size * layout.dp):
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple "
                         f"of train.micro_batch_size x data-parallel ranks = "
                         f"{cfg.train.micro_batch_size} x {layout.dp}")
    try:
        train(cfg, layout, launch.resolve_device("auto"))
    finally:
        launch.shutdown()


def train(cfg: RunConfig, layout: ParallelLayout, device: torch.device) -> Trainer:
    """Build and train on an initialised world (``run`` starts one; tests reuse theirs)."""
    launch.seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, layout, device)
    resume = latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    if resume is not None:
        load_checkpoint(trainer, resume)
    logger = MetricsLogger(cfg.logging.dir, cfg.logging.metrics_file, enabled=is_logging_rank(),
                           start_step=trainer.state.step)
    try:
        trainer.fit(logger)
    finally:
        logger.close()
    return trainer
