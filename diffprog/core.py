"""The layer protocol and the composition algebra of the notes: `f @ g` is f ∘ g, `f ** n` is f^n.

A layer is an immutable value holding hyperparameters only. Its parameters live in a plain
pytree (nested dicts of arrays) that `init` builds from ONE example and `apply` consumes:

    params = layer.init(key, x)          # x: an array or a jax.ShapeDtypeStruct
    y      = layer.apply(params, x, **side)   # == layer(params, x, **side)

Side inputs are keyword-only. `key=` is accepted by every layer (stochastic ones use it,
the rest ignore it); other side inputs (`lengths=`, `mask=`, ...) are listed in a layer's
`side_inputs` and a composition forwards each one to the stages that read it.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a nested dict of arrays

layerclass = dataclasses.dataclass(frozen=True, repr=False)
"""Decorator for layer classes: frozen (immutable, hashable) dataclasses with notation reprs."""


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


class Layer:
    """Base class. Subclasses are `@layerclass` dataclasses and define

    - `init_params(key, spec) -> params` (spec: the ShapeDtypeStruct of one example),
    - `forward(params, x, *, key=None, **side) -> y`,
    - `side_inputs`: the names of the side inputs `forward` reads, besides `key`.
    """

    side_inputs: frozenset = frozenset()

    def __post_init__(self):
        check_hyperparameters(self)

    # -- the protocol ------------------------------------------------------------------
    def init(self, key, x, **side) -> Params:
        """Parameters for inputs shaped like `x` (one example; array or ShapeDtypeStruct).

        Side inputs are optional here; give those a layer needs in order to run (e.g. the
        `context=` of cross-attention) so that shapes can be inferred through it."""
        with _outermost():  # the applies inside init (shape inference) check no params
            return self.init_params(key, spec_of(x), **spec_of(side))

    def apply(self, params: Params, x, **side):
        """Run the layer on one example. Pure; works under jit, vmap and grad. The outermost
        call checks `params` against what `init` makes for this input (see `check_params`)."""
        self._check_side(side)
        return _checked(self, self.forward, params, x, lambda: (spec_of(x), {k: spec_of(v) for k, v in side.items()
                                                                           if k != "key"}), side)

    def apply_batch(self, params: Params, xs, **side):
        """Run the layer on a batch (B, ...) → (B, ...): `jax.vmap(apply)` over axis 0 of `xs`
        and of every side input. With `key=` every example gets its own randomness (dropout
        masks differ across examples; the numbers are not those of vmap with split keys).
        A layer with a batch-level implementation (`forward_batch`) runs it instead: the
        position-wise layers as one array, the recurrent layers as one loop over (B, hidden)."""
        self._check_side(side)
        if isinstance(xs, Deferred):
            xs = xs if self.reads_deferred else xs.materialize()
        leaves = jax.tree.leaves(xs)
        if not leaves or jnp.ndim(leaves[0]) < 1:
            raise LayerError(f"{self!r}: expected a batch (B, ...), got {_describe(xs)}")
        side = {k: _as_array(v) for k, v in side.items()}
        rows = (xs.shape if isinstance(xs, Deferred) else jnp.shape(leaves[0]))[0]
        for k, v in side.items():
            for leaf in jax.tree.leaves(v) if k != "key" else ():
                if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != rows:
                    raise LayerError(f"{self!r}: side input {k}= has {jnp.shape(leaf)[0]} rows, the batch has "
                                     f"{rows} (shape {tuple(jnp.shape(leaf))})")
        return _checked(self, self.forward_batch, params, xs, lambda: (example_spec(xs), {
            k: example_spec(v) for k, v in side.items() if k != "key"}), side)

    reads_deferred = False
    """True for a layer whose `forward_batch` takes a `Deferred` batch as it is (see there)."""

    def _check_side(self, side):
        unknown = set(side) - set(self.side_inputs) - {"key"}
        if unknown:
            raise LayerError(f"{self!r}: unexpected side input(s) {sorted(unknown)}; "
                             f"it takes key= and {sorted(self.side_inputs) or 'nothing else'}")

    def __call__(self, params: Params = None, x=None, **side):
        """`layer(params, x, **side)` is `layer.apply(params, x, **side)`; `layer()` with no
        arguments is the layer itself, so `dp.Flatten()` and `dp.Flatten` are the same value."""
        if params is None and x is None and not side:
            return self
        if x is None:
            raise LayerError(f"{self!r}: called with params but no input; write {self!r}(params, x), "
                             f"or {self!r} alone for the layer")
        return self.apply(params, x, **side)

    def init_params(self, key, spec, **side) -> Params:
        return {}

    def forward(self, params, x, **side):
        raise NotImplementedError

    def forward_batch(self, params, xs, *, key=None, **side):
        """`forward` over a batch: the one fast path a layer may override. By default
        `jax.vmap` of `apply`, one key per example."""
        keys = None if key is None else jax.random.split(key, jax.tree.leaves(xs)[0].shape[0])

        def one(x, k, s):
            return self.apply(params, x, **s, **({} if k is None else {"key": k}))
        return jax.vmap(one)(xs, keys, side)

    def out_spec(self, x, **side):
        """Output ShapeDtypeStruct for an input like `x`, computed without running anything."""
        return jax.eval_shape(lambda x, side: self.apply(self.init(jax.random.key(0), x, **side), x, **side),
                              spec_of(x), spec_of(side))

    # -- incremental decoding (generation) ---------------------------------------------
    def init_cache(self, params, max_len: int, dtype=jnp.float32, **side):
        """State that `decode` carries from step to step ({} for position-wise layers).
        Side inputs fixed for the whole decoding (e.g. `context=` of cross-attention) are
        given here and kept in the cache."""
        return {}

    def decode(self, params, x_t, cache, position):
        """One step of a sequence layer: x_t is step `position` of the input (one row of
        (T, d), or one token id). Default: a position-wise layer, applied to x_t alone.
        Returns (y_t, cache)."""
        return self.apply(params, x_t[None])[0], cache

    def prefill(self, params, xs, cache):
        """Steps 0..P-1 of a decoding at once (a prompt): xs (P, ...) → (ys (P, ...), cache),
        what `decode` at positions 0..P-1 returns (`decode_steps`, the reference). A layer
        that keeps the default `decode` is position-wise and runs on all of xs; a layer with a
        `decode` of its own runs it step by step unless it overrides `prefill` (causal
        self-attention writes its KV cache in one pass)."""
        if type(self).decode is Layer.decode:
            return self.apply(params, xs), cache
        return decode_steps(self, params, xs, cache)

    # -- the algebra -------------------------------------------------------------------
    def __matmul__(self, other: "Layer") -> "Layer":
        """`f @ g` is the composition f ∘ g: g runs first."""
        if not isinstance(other, Layer):
            return NotImplemented
        return Compose(_stages(other) + _stages(self))

    def __pow__(self, n: int) -> "Layer":
        """`f ** n` is f^n: n applications of f with n independent parameter sets."""
        if not isinstance(n, int) or n < 1:
            raise LayerError(f"{self!r} ** {n!r}: the power must be an int >= 1")
        return self if n == 1 else Repeat(self, n)

    # -- errors and notation -----------------------------------------------------------
    def expect(self, x, *patterns, dtype: str = "float") -> None:
        """Raise LayerError unless `x` matches one of `patterns` and has the right dtype kind.

        A pattern is a tuple with one entry per axis: an int fixes the axis size, a str (a
        name like "T" or "d") leaves it free. `dtype` is "float", "int" or "any".
        """
        s = spec_of(x)
        if not isinstance(s, jax.ShapeDtypeStruct):
            raise LayerError(f"{self!r}: expected one array, got {_describe(x)}")
        ok_shape = any(len(p) == len(s.shape) and all(isinstance(d, str) or d == n
                                                     for d, n in zip(p, s.shape))
                       for p in patterns)
        kind = {"float": jnp.floating, "int": jnp.integer}.get(dtype)
        ok_dtype = kind is None or jnp.issubdtype(s.dtype, kind)
        if not (ok_shape and ok_dtype):
            want = " or ".join(_pattern(p) for p in patterns)
            want += "" if kind is None else f" {dtype}"
            raise LayerError(f"{self!r}: expected input {want}, got {_describe(s)}")

    def __repr__(self) -> str:
        fields = [f for f in dataclasses.fields(self) if f.repr]
        parts = []
        for f in fields:
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING:
                parts.append(repr(value))
            elif value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @property
    def name(self) -> str:
        """Short name used for this layer's key in a composition's params."""
        return repr(self).split("(")[0]


def _stages(layer: Layer) -> tuple:
    return layer.stages if isinstance(layer, Compose) else (layer,)


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
            raise LayerError(f"{layer!r}: params{path} is {show(got.get(path))}, expected {show(expected.get(path))} "
                             f"(params from another configuration?)")


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


class Deferred:
    """A batch that a layer hands on unevaluated, because the next layer can compute from it
    more cheaply than from its value (`dp.fusion.TokenVectors`: looked-up token vectors kept as
    (table, ids)). `apply_batch` materializes it for every layer that does not read it
    (`reads_deferred`)."""

    def materialize(self):
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Run:
    """How a combinator runs its parts: on one example (`EXAMPLE`) or on a batch (`BATCH`).
    A combinator writes its routing once, `route(run, params, x, **side)`, and calls each part
    as `run(part, part_params, x, **side)`, so a batch reaches every part's own batch path."""

    batched: bool

    def __call__(self, layer: "Layer", params, x, **side):
        return (layer.apply_batch if self.batched else layer.apply)(params, x, **side)

    def example(self, x):
        """The ShapeDtypeStruct of one example of `x`."""
        return example_spec(x) if self.batched else spec_of(x)

    def each(self, fn):
        """`fn` of one example, applied to every example (vmapped over axis 0) on a batch."""
        return jax.vmap(fn) if self.batched else fn

    def keys(self, key, x):
        """One key for the example, or one per example of the batch (None stays None)."""
        if key is None or not self.batched:
            return key
        return jax.random.split(key, jax.tree.leaves(x)[0].shape[0])


