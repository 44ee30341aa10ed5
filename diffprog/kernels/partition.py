"""The C++ kernels under a mesh and under vmap: each device runs its own shard of the batch.

XLA cannot look inside a custom call, so by itself it all-gathers a sharded batch in front of a
kernel and runs the whole batch on every device. `batch_partitioned` tells the partitioner that
the kernel is independent across its batch factor (`custom_partitioning`, with a Shardy rule),
and gives it a vmap rule.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def _factors(rule):
    """'t b g, g -> t b h' → ([['t', 'b', 'g'], ['g']], [['t', 'b', 'h']])."""
    operands, results = rule.split("->")
    parse = lambda side: [term.split() for term in side.split(",")]
    return parse(operands), parse(results)


def _batch_dims(factors, ndim, batch):
    """The positions of the batch factor in an array of `ndim` axes: every axis '...' stands
    for when batch is '...', else the position of the factor named `batch`."""
    if batch == "...":
        return list(range(ndim - (len(factors) - 1))) if "..." in factors else []
    return [factors.index(batch)] if batch in factors else []


def batch_partitioned(rule: str, batch: str = "..."):
    """Decorator for fn(*arrays) -> tuple of arrays whose examples are independent along the
    `batch` factor of the einsum-like `rule` ('...' or a factor name such as 'b').

    Under a mesh, each device runs fn on its shard of the batch (the batch keeps the sharding it has in
    the first operand that has it; every other axis is whole); on one device, fn itself. Under vmap, a
    '...' batch takes the mapped axis as one more batch axis (operands without '...', such as a
    bias, stay as they are); a named one, or a mapped operand without '...', runs fn once per
    mapped example (`lax.map`)."""
    operand_factors, result_factors = _factors(rule)

    def shardings(mesh, arg_shapes, result_ndims):
        factors, first = next((f, a) for f, a in zip(operand_factors, arg_shapes) if _batch_dims(f, a.ndim, batch))
        spec = tuple(first.sharding.spec) + (None,) * (first.ndim - len(first.sharding.spec))
        batch_spec = [spec[d] for d in _batch_dims(factors, first.ndim, batch)]

        def sharding(factors, ndim):
            entries = [None] * ndim
            for d, axis in zip(_batch_dims(factors, ndim, batch), batch_spec):
                entries[d] = axis
            return NamedSharding(mesh, P(*entries))
        return (tuple(sharding(f, a.ndim) for f, a in zip(operand_factors, arg_shapes)),
                tuple(sharding(f, n) for f, n in zip(result_factors, result_ndims)))

    def decorate(fn):
        partitioned = custom_partitioning(fn)

        def infer(mesh, arg_shapes, result_shape):
            return shardings(mesh, arg_shapes, [r.ndim for r in result_shape])[1]

        def partition(mesh, arg_shapes, result_shape):
            args, results = shardings(mesh, arg_shapes, [r.ndim for r in result_shape])
            return mesh, fn, results, args

        partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)

        @jax.custom_batching.custom_vmap
        def call(*args):
            return partitioned(*args)

        @call.def_vmap
        def mapped(axis_size, in_batched, *args):
            # an operand without the batch factor (e.g. a bias) that is itself mapped: one call per example
            if batch == "..." and not any(b and "..." not in f for f, b in zip(operand_factors, in_batched)):
                args = [a if b or "..." not in f else jnp.broadcast_to(a, (axis_size,) + a.shape)
                        for a, b, f in zip(args, in_batched, operand_factors)]
                outs = call(*args)
            else:
                mapped_args = [a for a, b in zip(args, in_batched) if b]

                def one(example):
                    it = iter(example)
                    return call(*[next(it) if b else a for a, b in zip(args, in_batched)])
                outs = jax.lax.map(one, mapped_args)
            return outs, (True,) * len(outs)
        return call
    return decorate


def product_partitioned(fn, transpose_a: bool, transpose_b: bool):
    """fn(a, b) = op(a) op(b) (see `dp.kernels.gemm`) under a mesh, split along the sharding of
    a's first axis: op(a)'s rows (each device computes its rows of the result), or, with
    `transpose_a`, the contracted axis (each device multiplies its slice of both operands, and
    the partial products are summed across the devices). Every other axis is whole."""
    a_factors = "k m" if transpose_a else "m k"
    b_factors = "n k" if transpose_b else "k n"
    partitioned = custom_partitioning(fn)

    def shardings(mesh, arg_shapes):
        spec = tuple(arg_shapes[0].sharding.spec)
        axis = spec[0] if spec else None
        a = NamedSharding(mesh, P(axis, None))
        if not transpose_a:
            return axis, (a, NamedSharding(mesh, P())), NamedSharding(mesh, P(axis, None))
        b = NamedSharding(mesh, P(None, axis) if transpose_b else P(axis, None))
        return axis, (a, b), NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        axis, args, result = shardings(mesh, arg_shapes)
        if transpose_a and axis is not None:
            return mesh, lambda a, b: jax.lax.psum(fn(a, b), axis), result, args
        return mesh, fn, result, args

    partitioned.def_partition(partition, infer_sharding_from_operands=lambda mesh, args, result: shardings(mesh, args)[2],
                              sharding_rule=f"{a_factors}, {b_factors} -> m n")
    return partitioned


def summed_partitioned(fn, ndim: int):
    """fn(a, b) = Σ over the leading axes of a (..., K) and b (..., N) (see
    `dp.kernels.summed_products`; ndim axes each) under a mesh, split along the sharding the
    leading axes of a have: each device sums its slice of both, and the partial sums are added
    across the devices. The last axes are whole; the rows are never gathered."""
    def shardings(mesh, arg_shapes):
        spec = tuple(arg_shapes[0].sharding.spec)[:ndim - 1]
        leading = spec + (None,) * (ndim - 1 - len(spec))
        operand = NamedSharding(mesh, P(*leading, None))
        return leading, (operand, operand), NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        leading, args, result = shardings(mesh, arg_shapes)
        axes = tuple(a for entry in leading if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,)))
        return mesh, (lambda a, b: jax.lax.psum(fn(a, b), axes)) if axes else fn, result, args

    partitioned = custom_partitioning(fn)
    factors = " ".join(f"r{i}" for i in range(ndim - 1))
    partitioned.def_partition(partition, infer_sharding_from_operands=lambda mesh, args, result: shardings(mesh, args)[2],
                              sharding_rule=f"{factors} k, {factors} n -> k n")
    return partitioned
