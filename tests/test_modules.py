"""The NNX module: construction, parameter layout, errors, dropout, dtypes, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.modules import PARAM_AXES
from tests.helpers import numpy_attention

ATOL_F32 = RTOL_F32 = 1e-5
ATOL_BF16 = RTOL_BF16 = 3e-2

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _numpy_module(m: aj.MultiHeadAttention, xq, xk, xv, mask=None):
    """float64 module forward from the raw parameters, with explicitly repeated K/V heads."""
    p = {n: None if getattr(m, n) is None else np.asarray(getattr(m, n)[...], np.float64)
         for n in PARAM_AXES}
    q = np.einsum("btd,dnh->btnh", xq, p["q_kernel"]) + p["q_bias"]
    k = np.einsum("bsd,dkh->bskh", xk, p["k_kernel"]) + p["k_bias"]
    v = np.einsum("bsd,dkh->bskh", xv, p["v_kernel"]) + p["v_bias"]
    out, w = numpy_attention(q, k, v, mask)
    return np.einsum("btnv,nvd->btd", out, p["o_kernel"]) + p["o_bias"], w


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_shapes_and_logical_axes(variant):
    N, K = VARIANTS[variant]
    m = aj.MultiHeadAttention(16, N, num_kv_heads=K, head_dim=6, v_head_dim=5,
                              in_k_features=12, in_v_features=10, out_features=8,
                              rngs=nnx.Rngs(0))
    expected = {"q_kernel": (16, N, 6), "k_kernel": (12, K, 6), "v_kernel": (10, K, 5),
                "o_kernel": (N, 5, 8), "q_bias": (N, 6), "k_bias": (K, 6), "v_bias": (K, 5),
                "o_bias": (8,)}
    for name, shape in expected.items():
        param = getattr(m, name)
        assert param.shape == shape, name
        assert param.get_metadata()["out_sharding"] == PARAM_AXES[name][0]
    assert m.num_groups == N // K
    assert m.kv_bytes_per_token() == K * (6 + 5) * 4
    assert m.kv_bytes_per_token(jnp.bfloat16) == K * (6 + 5) * 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_cross_attention_matches_numpy(variant, jit):
    N, K = VARIANTS[variant]
    m = aj.MultiHeadAttention(16, N, num_kv_heads=K, head_dim=6, v_head_dim=5,
                              in_k_features=12, in_v_features=10, out_features=8,
                              bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(1))
    ks = jax.random.split(jax.random.key(2), 3)
    xq = jax.random.normal(ks[0], (2, 3, 16))
    xk = jax.random.normal(ks[1], (2, 5, 12))
    xv = jax.random.normal(ks[2], (2, 5, 10))
    mask = aj.padding_mask(jnp.array([5, 2]), 5)

    def f(m, xq, xk, xv):
        return m(xq, xk, xv, mask=mask, return_weights=True)

    y, w = (nnx.jit(f) if jit else f)(m, xq, xk, xv)
    ref_y, ref_w = _numpy_module(m, xq, xk, xv, mask)
    chex.assert_trees_all_close(y, ref_y.astype(np.float32), atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(w, ref_w.astype(np.float32), atol=ATOL_F32, rtol=RTOL_F32)


def test_inputs_default_to_self_attention():
    m = aj.GroupedQueryAttention(16, 4, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    np.testing.assert_array_equal(m(x), m(x, x, x))
    x2 = jax.random.normal(jax.random.key(1), (2, 5, 16))
    np.testing.assert_array_equal(m(x, x2), m(x, x2, x2))


def test_thin_constructors_are_the_same_class():
    mqa = aj.MultiQueryAttention(16, 4, rngs=nnx.Rngs(0))
    gqa = aj.GroupedQueryAttention(16, 4, 2, rngs=nnx.Rngs(0))
    assert type(mqa) is type(gqa) is aj.MultiHeadAttention
    assert (mqa.num_kv_heads, gqa.num_kv_heads) == (1, 2)


def test_no_bias():
    m = aj.MultiHeadAttention(16, 4, use_bias=False, rngs=nnx.Rngs(0))
    assert m.q_bias is None and m.o_bias is None
    names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert names == {"q_kernel", "k_kernel", "v_kernel", "o_kernel"}
    x = jnp.zeros((1, 3, 16))
    np.testing.assert_array_equal(m(x), 0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_kv_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"num_kv_heads": 0}, "num_kv_heads must be >= 1; got 0"),
        ({"in_features": 18}, r"in_features \(18\) is not divisible by num_heads \(4\)"),
        ({"dropout_rate": 1.5}, r"dropout_rate must be in \[0, 1\); got 1.5"),
        ({"implementation": "fast"}, "unknown implementation 'fast'"),
    ],
)
def test_config_errors(kwargs, match):
    args = {"in_features": 16, "num_heads": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        aj.MultiHeadAttention(**args, rngs=nnx.Rngs(0))


def test_call_errors_name_the_numbers():
    m = aj.MultiHeadAttention(16, 4, in_k_features=12, rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 5, 16))
    with pytest.raises(ValueError, match="inputs_q has 10 features but the module expects 16"):
        m(jnp.zeros((2, 5, 10)), jnp.zeros((2, 5, 12)))
    with pytest.raises(ValueError, match="inputs_k has 16 features but the module expects 12"):
        m(x)
    with pytest.raises(ValueError, match=r"inputs_q must be \[batch, length, features\]"):
        m(jnp.zeros((5, 16)), jnp.zeros((2, 5, 12)))
    with pytest.raises(ValueError, match="inputs_q has batch 2 but inputs_k has 3"):
        m(x, jnp.zeros((3, 5, 12)))
    with pytest.raises(ValueError, match=r"must share \[batch, length\]"):
        m(x, jnp.zeros((2, 5, 12)), jnp.zeros((2, 6, 12)))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 5, 5\) does not broadcast"):
        m(x, jnp.zeros((2, 5, 12)), mask=jnp.ones((2, 3, 5, 5), bool))


def test_dropout_train_and_eval():
    m = aj.MultiHeadAttention(16, 4, dropout_rate=0.3, rngs=nnx.Rngs(0, dropout=1))
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    a, b = m(x), m(x)
    assert not np.allclose(a, b)  # a fresh dropout mask each call
    np.testing.assert_array_equal(m(x, deterministic=True), m(x, deterministic=True))
    m.eval()
    det = m(x)
    np.testing.assert_array_equal(det, m(x))
    m.train()
    assert not np.allclose(det, m(x))
    off = aj.MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(det, off(x), atol=1e-6)  # same init, dropout off == eval


def test_bf16_compute_dtype():
    m32 = aj.MultiHeadAttention(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    m16 = aj.MultiHeadAttention(16, 4, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert m16.q_kernel.dtype == jnp.float32  # params stay in param_dtype
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    y16 = m16(x, is_causal=True)
    assert y16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(y16.astype(jnp.float32), m32(x, is_causal=True),
                                atol=ATOL_BF16, rtol=RTOL_BF16)
    mp = aj.MultiHeadAttention(16, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert mp.q_kernel.dtype == jnp.bfloat16


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_reduces_loss(variant):
    """One attention layer learns to copy the token at a position given by the query."""
    N, K = VARIANTS[variant]
    D, T, B = 16, 6, 32
    model = aj.MultiHeadAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    ks = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(ks[0], (B, T, D))
    target = jnp.roll(x, 1, axis=1)  # predict the previous token: needs attention

    @nnx.jit
    def step(model, optimizer, x, target):
        def loss_fn(model):
            return jnp.mean((model(x, is_causal=True)[:, 1:] - target[:, 1:]) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, target)) for _ in range(40)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
