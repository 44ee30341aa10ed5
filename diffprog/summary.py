"""summary(model, x): each stage's type signature, parameter count and FLOP count."""
from __future__ import annotations

import math

import jax
import jax.extend.core as jex

from .checks import _describe, spec_of
from .core import Layer, Pipeline


def product_flops(jaxpr: jex.Jaxpr) -> int:
    """2 × the multiply-adds of the matrix products (dot_general) and convolutions in `jaxpr`:
    the model FLOPs that MFU counts. A scan's body counts `length` times, a cond its costliest
    branch, a while loop's body once (its trip count is not known before it runs)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            per_output = math.prod(eqn.invars[0].aval.shape[d] for d in contracted)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape  # per output feature: the kernel's other entries
            per_output = math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        subs = [product_flops(sub) for sub in jex.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(subs)
        elif eqn.primitive.name == "cond":
            total += max(subs)
        else:
            total += sum(subs)
    return total


def summary(model: Layer, x, *, print_fn=print) -> str:
    """A table with one row per stage of `model` (one example `x`; the stages of a pipeline:
    a composition, a TransformerBlock, a LanguageModel's embedding, body and norm), returned and printed.

    Columns: stage (the notes' notation), input → output (shape dtype), parameter count, and
    the FLOPs of the stage's forward pass in its matrix products and convolutions
    (`product_flops`; element-wise work is not counted). Scans count every step: a recurrent
    layer's T steps, the n applications of `f ** n`.
    """
    stages = [stage for _, stage in model.named_stages()] if isinstance(model, Pipeline) else [model]
    spec = spec_of(x)
    rows, total_params, total_flops = [], 0, 0
    for stage in stages:
        params = jax.eval_shape(lambda s: stage.init(jax.random.key(0), s), spec)
        traced, out = jax.make_jaxpr(stage.apply, return_shape=True)(params, spec)
        n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
        flops = product_flops(traced.jaxpr)
        rows.append((repr(stage), f"{_describe(spec)} → {_describe(out)}", f"{n:,}", f"{flops:,}"))
        total_params, total_flops, spec = total_params + n, total_flops + flops, out
    rows.append(("total", "", f"{total_params:,}", f"{total_flops:,}"))
    header = ("stage", "input → output", "params", "FLOPs")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    text = "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
    print_fn(text)
    return text
