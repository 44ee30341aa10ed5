"""The accelerator path lowers where no accelerator is at hand, and a model exports for CPU
serving: `jax.export` of the experiments' models, train step and generation.

CPU-only code (the C++ kernels, their partitioning, the XLA:CPU product rewrite) sits behind
`lax.platform_dependent` in `dp.kernels`; a program lowered for cuda or tpu must hold none of it.
An export for the CPU holds the kernels' custom calls, which `jax.export` refuses (their targets
have no compatibility guarantee), unless it is traced inside `dp.kernels.disabled()`."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp
from experiments import charlm, compare

CPU_ONLY = ("diffprog_", "CustomSPMDPartitioning", "optimization_barrier")

IDS = jnp.arange(2 * 12).reshape(2, 12) % 7


def language_models():
    return {body: charlm.build(body, 7, 2, 2, 16, 12, 0.1) for body in ("rnn", "lstm", "transformer")}


def classifiers():
    task = compare.TASKS["parens"]
    return {name: compare.build(name, task, 12, 8) for name in compare.MODELS}


def train_step_and_args(model, targets_like):
    step = dp.TrainStep(model, lambda out, b: dp.metrics.cross_entropy(out, b["targets"]), optax.adam(1e-3))
    state = jax.eval_shape(lambda: step.init(model.init(jax.random.key(0), IDS[0])))
    return step, (state, {"inputs": IDS, "targets": targets_like})


def programs():
    """(name, function, args): each experiment model's train step, and generation for the LMs;
    the params as shapes and dtypes (an export needs no values)."""
    for name, model in language_models().items():
        step, args = train_step_and_args(model, IDS)
        yield f"charlm {name} train step", step, args
        params = args[0]["params"]
        yield f"charlm {name} generate", lambda params, prompts, model=model: dp.generate(model, params, prompts, 4), (params, IDS[:, :4])
    for name, model in classifiers().items():
        step, args = train_step_and_args(model, IDS % 2)
        yield f"compare {name} train step", step, args
    for name, model in {"rnn": dp.rnn_seq2seq(7, 7, 16), "transformer": dp.transformer_seq2seq(7, 7, 16, 2, 32, 1, 12)}.items():
        params = jax.eval_shape(model.init, jax.random.key(0), (IDS[0], IDS[0]))
        yield f"seq2seq {name} translate", lambda params, sources, model=model: dp.translate(model, params, sources, 5, 1), (params, IDS)


@pytest.mark.slow
def test_the_experiments_models_export_for_accelerators_without_cpu_code():
    """One export per program for both accelerator platforms: the module holds each platform's
    lowering, and none of them a CPU-only call."""
    for name, function, args in programs():
        exported = jax.export.export(jax.jit(function), platforms=["cuda", "tpu"])(*args)
        assert exported.platforms == ("cuda", "tpu")
        found = [marker for marker in CPU_ONLY if marker in exported.mlir_module()]
        assert not found, f"{name}: {found}"


def test_a_cpu_export_needs_the_reference_paths_and_then_computes_the_same():
    model = language_models()["lstm"]
    params = model.init(jax.random.key(0), IDS[0])
    forward = lambda params, ids: dp.batched(model).apply(params, ids)
    with pytest.raises(Exception, match="compatibility guarantees"):
        jax.export.export(jax.jit(forward), platforms=["cpu"])(params, IDS)
    with dp.kernels.disabled():
        exported = jax.export.export(jax.jit(lambda params, ids: forward(params, ids)), platforms=["cpu"])(params, IDS)
    assert "diffprog_" not in exported.mlir_module()
    served = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(served.call(params, IDS), jax.jit(forward)(params, IDS), atol=1e-5)
