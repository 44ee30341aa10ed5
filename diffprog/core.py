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
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .checks import (ArgumentError, LayerError, _checked, _describe, _outermost, _pattern, check_hyperparameters,
                     example_spec, spec_of)

Params = Any  # a nested dict of arrays

layerclass = dataclasses.dataclass(frozen=True, repr=False)
"""Decorator for layer classes: frozen (immutable, hashable) dataclasses with notation reprs."""


class Layer:
    """Base class. Subclasses are `@layerclass` dataclasses (see README, "Writing a layer").

    Required: `forward(params, x, *, key=None, **side) -> y` on one example.
    Optional, when the layer needs them:
    - `init_params(key, spec, **side) -> params` (spec: the ShapeDtypeStruct of one example;
      default: no params, {});
    - `side_inputs`: the names of the side inputs `forward` reads besides `key`;
    - `forward_batch(params, xs, **side)`: a faster batch path than vmap (default vmap);
    - `children() -> [(key, layer)]`: the sub-layers, for a layer built from others;
    - `init_cache` / `decode`: for a layer that carries state through generation (default:
      position-wise, no state).
    """

    side_inputs: frozenset = frozenset()

    def __post_init__(self):
        check_hyperparameters(self)

    # -- the protocol ------------------------------------------------------------------
    def init(self, key, x, **side) -> Params:
        """Parameters for inputs shaped like `x` (one example; array or ShapeDtypeStruct).

        Side inputs are optional here; give those a layer needs in order to run (e.g. the
        `context=` of cross-attention) so that shapes can be inferred through it.
        Called outside a trace, the whole initialisation runs as one program compiled for
        compile time (`QUICK_COMPILE`): XLA compiles each distinct op of an eager
        initialisation separately (charlm's 4-layer Transformer: 4.6 s, against 1.3 s); the
        values are the op-by-op run's (`jax.disable_jit()`) to float32 rounding."""
        leaves, structure = jax.tree.flatten(spec_of((x, side)))
        specs = (structure, tuple(leaves))  # hashable: a static argument of the compiled init
        if isinstance(key, jax.core.Tracer):
            return _init_params(self, key, specs)  # inside a trace: a composition's init, a user's jit
        return _compiled_init(self, key, specs)

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
        leaves = jax.tree.leaves(xs)
        if not leaves or jnp.ndim(leaves[0]) < 1:
            raise LayerError(f"{self!r}: expected a batch (B, ...), got {_describe(xs)}")
        side = {k: _as_array(v) for k, v in side.items()}
        rows = jnp.shape(leaves[0])[0]
        for k, v in side.items():
            for leaf in jax.tree.leaves(v) if k != "key" else ():
                if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != rows:
                    raise LayerError(f"{self!r}: side input {k}= has {jnp.shape(leaf)[0]} rows, the batch has "
                                     f"{rows} (shape {tuple(jnp.shape(leaf))})")
        return _checked(self, self.forward_batch, params, xs, lambda: (example_spec(xs), {
            k: example_spec(v) for k, v in side.items() if k != "key"}), side)

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

    # -- the layer tree ------------------------------------------------------------------
    def children(self) -> list:
        """The sub-layers: [(key, layer)], `key` the entry of this layer's params that holds the
        sub-layer's params (None: the sub-layer's params are this layer's own, e.g. `Remat`).
        `dp.walk` and `dp.rewrite` are built on it. A leaf layer has none."""
        return []

    def entry(self) -> "Layer | None":
        """The sub-layer that receives this layer's input unchanged (the first stage of a
        pipeline, the layer of `f ** n`), or None."""
        return None

    # -- incremental decoding (generation) ---------------------------------------------
    def init_cache(self, params, max_len: int, dtype=jnp.float32, **side):
        """State that `decode` carries from chunk to chunk ({} for position-wise layers).
        Side inputs fixed for the whole decoding (e.g. `context=` of cross-attention) are
        given here and kept in the cache."""
        return {}

    def decode(self, params, xs, cache, position):
        """Steps position..position+P-1 of a sequence layer at once: xs (P, ...) is that chunk
        of the input (P ≥ 1: a whole prompt, or one new token); returns (ys (P, ...), cache).
        The reference is `decode_steps`, one-step chunks in a scan; a chunk of P steps must
        give the same outputs and cache. Default: a position-wise layer, applied to the chunk."""
        return self.apply(params, xs), cache

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
        return Repeat(self, n)

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
        """The name in this layer's key in a composition's params ("0_Dense"): its class,
        never its hyperparameters, so that the params tree depends on the structure only."""
        return type(self).__name__


