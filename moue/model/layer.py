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

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class MoUETransformerLayer(TransformerLayer):
    def __init__(self, *args, state_dim: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_dim = state_dim
        self.unpack_state = False  # first layer of a non-first pipeline stage
        self.pack_state = False  # last layer of a non-last pipeline stage
        self.skip = False  # elastic training: the layer acts as the identity

    def forward(self, hidden_states, *args, context=None, **kwargs):
        if not self.state_dim:
            if self.skip:
                return hidden_states, None
            output, _ = super().forward(hidden_states, *args, context=None, **kwargs)
            return output, None
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
            if router is not None:
                state, router.state_in, router.state_out = router.state_out, None, None
        if self.pack_state:
            output = torch.cat([output, state.to(output.dtype)], dim=-1)
        return output, state