EXAMPLE, BATCH = Run(False), Run(True)


class Combinator(Layer):
    """A layer computed from other layers (or from its own parts on any leading axes). It
    defines `route(run, params, x, **side)` once; `forward` is its route on one example,
    `forward_batch` its route on a batch."""

    def route(self, run: Run, params, x, **side):
        raise NotImplementedError

    def forward(self, params, x, **side):
        return self.route(EXAMPLE, params, x, **side)

    def forward_batch(self, params, xs, **side):
        return self.route(BATCH, params, xs, **side)


class Pipeline(Combinator):
    """A layer that runs named stages one after another: `named_stages()` gives (name, layer)
    pairs in running order; params, caches and the per-stage key are keyed by those names.

    Stage i gets `fold_in(key, i)` and the side inputs it lists in its `side_inputs`.
    A `Deferred` batch passes through to the first stage as it is.
    """

    reads_deferred = True

    def named_stages(self):
        raise NotImplementedError

    @property
    def side_inputs(self):
        return frozenset().union(*(s.side_inputs for _, s in self.named_stages()))

    @staticmethod
    def _mine(stage, side):
        return {k: v for k, v in side.items() if k in stage.side_inputs}

    def init_params(self, key, spec, **side):
        params, stages = {}, self.named_stages()
        for i, (name, stage) in enumerate(stages):
            mine = self._mine(stage, side)
            params[name] = stage.init(jax.random.fold_in(key, i), spec, **mine)
            if i + 1 < len(stages):
                spec = jax.eval_shape(lambda p, x, s: stage.apply(p, x, **s), params[name], spec, mine)
        return params

    def route(self, run, params, x, *, key=None, **side):
        for i, (name, stage) in enumerate(self.named_stages()):
            x = run(stage, params[name], x, key=None if key is None else jax.random.fold_in(key, i),
                    **self._mine(stage, side))
        return x.materialize() if isinstance(x, Deferred) else x

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return {n: s.init_cache(params[n], max_len, dtype, **self._mine(s, side)) for n, s in self.named_stages()}

    def decode(self, params, x_t, cache, position):
        return self._through("decode", params, x_t, cache, position)

    def prefill(self, params, xs, cache):
        return self._through("prefill", params, xs, cache)

    def _through(self, method, params, x, cache, *position):
        """The stages' `decode` (one step) or `prefill` (P steps), in order, each with its cache."""
        cache = dict(cache)
        for name, stage in self.named_stages():
            x, cache[name] = getattr(stage, method)(params[name], x, cache[name], *position)
        return x, cache