def _stages(layer: Layer) -> tuple:
    return layer.stages if isinstance(layer, Compose) else (layer,)


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
    """

    def named_stages(self):
        raise NotImplementedError

    def children(self):
        return self.named_stages()

    def entry(self):
        return self.named_stages()[0][1]

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
        return x

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return {n: s.init_cache(params[n], max_len, dtype, **self._mine(s, side)) for n, s in self.named_stages()}

    def decode(self, params, xs, cache, position):
        """The stages' `decode`, in order, each with its cache."""
        cache = dict(cache)
        for name, stage in self.named_stages():
            xs, cache[name] = stage.decode(params[name], xs, cache[name], position)
        return xs, cache


@layerclass
class Compose(Pipeline):
    """The pipeline `stages[-1] ∘ ... ∘ stages[0]` (stages[0] runs first).

    Params: `{"0_Conv": ..., "1_MaxPool": ..., ...}`, one entry per stage in running order.
    A `key=` is split per stage (`fold_in(key, i)`); other side inputs go to every stage that
    lists them in its `side_inputs`.
    """

    stages: tuple

    def names(self):
        """The params keys: "{running index}_{stage.name}"."""
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
    """f^n: n applications of `layer`, each with its own parameters (n ≥ 1; `f ** 1` too).

    When `layer` maps its input shape to itself, the n parameter sets are stacked on a leading
    axis, params = {"stack": p} with every leaf of p shaped (n, ...), and

        x_k = layer(p[k], x_{k-1}),  k = 1..n,   computed by one jax.lax.scan over k,

    so the traced program and compile time do not grow with n (for n ≤ UNROLLED_UP_TO = 4 the
    scan is unrolled, which runs faster), and a change of depth changes array shapes, not the
    params tree. Decoding runs the n applications one after another, each with its own cache (a
    tuple of n), so a step writes only its new keys and values; `unstacked` slices the stack once
    per `dp.generate` call. When only the first application changes the shape
    (FeedForward(64)^3 on a 10-vector), params = {"first": p_1, "stack": p_2..n} and the first
    application runs outside the scan. `key=` is folded with the application index k.
    """

    layer: Layer
    n: int

    @property
    def side_inputs(self):
        return self.layer.side_inputs

    def children(self):
        """("stack", layer): its params stacked on a leading axis; ("first", layer) when the first
        application changes the shape (present in params only then)."""
        return [("first", self.layer), ("stack", self.layer)]

    def entry(self):
        return self.layer

    def init_params(self, key, spec, **side):
        out = self.layer.out_spec(spec, **side)
        if _shapes(out) == _shapes(spec):
            return {"stack": self._stack(key, spec, self.n, side)}
        if self.n > 1 and _shapes(self.layer.out_spec(out, **side)) != _shapes(out):
            raise LayerError(f"{self!r}: {self.layer!r} maps {_describe(spec)} to "
                             f"{_describe(out)} and then to another shape; f ** n needs f to "
                             f"keep its shape after the first application (use dp.serial)")
        first, rest = jax.random.split(key)
        return {"first": self.layer.init(first, spec, **side), "stack": self._stack(rest, out, self.n - 1, side)}

    def _stack(self, key, spec, n, side):
        """n inits stacked, made one after another by lax.map: the same values as vmap's batch
        of n, its first init in a new process 0.9–0.95× as long (the README's 2-layer
        recurrent LMs, AMD EPYC)."""
        return jax.lax.map(lambda k: self.layer.init(k, spec, **side), jax.random.split(key, n))

    def route(self, run, params, x, *, key=None, **side):
        """The first application runs outside the scan when its params are separate ("first")
        or when x is not one array (a pytree that only the first application reads, e.g. the
        token ids and table of `dp.fusion`)."""
        def sub_side(k):
            return side if key is None else {**side, "key": jax.random.fold_in(key, k)}
        first, stack = params.get("first"), params["stack"]
        if first is None and not isinstance(x, jax.Array):
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

    def decode(self, params, xs, cache, position):
        """The layer's `decode` n times, each application with its cache: one after another, or,
        where the params are still stacked (not `unstacked`) over more than UNROLLED_UP_TO
        applications, as one lax.scan over them — a prompt read before `dp.generate`'s loop
        compiles once for all n (GPT-2 small's generate program: 5.6 → 4.2 s), its caches
        stacked for the scan and split after it."""
        if not isinstance(cache, tuple) or len(cache) != self.n:
            raise LayerError(f"{self!r}: expected a cache of {self.n} applications (its `init_cache`), got "
                             f"{len(cache) if isinstance(cache, tuple) else type(cache).__name__}")
        stack, done = params["stack"], int("first" in params)
        if isinstance(stack, tuple) or self.n - done <= UNROLLED_UP_TO:
            new = []
            for p, c in zip(self.applications(params), cache):
                xs, c = self.layer.decode(p, xs, c, position)
                new.append(c)
            return xs, tuple(new)
        first = ()
        if done:
            xs, c = self.layer.decode(params["first"], xs, cache[0], position)
            first = (c,)

        def step(h, p_c):
            p, c = p_c
            return self.layer.decode(p, h, c, position)
        xs, stacked = jax.lax.scan(step, xs, (stack, jax.tree.map(lambda *c: jnp.stack(c), *cache[done:])))
        return xs, first + tuple(jax.tree.map(lambda a: a[k], stacked) for k in range(self.n - done))

    @property
    def name(self):
        """"{layer.name}^n": the letter n, so that the key does not change with the depth."""
        return f"{self.layer.name}^n"

    def __repr__(self):
        inner = repr(self.layer)
        return f"({inner})^{self.n}" if isinstance(self.layer, Compose) else f"{inner}^{self.n}"


