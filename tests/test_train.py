"""The trainer: reproducibility, checkpoints and resume, bad states, data parallel, bf16."""
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffprog as dp

import train_toy

SCRIPT = str(Path(__file__).parent / "train_toy.py")


def test_training_reduces_loss_writes_metrics_and_is_reproducible(tmp_path):
    a = train_toy.run(tmp_path / "a", 40)
    b = train_toy.run(tmp_path / "b", 40)
    chex.assert_trees_all_equal(a.params, b.params)
    losses = [h["loss"] for h in a.history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 41)) and all(l["tokens_per_s"] > 0 for l in lines)
    other = dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=3, seed=4, quiet=True)
    assert not np.allclose(other.params["0_FeedForward^n"]["first"]["weight"], a.params["0_FeedForward^n"]["first"]["weight"])


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    n = 6
    full = train_toy.run(tmp_path / "full", 2 * n, checkpoint_every=n)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path / "killed"), str(2 * n), str(n),
                             "--hang-after", str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    saved = tmp_path / "killed" / "checkpoints" / str(n)
    deadline = time.time() + 240
    while not (saved.exists() and any(saved.iterdir())) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved.exists(), proc.stderr.read().decode()[-2000:]
    resumed = train_toy.run(tmp_path / "killed", 2 * n, checkpoint_every=n, resume=True)
    assert resumed.step == 2 * n
    chex.assert_trees_all_equal(resumed.params, full.params)
    chex.assert_trees_all_equal(resumed.opt_state, full.opt_state)


def test_keep_last_n_checkpoints(tmp_path):
    train_toy.run(tmp_path, 10, checkpoint_every=2)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [6, 8, 10]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def data(step):
        batch = train_toy.data(step)
        return {**batch, "inputs": batch["inputs"] * (jnp.nan if step == 7 else 1.0)}
    run = lambda **kw: dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, data, steps=12,
                                workdir=tmp_path, checkpoint_every=5, quiet=True, **kw)
    with pytest.raises(dp.TrainingError, match=r"step 7: loss is nan; training stopped \(last good checkpoint: step 5"):
        run()
    good = train_toy.run(tmp_path / "ref", 5)
    restored = dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, data, steps=5, seed=3,
                        workdir=tmp_path, checkpoint_every=5, resume=True, quiet=True)
    assert restored.step == 5
    chex.assert_tree_all_finite(restored.params)


def test_non_finite_parameters_after_a_finite_loss_are_not_saved(tmp_path):
    poisoned = optax.chain(train_toy.OPTIMIZER, optax.stateless(lambda updates, params: jax.tree.map(
        lambda u: u.at[(0,) * u.ndim].set(jnp.inf) if u.ndim == 2 else u, updates)))
    with pytest.raises(dp.TrainingError, match=r"step 0: parameters are not finite; checkpoint not saved"):
        dp.train(train_toy.MODEL, train_toy.loss, poisoned, train_toy.data, steps=3, workdir=tmp_path,
                 checkpoint_every=1, quiet=True)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_corrupt_and_incompatible_checkpoints_name_the_file(tmp_path):
    train_toy.run(tmp_path, 4, checkpoint_every=4)
    wide = dp.Dense(1) @ dp.FeedForward(32) ** 2
    with pytest.raises(dp.CheckpointError, match=r"checkpoints/4: .*(32|16)"):
        dp.train(wide, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=8, workdir=tmp_path,
                 checkpoint_every=4, resume=True, quiet=True)
    for f in (tmp_path / "checkpoints" / "4").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data, not the metadata
            f.write_bytes(b"garbage" * 3)
    with pytest.raises(dp.CheckpointError, match=r"checkpoints/4: cannot restore checkpoint"):
        train_toy.run(tmp_path, 8, checkpoint_every=4, resume=True)
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text("{not json")
    with pytest.raises(dp.CheckpointError, match=r"checkpoints/4: cannot restore checkpoint"):
        train_toy.run(tmp_path, 8, checkpoint_every=4, resume=True)