@layerclass
class Compose(Pipeline):
    """The pipeline `stages[-1] ∘ ... ∘ stages[0]` (stages[0] runs first).

    Params: `{"0_Conv": ..., "1_MaxPool": ..., ...}`, one entry per stage in running order.
    A `key=` is split per stage (`fold_in(key, i)`); other side inputs go to every stage that
    lists them in its `side_inputs`.
    """

    stages: tuple

    def names(self):
        return [f"{i}_{s.name}" for i, s in enumerate(self.stages)]

    def named_stages(self):
        return list(zip(self.names(), self.stages))

    @property
    def name(self):
        return "serial"

    def __repr__(self):
        return " ∘ ".join(repr(s) for s in reversed(self.stages))


def serial(*layers: Layer) -> Layer:
    """The left-to-right pipeline: `serial(a, b, c) == c @ b @ a`."""
    if not layers:
        raise LayerError("serial(): needs at least one layer")
    return Compose(sum((_stages(l) for l in layers), ()))


def _shapes(spec):
    return jax.tree.map(lambda s: (tuple(s.shape), s.dtype), spec)


UNROLLED_UP_TO = 4
"""`f ** n` with n up to this runs its scan unrolled: faster at run time (no stacked copies of
each application's residuals), with a compile time that only grows with n beyond it."""


