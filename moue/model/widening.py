"""Progressive widening: a standard MoE's layers open the rest of a rotational window gradually.

A standard-topology model already holds the union pool: layer ``l`` owns pool experts
``[l*N, (l+1)*N)`` (``moe.widen_block = N``). ``moue-convert widen`` rewrites it with
``moe.topology=rotational``, ``moe.stride = N`` and a window ``W >= N`` starting at the own block,
every weight unchanged and each new router row copied from the router of the layer that owned
that expert. During the first ``moe.widen_steps = R`` steps the router adds ``log(t/R)`` to the
logits of the window's foreign experts (``t`` = steps trained; a large negative number at
``t = 0``), i.e. multiplies their softmax scores by ``t/R``; the trajectory-state term, if any, is
scaled by ``t/R`` too. At ``t = 0`` the model computes exactly what the standard model computed;
from ``t = R`` on it is the plain rotational MoUE. The scale depends on the step alone, so every
layout and a resumed run compute the same.
"""

from __future__ import annotations

from moue.model.router import UniversalRouter


def widen_scale(step: int, steps: int) -> float:
    """How far the foreign experts are open after ``step`` steps of a ramp of ``steps``."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def set_widening(model_chunks, step: int, steps: int) -> None:
    """Set the step's opening on every router (they share one ``SharedRouting``)."""
    scale = widen_scale(step, steps)
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, UniversalRouter):
                module.shared.widen_scale = scale