def test_data_parallel_on_four_devices_matches_one():
    """conftest gives this process 4 host devices: the batch split over them (and, with fsdp,
    the params too) trains to the 1-device losses."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    losses = lambda result: [h["loss"] for h in result.history]
    one = losses(train_toy.run(None, 20))
    assert len(one) == 20
    np.testing.assert_allclose(losses(train_toy.run(None, 20, mesh=mesh)), one, atol=1e-5)
    np.testing.assert_allclose(losses(train_toy.run(None, 20, mesh=mesh, fsdp=True)), one, atol=1e-5)


def test_equal_train_calls_compile_once(compiles, tmp_path):
    """A second dp.train with the same model, loss and optimiser objects and batch shapes compiles
    nothing (init, step, evaluation, clipping), nor does one resuming the first's checkpoint;
    another optimiser object compiles its step."""
    run = lambda optimizer, steps=3, **kw: dp.train(
        train_toy.MODEL, train_toy.loss, optimizer, train_toy.data, steps=steps, quiet=True, clip_norm=1.0,
        eval_data=[train_toy.data(99)], eval_every=2, workdir=tmp_path, checkpoint_every=3, **kw)
    run(train_toy.OPTIMIZER)
    before = len(compiles)
    run(train_toy.OPTIMIZER)
    assert len(compiles) == before
    assert run(train_toy.OPTIMIZER, steps=5, resume=True).step == 5  # restored arrays: the same program
    assert len(compiles) == before
    run(optax.adam(1e-2))
    assert len(compiles) > before
    plain = lambda: dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=3, quiet=True)
    plain()  # no evaluation: nothing else holds the first call's TrainStep
    gc.collect()
    before = len(compiles)
    plain()
    assert len(compiles) == before


def test_bf16_compute_trains_like_float32():
    f32 = train_toy.run(None, 60)
    bf16 = train_toy.run(None, 60, compute_dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16.params)[0].dtype == jnp.float32
    last = lambda r: np.mean([h["loss"] for h in r.history[-10:]])
    assert abs(last(bf16) - last(f32)) < 0.05 + 0.2 * last(f32)
    assert last(bf16) < 0.5 * np.mean([h["loss"] for h in bf16.history[:5]])


def test_eval_metrics_and_helpers():
    logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]]))
    targets = jnp.array([[0, 1], [2, 1]])
    nats = dp.metrics.cross_entropy(logits, targets)
    np.testing.assert_allclose(nats, -np.mean(np.log([0.7, 0.8, 0.4, 0.25])), rtol=1e-5)
    np.testing.assert_allclose(dp.metrics.bits(nats), nats / np.log(2), rtol=1e-6)
    np.testing.assert_allclose(dp.metrics.perplexity(nats), np.exp(nats), rtol=1e-6)
    np.testing.assert_allclose(dp.metrics.accuracy(logits, targets), 0.75)
    np.testing.assert_allclose(dp.metrics.exact_match(logits, targets), 0.5)
    mask = jnp.array([[1, 1], [1, 0]])
    np.testing.assert_allclose(dp.metrics.accuracy(logits, targets, mask), 1.0)
    np.testing.assert_allclose(dp.metrics.exact_match(logits, targets, mask), 1.0)
    result = dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=10, quiet=True,
                      eval_data=[train_toy.data(1000 + i) for i in range(2)], eval_every=5,
                      eval_metrics={"mae": lambda o, b: jnp.abs(o - b["targets"]).mean()})
    evals = [h for h in result.history if "eval_loss" in h]
    assert [e["step"] for e in evals] == [5, 10] and all(e["eval_mae"] > 0 for e in evals)


def test_the_loop_reads_the_loss_only_when_it_logs(monkeypatch):
    """The host waits for the device only at a log step (and before a checkpoint, an evaluation
    and the end), not after every step; a non-finite loss between two reads is still reported
    with its own step (test_nan_loss_stops_and_keeps_the_last_good_checkpoint)."""
    reads = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(x) or real(x))
    result = dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=20,
                      log_every=10, quiet=True)
    assert [len(r) for r in reads] == [10, 10] and [h["step"] for h in result.history] == [10, 20]


def test_train_step_is_pure_and_matches_the_loop():
    step = dp.TrainStep(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER)
    params = train_toy.MODEL.init(jax.random.fold_in(jax.random.key(3), 0), jnp.zeros(4))
    state = step.init(params, seed=3)
    for i in range(3):
        state, _ = jax.jit(step)(state, train_toy.data(i))
    looped = dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=3, seed=3, quiet=True)
    chex.assert_trees_all_close(state["params"], looped.params, atol=1e-6)
    chex.assert_trees_all_equal(step.init(params, seed=3)["params"], params)  # init did not change the caller's


def test_params_given_to_train_stay_usable():
    """The compiled step donates its state; params= given by the caller are copied first, so the
    same starting point can train twice (e.g. two arms of a study) with the same result."""
    init = lambda: train_toy.MODEL.init(jax.random.key(3), train_toy.data(0)["inputs"][0])
    params, before = init(), init()  # (a numpy view of params would keep XLA from donating them)
    runs = [dp.train(train_toy.MODEL, train_toy.loss, train_toy.OPTIMIZER, train_toy.data, steps=3, params=params,
                     quiet=True) for _ in range(2)]
    chex.assert_trees_all_equal(params, before)
    chex.assert_trees_all_equal(runs[0].params, runs[1].params)
    assert not np.allclose(runs[0].params["0_FeedForward^n"]["first"]["weight"], before["0_FeedForward^n"]["first"]["weight"])
