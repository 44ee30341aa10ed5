"""summary(model, x): each stage's type signature, parameter count and FLOP estimate."""
from __future__ import annotations

import jax
import numpy as np

from .core import Compose, Layer, _describe, spec_of


def _flops(layer: Layer, params_spec, spec) -> float:
    cost = jax.jit(layer.apply).lower(params_spec, spec).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def summary(model: Layer, x, *, print_fn=print) -> str:
    """A table with one row per stage of `model` (one example `x`), returned and printed.

    Columns: stage (the notes' notation), input → output (shape dtype), parameter count, and
    FLOPs as XLA's cost analysis of that stage's compiled forward pass counts them (an
    estimate: XLA counts the body of a scan once, so `f ** n` rows are under-counted).
    """
    stages = model.stages if isinstance(model, Compose) else (model,)
    spec = spec_of(x)
    rows, total_params, total_flops = [], 0, 0.0
    for stage in stages:
        params = jax.eval_shape(lambda s: stage.init(jax.random.key(0), s), spec)
        out = jax.eval_shape(stage.apply, params, spec)
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        flops = _flops(stage, params, spec)
        rows.append((repr(stage), f"{_describe(spec)} → {_describe(out)}", f"{n:,}", f"{flops:,.0f}"))
        total_params, total_flops, spec = total_params + n, total_flops + flops, out
    rows.append(("total", "", f"{total_params:,}", f"{total_flops:,.0f}"))
    header = ("stage", "input → output", "params", "FLOPs")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    text = "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
    print_fn(text)
    return text
