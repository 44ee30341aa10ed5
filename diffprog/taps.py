"""Reading what a layer inside a model sees, without re-writing the model's forward pass:

    for t in dp.taps(model, params, x, lambda l: isinstance(l, dp.Attention)):
        _, alpha = dataclasses.replace(t.layer, return_weights=True).apply(t.params, t.input)

`taps` runs the model once, eagerly, on one example, with every layer that `select` picks
wrapped (`dp.rewrite`) to record its params and input; the n applications of `f ** n` run one
after another (each application's own params) and a `Remat` runs its layer plainly, so that
every recorded value is a concrete array. The model and its params are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from .checks import _outermost, check_params, spec_of
from .core import Combinator, Layer, Remat, Repeat, Wrapper, layerclass, rewrite, walk


class Tapped(NamedTuple):
    """One call of a selected layer: its params path in the model (the same for every
    application of `f ** n`: they come in order), the layer, its params and its input."""
    path: tuple
    layer: Layer
    params: Any
    input: Any


@layerclass
class _Tap(Wrapper):
    """`layer`, recording (slot, params, input) of each call into `record`."""

    layer: Layer
    slot: Any  # an index from 0 (not a size)
    record: list = dataclasses.field(compare=False, hash=False)

    def forward(self, params, x, **side):
        self.record.append((self.slot, params, x))
        return self.layer.apply(params, x, **side)


@layerclass
class _Unrolled(Combinator, Wrapper):
    """`layer` (an f ** n) with its applications run one after another in Python."""

    layer: Repeat

    def route(self, run, params, x, *, key=None, **side):
        for k, p in enumerate(self.layer.applications(params)):
            x = run(self.layer.layer, p, x, **side, **({} if key is None else {"key": jax.random.fold_in(key, k)}))
        return x


def taps(model: Layer, params, x, select: Callable[[Layer], bool], **side) -> list:
    """Each call of a layer that `select` picks, in running order, as `Tapped(path, layer,
    params, input)`, from one run of `model` on the one example `x` (side inputs as for `apply`)."""
    record, slots = [], []

    def tapped(layer):
        if select(layer):
            slots.append(layer)
            return _Tap(layer, len(slots) - 1, record)
        if isinstance(layer, Repeat):
            return _Unrolled(dataclasses.replace(layer, layer=everywhere(layer.layer)))
        return everywhere(layer.layer)  # Remat: its layer, plainly

    def everywhere(layer):
        return rewrite(layer, lambda l: select(l) or isinstance(l, (Repeat, Remat)), tapped)

    instrumented = everywhere(model)
    paths = {sub.slot: path for path, sub, _ in walk(instrumented, params) if isinstance(sub, _Tap)}
    check_params(model, params, spec_of(x), {k: spec_of(v) for k, v in side.items() if k != "key"})
    with _outermost():  # checked above, on the model itself: the instrumented one runs without the check
        instrumented.apply(params, x, **side)
    return [Tapped(paths[slot], slots[slot], p, value) for slot, p, value in record]
