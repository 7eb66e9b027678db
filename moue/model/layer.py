"""A TransformerLayer that carries the router's trajectory state from layer to layer and stage to
stage, and that elastic training can skip.

The state travels in Megatron's ``context`` argument, which ``TransformerBlock`` threads through
its layer loop and its full-recompute checkpoints (so recompute sees it as an input). GPT layers
have no cross-attention, so ``context`` is free. Across pipeline stages the state rides along
the hidden states: the last layer of a non-last stage returns ``[hidden, state]`` concatenated
on the channel axis and the first layer of the next stage splits it off again. The schedules
must then send tensors ``state_dim`` channels wider (``moue.model.builder.pipeline_shapes``).

Shapes: hidden ``[s, b, h]``, state ``[s, b, d]`` (``s`` a shard under sequence parallelism).
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class MoUETransformerLayer(TransformerLayer):
    def __init__(self, *args, state_dim: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dim = state_dim
        self.unpack_state = False  # first layer of a non-first pipeline stage
        self.pack_state = False  # last layer of a non-last pipeline stage
        self.skip = False  # elastic training: the layer acts as the identity
        # elastic micro-batches: [b] bool, the samples for which it acts as the identity (the
        # layer computes them with the others, so every rank joins its collectives)
        self.skip_b: torch.Tensor | None = None
        # Under full recompute the settings each micro-batch ran with, for its recomputation
        # (``_recomputed``); a FIFO because pipeline schedules recompute in forward order.
        self.recompute_queue: deque = deque()

    def forward(self, hidden_states, *args, context=None, **kwargs):
        if self.config.recompute_granularity != "full" or not self.training:
            return self._forward(hidden_states, *args, context=context, **kwargs)
        with self._recomputed():
            return self._forward(hidden_states, *args, context=context, **kwargs)

    def _forward(self, hidden_states, *args, context=None, **kwargs):
        if not self.state_dim:
            if self.skip:
                return hidden_states, None
            output, _ = super().forward(hidden_states, *args, context=None, **kwargs)
            return self._keep_skipped(hidden_states, output), None
        hidden = hidden_states
        if self.unpack_state:
            hidden, state = hidden_states.split([hidden_states.shape[-1] - self.state_dim,
                                                 self.state_dim], dim=-1)
        elif context is None:
            state = hidden.new_zeros(*hidden.shape[:-1], self.state_dim)  # r_0 = 0
        else:
            state = context
        output = hidden
        if not self.skip:
            router = self.mlp.router if self.is_moe_layer else None
            if router is not None:
                router.state_in = state
            output, _ = super().forward(hidden, *args, context=None, **kwargs)
            output = self._keep_skipped(hidden, output)
            if router is not None:
                state_in = state
                state, router.state_in, router.state_out = router.state_out, None, None
                state = self._keep_skipped(state_in, state)
        if self.pack_state:
            output = torch.cat([output, state.to(output.dtype)], dim=-1)
        return output, state

    def _keep_skipped(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """``after`` with the samples in ``skip_b`` (axis 1 of ``[s, b, ...]``) put back to
        ``before``."""
        if self.skip_b is None:
            return after
        return torch.where(self.skip_b[None, :, None], before, after)

    def _routing(self):
        return self.mlp.router.shared if self.is_moe_layer else None

    @contextlib.contextmanager
    def _recomputed(self):
        """Full recompute: the first pass of a checkpointed forward runs without gradients and
        is recomputed in the backward pass, under a pipeline schedule after later micro-batches
        have put their elastic draws on the model (``moue.elastic.microbatch``). The first pass
        queues what it ran with; the recomputation runs with it again."""
        shared = self._routing()
        if not torch.is_grad_enabled():
            self.recompute_queue.append((self.skip_b, shared and shared.elastic))
            yield
            return
        if not self.recompute_queue:  # a forward with gradients and no checkpoint around it
            yield
            return
        now = (self.skip_b, shared and shared.elastic)
        self.skip_b, elastic = self.recompute_queue.popleft()
        if shared is not None:
            shared.elastic = elastic
        try:
            yield
        finally:
            self.skip_b = now[0]
            if shared is not None:
                shared.elastic = now[1]
