"""The modern sequence models: the Llama-style Transformer ("Transformer++": RMSNorm, rotary
positions, SwiGLU, grouped-query attention, no biases) and Mamba's selective state space, each
against its equations and against Hugging Face `transformers` (random weights, small configs)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffprog as dp

from helpers import assert_causal_lm_equals

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
MAMBA = dict(vocab_size=99, hidden_size=32, state_size=8, num_hidden_layers=2, bos_token_id=0, eos_token_id=0,
             pad_token_id=0)


def reference(kind, **config):
    torch.manual_seed(0)
    cls, config_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "mamba": ("MambaForCausalLM", "MambaConfig")}[kind]
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**config)).eval()
    if kind == "mamba":  # random weights where HF initialises constants (D = 1, conv bias 0): every weight must count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("mixer.D", "conv1d.bias", "norm.weight", "norm_f.weight")):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def state_dict(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}


def test_rotary_grouped_attention_is_its_equations(key):
    """kv_heads = 2 of 4: each key/value head is read by two query heads; rotary: q and k are
    rotated by t·θ^(−2i/D) (halves), so scores depend on t − s only."""
    attention = dp.Attention(4, causal=True, kv_heads=2, rotary=100.0, use_bias=False)
    x = jax.random.normal(key, (6, 16))
    p = attention.init(key, x)
    assert p["key"]["weight"].shape == (16, 8) and p["query"]["weight"].shape == (16, 16)

    def rope(y):  # y (T, n, 4): the pairs (y_i, y_{i+2}) turned by t·θ^(−i/2)
        t = np.arange(y.shape[0])[:, None, None]
        angle = t * (1.0 / 100.0 ** (np.arange(2) * 2 / 4))[None, None, :]
        first, second = y[..., :2], y[..., 2:]
        return np.concatenate([first * np.cos(angle) - second * np.sin(angle),
                               second * np.cos(angle) + first * np.sin(angle)], -1)
    q = rope(np.asarray(x @ p["query"]["weight"]).reshape(6, 4, 4))
    k = np.repeat(rope(np.asarray(x @ p["key"]["weight"]).reshape(6, 2, 4)), 2, axis=1)
    v = np.repeat(np.asarray(x @ p["value"]["weight"]).reshape(6, 2, 4), 2, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / 2 + np.where(np.tril(np.ones((6, 6))), 0, -np.inf)
    alpha = np.exp(scores - scores.max(-1, keepdims=True))
    alpha /= alpha.sum(-1, keepdims=True)
    expected = np.einsum("hts,shd->thd", alpha, v).reshape(6, 16) @ p["output"]["weight"]
    chex.assert_trees_all_close(attention(p, x), expected, jax.jit(attention.apply)(p, x), atol=1e-5)
    # relative positions: the same tokens three steps later give the same scores
    shifted = np.asarray(attention.rotate(jnp.asarray(np.asarray(x @ p["query"]["weight"]).reshape(6, 4, 4)), 3))
    keys = np.asarray(attention.rotate(jnp.asarray(np.asarray(x @ p["key"]["weight"]).reshape(6, 2, 4)), 3))
    np.testing.assert_allclose(np.einsum("thd,shd->hts", shifted[:, :2], keys[:, :1]),
                               np.einsum("thd,shd->hts", q[:, :2], np.asarray(rope(np.asarray(x @ p["key"]["weight"]).reshape(6, 2, 4)))[:, :1]),
                               atol=1e-4)
    with pytest.raises(dp.LayerError, match="kv_heads must be an int that divides heads=4"):
        dp.Attention(4, kv_heads=3)
    with pytest.raises(dp.LayerError, match="head_dim 12 / 4 = 3 is odd"):
        dp.Attention(4, rotary=1e4).init(key, jnp.ones((3, 12)))


def test_gated_feedforward_is_swiglu(key):
    ff = dp.GatedFeedForward(5, use_bias=False)
    x = jax.random.normal(key, (3, 4))
    p = ff.init(key, x)
    chex.assert_trees_all_close(ff(p, x), jax.nn.silu(x @ p["gate"]["weight"]) * (x @ p["up"]["weight"]), atol=1e-6)


@pytest.mark.parametrize("steps, inner", [(7, 3), (7, 11), (150, 70)])
def test_selective_scan_paths_equal_its_definition(key, steps, inner):
    """The C++ kernels (the CPU's path in float32), the associative scan (the accelerators'),
    the scan with its written-out backward pass (the CPU's otherwise) and the lax.scan
    definition give the same outputs and gradients, for a batch and for one example, with I
    under and over the kernel's 8 channels a vector, a short and a longer T, continuing from a
    state and through the last state; vmap of the kernel equals its batch."""
    k = jax.random.split(key, 6)
    delta = jax.nn.softplus(jax.random.normal(k[0], (2, steps, inner)))
    A = -jnp.exp(jax.random.normal(k[1], (inner, 4)))
    B, C = jax.random.normal(k[2], (2, 2, steps, 4))
    u, h0 = jax.random.normal(k[3], (2, steps, inner)), jax.random.normal(k[4], (2, inner, 4))
    paths = [dp.kernels.parallel_selective, dp.kernels.written_selective, dp.kernels.scan_selective]
    if dp.kernels.available():
        paths.append(dp.kernels.kernel_selective)
    loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)[0])) + jnp.sum(jnp.cos(f(*args)[1]))  # y and the last state
    for args in [(delta, A, B, C, u, h0), (delta[0], A, B[0], C[0], u[0], h0[0])]:
        chex.assert_trees_all_close(*[jax.jit(f)(*args) for f in paths], atol=1e-5, rtol=1e-5)
        grads = [jax.jit(jax.grad(loss(f), range(6)))(*args) for f in paths]
        chex.assert_trees_all_close(*grads, atol=1e-4, rtol=1e-4)  # sums of up to T·I terms of ~100
    mapped = jax.vmap(paths[-1], (0, None, 0, 0, 0, 0))(delta, A, B, C, u, h0)
    chex.assert_trees_all_close(mapped, paths[-1](delta, A, B, C, u, h0), atol=1e-6)


def test_selective_ssm_with_and_without_the_fast_paths(key):
    """The layer with the seam's choice equals it traced inside `disabled()` (outputs and
    gradients); `lengths=` zeroes the padding; batch == vmap."""
    layer = dp.SelectiveSSM(state=4)
    xs = jax.random.normal(key, (3, 9, 8))
    p = layer.init(key, xs[0])
    loss = lambda p, x: jnp.sum(jnp.sin(dp.batched(layer)(p, x)))
    fast, fast_grad = jax.jit(jax.value_and_grad(loss))(p, xs)
    with dp.kernels.disabled():
        slow, slow_grad = jax.jit(jax.value_and_grad(loss))(p, xs)
    chex.assert_trees_all_close(fast, slow, atol=1e-5)
    chex.assert_trees_all_close(fast_grad, slow_grad, atol=1e-4)
    full = layer(p, xs[0])
    chex.assert_trees_all_close(layer(p, xs[0], lengths=5)[:5], full[:5], atol=1e-6)
    assert float(jnp.abs(layer(p, xs[0], lengths=5)[5:]).max()) == 0.0
    chex.assert_trees_all_close(dp.batched(layer)(p, xs), jax.vmap(lambda x: layer(p, x))(xs), atol=1e-5)


@pytest.mark.parametrize("layers", [2, 1])
@pytest.mark.parametrize("kind", ["llama", "mamba"])
def test_logits_and_greedy_generation_equal_transformers(kind, layers):
    config = {**(LLAMA if kind == "llama" else MAMBA), "num_hidden_layers": layers}
    ref = reference(kind, **config)
    model = (dp.llama if kind == "llama" else dp.mamba)(ref.config)
    params = dp.load_pretrained(model, state_dict(ref))
    assert_causal_lm_equals(model, params, ref, np.random.RandomState(0).randint(0, 99, (3, 10)), 16)


def test_from_a_save_pretrained_directory_and_refused_config_fields(tmp_path):
    ref = reference("llama", **{**LLAMA, "tie_word_embeddings": True})
    ref.save_pretrained(tmp_path / "llama", safe_serialization=True)
    model, params = dp.from_pretrained(tmp_path / "llama")
    ids = np.random.RandomState(1).randint(0, 99, (2, 7))
    with torch.no_grad():
        logits = ref(torch.tensor(ids)).logits.numpy()
    assert model.tied and "head" not in params
    np.testing.assert_allclose(dp.batched(model)(params, jnp.asarray(ids)), logits, atol=1e-5, rtol=1e-5)
    mamba = reference("mamba", **MAMBA)
    mamba.save_pretrained(tmp_path / "mamba", safe_serialization=True)
    model, params = dp.from_pretrained(tmp_path / "mamba")
    with torch.no_grad():
        logits = mamba(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(dp.batched(model)(params, jnp.asarray(ids)), logits, atol=1e-5, rtol=1e-5)
    for build, field, value in [(dp.llama, "attention_bias", True), (dp.llama, "mlp_bias", True),
                                (dp.llama, "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                (dp.mamba, "use_bias", True), (dp.mamba, "use_conv_bias", False)]:
        with pytest.raises(dp.ArgumentError, match=field):
            build({field: value})
    with pytest.raises(dp.ArgumentError, match="rope_parameters"):
        dp.llama(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})


def test_both_families_read_like_the_notes():
    llama = dp.llama(LLAMA)
    mamba = dp.mamba(MAMBA)
    assert repr(llama) == ("LanguageModel(GenerateToken ∘ RMSNorm() ∘ TransformerBlock(32, 4, 40, causal=True, pre_norm=True, "
                           "activation='silu', use_bias=False, gated=True, kv_heads=2, rotary=10000.0, norm=RMSNorm())^2 "
                           "∘ EmbedToken(99, 32))")
    assert "AddNorm(SelectiveSSM(state=8), pre_norm=True, norm=RMSNorm(eps=1e-05))^2" in repr(mamba)