@layerclass
class Repeat(Combinator):
    """f^n: n applications of `layer`, each with its own parameters.

    When `layer` maps its input shape to itself, the n parameter sets are stacked on a leading
    axis, params = {"stack": p} with every leaf of p shaped (n, ...), and

        x_k = layer(p[k], x_{k-1}),  k = 1..n,   computed by one jax.lax.scan over k,

    so the traced program and compile time do not grow with n (for n ≤ UNROLLED_UP_TO = 4 the
    scan is unrolled, which runs faster). Decoding (`decode`, `prefill`) runs the n applications
    one after another, each with its own cache (a tuple of n), so a step writes only its new
    keys and values; `unstacked` slices the stack once per `dp.generate` call. When only the first
    application changes the shape (FeedForward(64)^3 on a 10-vector), params =
    {"first": p_1, "stack": p_2..n} and the first application runs outside the scan.
    `key=` is folded with the application index k.
    """

    layer: Layer
    n: int
    reads_deferred = True

    @property
    def side_inputs(self):
        return self.layer.side_inputs

    def init_params(self, key, spec, **side):
        out = self.layer.out_spec(spec, **side)
        if _shapes(out) == _shapes(spec):
            return {"stack": self._stack(key, spec, self.n, side)}
        if _shapes(self.layer.out_spec(out, **side)) != _shapes(out):
            raise LayerError(f"{self!r}: {self.layer!r} maps {_describe(spec)} to "
                             f"{_describe(out)} and then to another shape; f ** n needs f to "
                             f"keep its shape after the first application (use dp.serial)")
        first, rest = jax.random.split(key)
        return {"first": self.layer.init(first, spec, **side), "stack": self._stack(rest, out, self.n - 1, side)}

    def _stack(self, key, spec, n, side):
        return jax.vmap(lambda k: self.layer.init(k, spec, **side))(jax.random.split(key, n))

    def route(self, run, params, x, *, key=None, **side):
        """The first application runs outside the scan when its params are separate ("first")
        or when x is not a value the scan can carry (a `Deferred` batch)."""
        def sub_side(k):
            return side if key is None else {**side, "key": jax.random.fold_in(key, k)}
        first, stack = params.get("first"), params["stack"]
        if first is None and isinstance(x, Deferred):
            first, stack = jax.tree.map(lambda a: a[0], stack), jax.tree.map(lambda a: a[1:], stack)
        done = 0 if first is None else 1
        if first is not None:
            x = run(self.layer, first, x, **sub_side(0))

        def step(h, p_k):
            p, k = p_k
            return run(self.layer, p, h, **sub_side(k)), None

        x, _ = jax.lax.scan(step, x, (stack, done + jnp.arange(self.n - done)), unroll=self.n <= UNROLLED_UP_TO)
        return x

    # -- decoding: one application after another, each with its own params and cache --------
    def applications(self, params) -> list:
        """The params of each application in order: `params["stack"]` sliced (or, when
        `unstacked` has already sliced it, as it is), after `params["first"]` if any."""
        stack, stacked = params["stack"], self.n - ("first" in params)
        if isinstance(stack, tuple) and len(stack) != stacked:
            raise LayerError(f"{self!r}: unstacked params hold {len(stack)} applications, expected {stacked}")
        apps = list(stack) if isinstance(stack, tuple) else [jax.tree.map(lambda a: a[k], stack) for k in range(stacked)]
        return ([params["first"]] if "first" in params else []) + apps

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        """A tuple of n caches, one per application: decoding updates each in place."""
        return tuple(self.layer.init_cache(p, max_len, dtype, **side) for p in self.applications(params))

    def decode(self, params, x_t, cache, position):
        return self._through("decode", params, x_t, cache, position)

    def prefill(self, params, xs, cache):
        return self._through("prefill", params, xs, cache)

    def _through(self, method, params, x, cache, *position):
        """The layer's `decode` or `prefill` n times, each application with its cache."""
        if not isinstance(cache, tuple) or len(cache) != self.n:
            raise LayerError(f"{self!r}: expected a cache of {self.n} applications (its `init_cache`), got "
                             f"{len(cache) if isinstance(cache, tuple) else type(cache).__name__}")
        new = []
        for p, c in zip(self.applications(params), cache):
            x, c = getattr(self.layer, method)(p, x, c, *position)
            new.append(c)
        return x, tuple(new)

    @property
    def name(self):
        return f"{self.layer.name}^{self.n}"

    def __repr__(self):
        inner = repr(self.layer)
        return f"({inner})^{self.n}" if isinstance(self.layer, Compose) else f"{inner}^{self.n}"