class Wrapper(Layer):
    """A layer around another, its field `layer`, whose params, side inputs, name, decoding and
    one sub-layer (at the same params path) are the wrapped layer's; a subclass changes how it
    runs (Remat, dp.batched, the fusion's halves, LowRank, ...)."""

    @property
    def side_inputs(self):
        return self.layer.side_inputs

    def children(self):
        return [(None, self.layer)]

    def entry(self):
        return self.layer

    def init_params(self, key, spec, **side):
        return self.layer.init(key, spec, **side)

    def forward(self, params, x, **side):
        return self.layer.forward(params, x, **side)

    def init_cache(self, params, max_len, dtype=jnp.float32, **side):
        return self.layer.init_cache(params, max_len, dtype, **side)

    def decode(self, params, xs, cache, position):
        return self.layer.decode(params, xs, cache, position)

    @property
    def name(self):
        return self.layer.name


@layerclass
class Remat(Combinator, Wrapper):
    """`layer` with rematerialisation: its activations are recomputed in the backward pass
    instead of stored (`jax.checkpoint`), trading compute for memory on long sequences.
    `Remat(TransformerBlock(...)) ** 24` checkpoints each block of the scan. `policy` is a
    `jax.checkpoint_policies` name (e.g. "dots_saveable": keep matmul results), or None
    (save nothing). Params, side inputs, outputs, caches and name are `layer`'s own.
    """

    layer: Layer
    policy: str = None

    def route(self, run, params, x, **side):
        policy = None if self.policy is None else getattr(jax.checkpoint_policies, self.policy)
        return jax.checkpoint(lambda p, x, s: run(self.layer, p, x, **s), policy=policy)(params, x, side)


# -- the layer tree: walk and rewrite ---------------------------------------------------------

def walk(layer: Layer, params=None) -> Iterator[tuple]:
    """Every layer in `layer`'s tree, itself first, depth first in `children()` order, as
    (path, layer, params): `path` the tuple of params keys from the root to the layer's params
    (`params[path[0]][path[1]]...`), and, when `params` are given, the layer's params (inside
    `f ** n`, stacked: every leaf with a leading axis of n). With params, a child whose key the
    params do not hold is left out (the "first" of an `f ** n` that keeps its shape).

        for path, sub, p in dp.walk(model, params):
            if isinstance(sub, dp.Attention): print(path, jax.tree.map(jnp.shape, p))
    """
    yield (), layer, params
    for key, child in layer.children():
        if key is None:
            yield from walk(child, params)
        elif params is None:
            yield from (((key,) + path, sub, None) for path, sub, _ in walk(child))
        elif isinstance(params, dict) and key in params:
            yield from (((key,) + path, sub, p) for path, sub, p in walk(child, params[key]))


def find(layer: Layer, kind: type, params=None) -> list:
    """The params paths of the layers of type `kind` (exactly) in `layer`'s tree, in `walk`
    order: where a loader puts a checkpoint's weights, found by structure, not by key names."""
    return [path for path, sub, _ in walk(layer, params) if type(sub) is kind]


