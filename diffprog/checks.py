"""What the kit checks at its boundaries, and the errors it raises: the errors, the specs of
inputs (`spec_of`), the hyperparameter checks every layer runs at construction, and the params
check the outermost `apply` runs when it is traced."""
from __future__ import annotations

import dataclasses
import functools
import re
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class ArgumentError(ValueError):
    """A diffprog function or layer called with something it cannot use. The message names the
    function or layer, what it expected and what it got."""


class LayerError(ArgumentError):
    """Bad input to a layer. The message names the layer, what it expected and what it got."""


_POSITIVE_INTS = {"int": False, "Union[int, tuple]": False, "Union[int, tuple, None]": True}
_UNIT_INTERVAL = ("dropout", "attention_dropout", "rate")  # probabilities in [0, 1)
_POSITIVE_FLOATS = ("temperature", "eps")


def check_hyperparameters(layer) -> None:
    """Raise LayerError unless every size (a field annotated int, or int-or-tuple: sizes,
    heads, strides, windows, kernels) is a positive int (or a tuple of them), every dropout
    rate lies in [0, 1) and every temperature and epsilon is > 0."""
    name = type(layer).__name__
    for f in dataclasses.fields(layer):
        if not f.init:  # built from the others (set after this check)
            continue
        value = getattr(layer, f.name)
        bad = None
        if f.type in _POSITIVE_INTS and not (value is None and _POSITIVE_INTS[f.type]):
            entries = value if isinstance(value, tuple) and f.type != "int" else (value,)
            if not entries or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                      for v in entries):
                bad = "a positive int" + ("" if f.type == "int" else " or a tuple of positive ints")
        elif f.name in _UNIT_INTERVAL and not (isinstance(value, (int, float)) and 0 <= value < 1):
            bad = "a number in [0, 1)"
        elif f.name in _POSITIVE_FLOATS and not (isinstance(value, (int, float)) and value > 0):
            bad = "a number > 0" + (" (hard choices are hard=True)" if f.name == "temperature" else "")
        if bad:
            raise LayerError(f"{name}: {f.name} must be {bad}, got {value!r}")


def spec_of(x) -> Any:
    """The `jax.ShapeDtypeStruct` of an array (or of every leaf of a pytree of arrays)."""
    def one(a):
        if isinstance(a, jax.ShapeDtypeStruct):
            return a
        return jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))
    return jax.tree.map(one, x)


def example_spec(batch) -> Any:
    """`spec_of` one example of a batch: every leaf's leading (batch) axis dropped."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), spec_of(batch))


def _describe(x) -> str:
    s = spec_of(x)
    if isinstance(s, jax.ShapeDtypeStruct):
        return f"{tuple(s.shape)} {s.dtype}"
    return repr(jax.tree.map(lambda a: f"{tuple(a.shape)} {a.dtype}", s))


def _pattern(p) -> str:
    return "(" + ", ".join(str(d) for d in p) + ("," if len(p) == 1 else "") + ")"


_state = threading.local()


class _outermost:
    """`with _outermost() as outer:` — outer is True for the outermost init/apply of a call tree
    (the layers inside a composition are not checked again)."""

    def __enter__(self):
        self.outer = not getattr(_state, "inside", False)
        _state.inside = True
        return self.outer

    def __exit__(self, *exc):
        if self.outer:
            _state.inside = False


def path_name(path) -> str:
    """A pytree path as "['a'][0]['b']", the same for dicts, namedtuples and orbax metadata."""
    def entry(k):
        for attribute in ("key", "name", "idx"):
            if hasattr(k, attribute):
                return f"[{getattr(k, attribute)!r}]"
        return str(k)
    return "".join(entry(k) for k in path)


def _leaf_kinds(tree) -> dict:
    """{path: (shape, kind)} of a params tree; kind is "float", "int" or the dtype."""
    def kind(dtype):
        return "float" if jnp.issubdtype(dtype, jnp.floating) else "int" if jnp.issubdtype(dtype, jnp.integer) else str(dtype)
    return {path_name(path): (tuple(np.shape(a)), kind(jnp.result_type(a)))
            for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=256)
def _expected_params(layer, x_spec, side_spec):
    spec = jax.tree.unflatten(x_spec[0], x_spec[1])
    side = jax.tree.unflatten(side_spec[0], side_spec[1])
    return _leaf_kinds(jax.eval_shape(lambda key: layer.init(key, spec, **side), jax.random.key(0)))


def check_params(layer, params, x_spec, side_spec) -> None:
    """Raise LayerError unless `params` has the structure, leaf shapes and kinds (float / int)
    of `layer.init(key, x)` for an input like `x_spec`, naming the path of the first mismatch:
    params of another configuration (Dense(8)'s in a Dense(4) model, a missing bias) never run
    silently. It runs at the outermost apply, in Python, when the call is traced: under jit it is
    part of tracing and costs nothing per step. (Floating dtypes may differ: a bf16 cast of the
    params is the same params.)"""
    flat = lambda tree: (jax.tree.structure(tree), tuple(jax.tree.leaves(tree)))
    try:
        expected = _expected_params(layer, flat(x_spec), flat(side_spec))
    except TypeError:  # an unhashable layer or spec: compute without the cache
        expected = _expected_params.__wrapped__(layer, flat(x_spec), flat(side_spec))
    got = _leaf_kinds(params)
    if got == expected:
        return
    for path in sorted(set(expected) | set(got)):
        if expected.get(path) != got.get(path):
            show = lambda v: "absent" if v is None else f"{v[0]} {v[1]}"
            old = any(re.search(r"\^\d+'\]", p) for p in got) or any("^n'" in p for p in set(expected) - set(got))
            hint = (" (params saved by diffprog 0.1, whose f ** n keys held n and f ** 1 was not stacked? "
                    "convert them with dp.upgrade_params(model, params, x))") if old else " (params from another configuration?)"
            raise LayerError(f"{layer!r}: params{path} is {show(got.get(path))}, expected {show(expected.get(path))}{hint}")


def _checked(layer, forward, params, x, specs, side):
    """forward(params, x, **side); the outermost call then checks the params (`check_params`).
    The layer's own input checks come first (their message names the input); a failure that is
    not a LayerError is explained by a params mismatch when there is one."""
    with _outermost() as outer:
        if not outer:
            return forward(params, x, **side)
        try:
            y = forward(params, x, **side)
        except LayerError:
            raise
        except Exception as error:
            check_params(layer, params, *specs())
            raise error
        check_params(layer, params, *specs())
        return y