@layerclass
class Remat(Combinator):
    """`layer` with rematerialisation: its activations are recomputed in the backward pass
    instead of stored (`jax.checkpoint`), trading compute for memory on long sequences.
    `Remat(TransformerBlock(...)) ** 24` checkpoints each block of the scan. `policy` is a
    `jax.checkpoint_policies` name (e.g. "dots_saveable": keep matmul results), or None
    (save nothing). Params, side inputs and outputs are `layer`'s own.
    """

    layer: Layer
    policy: str = None
    reads_deferred = True

    @property
    def side_inputs(self):
        return self.layer.side_inputs

    def init_params(self, key, spec, **side):
        return self.layer.init(key, spec, **side)

    def route(self, run, params, x, **side):
        policy = None if self.policy is None else getattr(jax.checkpoint_policies, self.policy)
        return jax.checkpoint(lambda p, x, s: run(self.layer, p, x, **s), policy=policy)(params, x, side)

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.layer.init_cache(params, max_len, dtype, **side)

    def decode(self, params, x_t, cache, position):
        return self.layer.decode(params, x_t, cache, position)

    def prefill(self, params, xs, cache):
        return self.layer.prefill(params, xs, cache)

    @property
    def name(self):
        return self.layer.name


@layerclass
class Batched(Layer):
    """`layer` over a leading batch axis: (B, *example) → (B, *out), by `layer.apply_batch`.

    Built by `dp.batched(layer)`. `init` takes a batch and initialises `layer` from one
    example of it; params are `layer`'s own. `key=` is split into B keys, one per example
    (so dropout masks differ across examples); every other side input is batched along axis 0.
    Without `key=` the result equals `jax.vmap(layer.apply)`; recurrent layers run faster this way.
    """

    layer: Layer

    @property
    def side_inputs(self):
        return self.layer.side_inputs

    def init_params(self, key, spec, **side):
        if any(len(s.shape) < 1 for s in jax.tree.leaves(spec)):
            raise LayerError(f"{self!r}: expected a batch (B, ...), got {_describe(spec)}")
        return self.layer.init(key, example_spec(spec), **example_spec(side))

    def forward(self, params, x, **side):
        return self.layer.apply_batch(params, x, **side)

    def __repr__(self):
        return f"batched({self.layer!r})"


def unstacked(layer: Layer, params):
    """`params` with the stack of every `f ** n` inside `layer` (through `Pipeline` stages and
    `Remat`) sliced into a tuple of n per-application trees, which `Repeat.decode` reads as they
    are. `dp.generate` calls it once, before its loop: XLA does not hoist a slice out of a loop,
    so inside it slicing the stack copies every weight at every token (GPT-2 small: 340 MB, a
    third of a step). Layers it does not look into keep their stacks, sliced per step."""
    if isinstance(layer, Repeat):
        apps = [unstacked(layer.layer, p) for p in layer.applications(params)]
        first = {"first": apps.pop(0)} if "first" in params else {}
        return {**first, "stack": tuple(apps)}
    if isinstance(layer, Remat):
        return unstacked(layer.layer, params)
    if isinstance(layer, Pipeline):
        return {**params, **{n: unstacked(s, params[n]) for n, s in layer.named_stages()}}
    return params


def decode_steps(layer: Layer, params, xs, cache):
    """`layer.decode` at positions 0..P-1 over xs (P, ...), as one lax.scan: (ys (P, ...), cache).
    The reference every `prefill` computes."""
    def step(cache, x_position):
        y, cache = layer.decode(params, x_position[0], cache, x_position[1])
        return cache, y
    cache, ys = jax.lax.scan(step, cache, (xs, jnp.arange(xs.shape[0])))
    return ys, cache


def _as_array(value):
    """A side input given as a list of numbers (e.g. lengths=[5, 2]) as an array."""
    if isinstance(value, list) and all(isinstance(e, (int, float, np.number)) for e in value):
        return jnp.asarray(value)
    return value


def batched(layer: Layer) -> Batched:
    """vmap `layer` over a leading batch axis, splitting `key=` per example. See `Batched`."""
    return Batched(layer)
