"""The generated tasks mean what their docstrings say."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments import tasks


def test_adding(key):
    b = tasks.adding(key, 64, 30)
    x, y = np.asarray(b["inputs"]), np.asarray(b["targets"])
    assert x.shape == (64, 30, 2) and y.shape == (64, 1)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all() and (marks[:, :15].sum(1) == 1).all()
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * marks).sum(1), rtol=1e-6)
    big = tasks.adding(key, 20000, 10)["targets"]
    assert abs(float(jnp.mean((big - 1.0) ** 2)) - 1 / 6) < 0.01  # the baseline's MSE


def test_copy(key):
    b = tasks.copy(key, 8, delay=5, symbols=3)
    x, y, m = map(np.asarray, (b["inputs"], b["targets"], b["mask"]))
    assert x.shape == (8, 11)
    assert (x[:, 3:8] == tasks.COPY_BLANK).all() and (x[:, 8] == tasks.COPY_GO).all()
    np.testing.assert_array_equal(y[m].reshape(8, 3), x[:, :3])
    assert m[:, 8:].all() and not m[:, :8].any()


def test_parens_depth_is_the_running_count(key):
    b = tasks.parens(key, 16, 40, max_depth=4)
    chars, depth = np.asarray(b["inputs"]), np.asarray(b["targets"])
    np.testing.assert_array_equal(depth, np.cumsum(np.where(chars == 0, 1, -1), 1))
    assert depth.min() >= 0 and depth.max() <= 4


def test_recall_target_is_the_value_of_the_query_key(key):
    b = tasks.recall(key, 32, pairs=5)
    x, y = np.asarray(b["inputs"]), np.asarray(b["targets"])
    assert x.shape == (32, 6, 33)
    for row, target in zip(x, y):
        keys, values = row[:5, :16].argmax(-1), row[:5, 16:32].argmax(-1)
        assert len(set(keys)) == 5 and row[5, 32] == 1 and row[:5, 32].sum() == 0
        q = row[5, :16].argmax()
        assert values[list(keys).index(q)] == target


def test_selective_copy_hides_the_tokens_in_noise_and_asks_for_them_in_order(key):
    batch = tasks.selective_copy(key, 64, 20, symbols=4, alphabet=8)
    inputs, targets, mask = (np.asarray(batch[k]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape == (64, 24) and mask[:, 20:].all() and not mask[:, :20].any()
    for row, target in zip(inputs, targets):
        scattered = row[:20][row[:20] != tasks.SELECT_NOISE]
        np.testing.assert_array_equal(scattered, target[20:])  # the tokens, in the order they came
        assert ((2 <= scattered) & (scattered < 10)).all() and (row[20:] == tasks.SELECT_GO).all()
    positions = [np.flatnonzero(row[:20]) for row in inputs]
    assert len({tuple(p) for p in positions}) > 32  # the positions differ from row to row


def test_mqar_queries_every_key_for_its_value(key):
    batch = tasks.mqar(key, 32, 6, n_keys=16, n_values=16)
    inputs, targets, mask = (np.asarray(batch[k]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape == (32, 18) and mask[:, 12:].all() and not mask[:, :12].any()
    for row, target in zip(inputs, targets):
        keys, values = row[:12:2], row[1:12:2] - 16
        assert len(set(keys)) == 6 and (keys < 16).all() and ((0 <= values) & (values < 16)).all()
        assert sorted(row[12:]) == sorted(keys)  # every key asked once
        lookup = dict(zip(keys, values))
        np.testing.assert_array_equal(target[12:], [lookup[q] for q in row[12:]])
