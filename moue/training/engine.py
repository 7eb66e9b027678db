"""The training engine: one model chunk wrapped in Megatron-Core's ``DistributedDataParallel``,
``get_megatron_optimizer`` (Adam; distributed optimizer by default) and
``OptimizerParamScheduler`` (warmup, then cosine or warmup-stable-decay), stepped through
Megatron's ``get_forward_backward_func`` so that every pipeline schedule works.

``build_engine`` is the one place these are assembled: the Trainer, the benchmarks and the
equivalence tests all use it, so they step the same engine. ``build_forward_engine`` serves
evaluation: the same schedules, forward only, with no DDP buffers and no optimizer.

On resume the schedule's *shape* (lr, min_lr, warmup, decay steps, weight decay) comes from the
run's config and its *position* from the checkpoint (``override_opt_param_scheduler``): a run may
resume with another learning rate or a longer ``train.steps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from moue.config import TrainConfig


@dataclass
class Engine:
    model: DistributedDataParallel  # or ForwardOnly (build_forward_engine)
    optimizer: object  # a MegatronOptimizer (chained into dense and expert parts when ep > 1)
    scheduler: OptimizerParamScheduler
    closed: bool = False

    def forward_backward(self, forward_step, data_iterator, *, num_microbatches: int,
                         seq_length: int, micro_batch_size: int, forward_only: bool = False,
                         adjust_tensor_shapes_fn=None) -> list[dict]:
        """One global batch through Megatron's schedule (gradients zeroed first unless
        ``forward_only``); returns the last stage's per-micro-batch loss dicts."""
        if not forward_only:
            self._check_open()
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        kwargs = {}
        if adjust_tensor_shapes_fn is not None:
            kwargs["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=[self.model],
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=forward_only, **kwargs)

    def optimizer_step(self) -> tuple[bool, float | None, float]:
        """Advance the schedule, then step: step k trains at lr(k), so warmup's first step is not
        lr 0. Returns (applied, grad norm, lr)."""
        self._check_open()
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        return ok, (float(grad_norm) if grad_norm is not None else None), lr

    def _check_open(self) -> None:
        if self.closed:  # its gradients would no longer be reduced over data-parallel ranks
            raise RuntimeError("this engine was closed (Engine.close) and cannot train; "
                               "build another")
        if self.optimizer is None:
            raise RuntimeError("this engine runs forward passes only (build_forward_engine); "
                               "build_engine gives one that trains")

    def close(self) -> None:
        """Let the engine be freed once it is dropped; it cannot train after this.

        Megatron's DDP puts a hook that holds the DDP wrapper on every parameter's gradient
        accumulator. Those accumulators are reached through the autograd graph, which Python's
        collector cannot see: from DDP's ``grad_accs``, from the fp32 optimizer's views of the
        parameters (``model_param.view(-1)[...]``, not detached) and from tensors a module kept
        of its last forward (Megatron's token dispatcher keeps ``probs``); and a method cached
        on a class holds its instances (Megatron's ``RotaryEmbedding.forward`` is an
        ``lru_cache``, whose module holds the context-parallel group). An engine dropped
        without this stays alive with its model, buffers and every process group it holds, whose
        gloo threads keep running: a process that builds engines one after another (eval after
        training, notebooks, a test suite) grows by ~45 threads each (measured, docs/testing.md).
        """
        self.closed = True
        config = self.model.config
        config.finalize_model_grads_func = config.no_sync_func = config.grad_scale_func = None
        if hasattr(self.model, "grad_accs"):  # DDP's (a forward-only engine has none)
            self.model.grad_accs.clear()
        modules = list(self.model.modules())
        for cls in {klass for module in modules for klass in type(module).__mro__}:
            for attr in vars(cls).values():
                if callable(getattr(attr, "cache_clear", None)):
                    attr.cache_clear()  # as Megatron's YaRN embedding clears its own
        for module in modules:
            holders = [module, *(v for v in vars(module).values() if _plain_object(v))]
            for holder in holders:
                for name, value in list(vars(holder).items()):
                    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                        setattr(holder, name, None)


def _plain_object(value) -> bool:
    """An object a module keeps beside its submodules and tensors (a token dispatcher, say)."""
    return hasattr(value, "__dict__") and not callable(value) and not isinstance(value, torch.Tensor)


class ForwardOnly(torch.nn.Module):
    """A model chunk as Megatron's schedules take it for forward passes alone (evaluation):
    without DDP's gradient buffers (the size of the model, in fp32) and without an optimizer.
    ``module`` is the chunk, as on DDP."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.config = module.config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _one_dtype(module: torch.nn.Module, config: TransformerConfig) -> None:
    """One dtype for every parameter, as Megatron-LM's Float16Module makes it: Megatron's
    distributed optimizer orders a group's main params fp32-first, and its index map assumes no
    group mixes fp32 and bf16 (a mixed group breaks saving its state). Routers create their
    weights in fp32 (Megatron's and moue's); they compute in fp32 whatever their dtype."""
    for param in module.parameters():
        if param.dtype != config.params_dtype:
            param.data = param.data.to(config.params_dtype)


def build_forward_engine(module: torch.nn.Module) -> Engine:
    """An engine that runs ``module`` (this rank's chunk, on its device) forward through
    Megatron's schedules (every pipeline schedule) and cannot train; its parameters in one
    dtype, as the training engine's (``_one_dtype``)."""
    _one_dtype(module, module.config)
    return Engine(ForwardOnly(module), optimizer=None, scheduler=None)


def build_engine(module: torch.nn.Module, config: TransformerConfig, train: TrainConfig, *,
                 distributed_optimizer: bool = True) -> Engine:
    """Wrap ``module`` (this rank's model chunk, already on its device) for training."""
    bf16 = config.params_dtype == torch.bfloat16
    _one_dtype(module, config)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                              use_distributed_optimizer=distributed_optimizer),
        module=module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=train.lr, min_lr=train.min_lr,
                        weight_decay=train.weight_decay, clip_grad=train.clip_grad,
                        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, bf16=bf16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=distributed_optimizer),
        [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps, lr_decay_steps=train.steps,
        lr_decay_style="WSD" if train.schedule == "wsd" else "cosine",
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=train.steps,
        wd_incr_style="constant", wsd_decay_steps=max(1, train.steps // 5),
        lr_wsd_decay_style="linear", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Engine(model, optimizer, scheduler)