def built_field():
    """A field for the sub-layers a layer builds from its hyperparameters (a TransformerBlock's
    attention and feed-forward): set in `__post_init__` (`set_built`), rebuilt by
    `dataclasses.replace`, kept as edited by `dp.rewrite`. Not in the repr, compared as any field."""
    return dataclasses.field(init=False, repr=False)


def set_built(layer: Layer, name: str, value) -> None:
    object.__setattr__(layer, name, value)


def rewrite(layer: Layer, select: Callable[[Layer], bool], replace: Callable[[Layer], Layer]) -> Layer:
    """`layer` with every sub-layer that `select` picks replaced by `replace(sub)`, top down (a
    replaced layer is not searched further). The tree searched is the layers' fields: every
    field that holds a layer, a tuple of layers (the stages of a composition) or of (name,
    layer) pairs (the parts a TransformerBlock builds from its hyperparameters, `built_field`).
    The result is a new layer; `layer` is unchanged. Params follow the structure: a replacement
    with the same params (a wrapper, a layer of another kind with equal keys) reads the old
    params as they are.

        rms = dp.rewrite(model, lambda l: isinstance(l, dp.LayerNorm), lambda l: dp.RMSNorm(l.eps))
    """
    if select(layer):
        return replace(layer)
    if not dataclasses.is_dataclass(layer):
        return layer
    changes, built = {}, {}
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, Layer):
            new = rewrite(value, select, replace)
        elif isinstance(value, tuple) and value and all(isinstance(v, Layer) for v in value):
            new = tuple(rewrite(v, select, replace) for v in value)
        elif isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Layer)
                                                         for v in value):
            new = tuple((k, rewrite(v, select, replace)) for k, v in value)
        else:
            continue
        if any(a is not b for a, b in zip(jax.tree.leaves(new, is_leaf=_is_layer), jax.tree.leaves(value, is_leaf=_is_layer))):
            (changes if f.init else built)[f.name] = new
    if not changes and not built:
        return layer
    new = dataclasses.replace(layer, **changes)
    for name, value in built.items():
        set_built(new, name, value)
    return new


def _is_layer(x) -> bool:
    return isinstance(x, Layer)


def unstacked(layer: Layer, params):
    """`params` with the stack of every `f ** n` inside `layer` sliced into a tuple of n
    per-application trees, which `Repeat.decode` reads as they are. `dp.generate` calls it once,
    after reading the prompt and before its loop: XLA does not hoist a slice out of a loop, so
    inside it slicing the stack copies every weight at every token (GPT-2 small: 340 MB, a third
    of a step)."""
    if isinstance(layer, Repeat):
        apps = [unstacked(layer.layer, p) for p in layer.applications(params)]
        first = {"first": apps.pop(0)} if "first" in params else {}
        return {**first, "stack": tuple(apps)}
    for key, child in layer.children():
        if key is None:
            params = unstacked(child, params)
        elif isinstance(params, dict) and key in params:
            params = {**params, key: unstacked(child, params[key])}
    return params


def decode_steps(layer: Layer, params, xs, cache, position=0):
    """The reference of every `decode`: `layer.decode` on one-step chunks at positions
    position..position+P-1 of xs (P, ...), as one lax.scan: (ys (P, ...), cache)."""
    def step(cache, x_position):
        x, t = x_position
        y, cache = layer.decode(params, x[None], cache, t)
        return cache, y[0]
    cache, ys = jax.lax.scan(step, cache, (xs, position + jnp.arange(xs.shape[0])))
    return ys, cache


def _as_array(value):
    """A side input given as a list of numbers (e.g. lengths=[5, 2]) as an array."""
    if isinstance(value, list) and all(isinstance(e, (int, float, np.number)) for e in value):
        return jnp.asarray(value)
    return value


def _init_params(layer, key, specs):
    spec, side = jax.tree.unflatten(*specs)
    with _outermost():  # the applies inside init (shape inference) check no params
        return layer.init_params(key, spec, **side)


QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False}
"""`compiler_options` for a program that runs once or does little (`Layer.init`, the training
loop's finiteness check, an experiment's batch windows): the least compile time — LLVM at -O0
and, on the CPU, the classic element-wise emitters (the main job's models' init: 1.6–2.6 s with
XLA's defaults, 0.4–0.6 s with these, Xeon)."""
_compiled_init = jax.jit(_init_params, static_argnums=(0, 2), compiler_options=QUICK_COMPILE)
