"""MHA <-> GQA <-> MQA conversion: pooled parameters against NumPy, exact repetition,
identity, preserved configuration, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import convert
from attention_jax.modules import PARAM_AXES
from tests.helpers import jitted

ATOL_F32 = RTOL_F32 = 1e-6

KV_PARAMS = ("k_kernel", "v_kernel", "k_bias", "v_bias")
QO_PARAMS = ("q_kernel", "q_bias", "o_kernel", "o_bias")


def _module(N=8, K=8, **kwargs):
    kwargs = {"head_dim": 4, "v_head_dim": 3, "bias_init": nnx.initializers.normal(0.5),
              "rngs": nnx.Rngs(0), **kwargs}
    return aj.MultiHeadAttention(16, N, num_kv_heads=K, **kwargs)


def _np_params(m):
    return {n: None if getattr(m, n) is None else np.asarray(getattr(m, n)[...])
            for n in PARAM_AXES}


def _x():
    return jax.random.normal(jax.random.key(1), (2, 5, 16))


@pytest.mark.parametrize(("N", "K"), [(4, 2), (4, 1), (8, 2)], ids=["gqa42", "mqa41", "gqa82"])
def test_gqa_to_mha_is_exact(N, K):
    m = _module(N, K, rope=100.0)
    mha = convert.gqa_to_mha(m)
    assert mha.num_kv_heads == N
    old, new = _np_params(m), _np_params(mha)
    for name in KV_PARAMS:  # query head n reads old kv head n // G: explicit loop
        axis = PARAM_AXES[name][0].index("kv_heads")
        for n in range(N):
            np.testing.assert_array_equal(np.take(new[name], n, axis),
                                          np.take(old[name], n // (N // K), axis))
    for name in QO_PARAMS:
        np.testing.assert_array_equal(new[name], old[name])
    x = _x()
    chex.assert_trees_all_close(jitted(mha)(x, is_causal=True), jitted(m)(x, is_causal=True),
                                atol=ATOL_F32, rtol=RTOL_F32)


def test_mha_to_gqa_with_k_equal_n_is_the_identity():
    m = _module(4, 4, use_bias=False)
    same = convert.mha_to_gqa(m, 4)
    assert same is not m
    chex.assert_trees_all_equal(_np_params(same), _np_params(m))
    x = _x()
    np.testing.assert_array_equal(same(x), m(x))


@pytest.mark.parametrize("K_new", [4, 2, 1])
def test_mean_and_first_pooling_against_numpy(K_new):
    m = _module(8, 8)
    old = _np_params(m)
    r = 8 // K_new
    mean = _np_params(convert.mha_to_gqa(m, K_new, "mean"))
    first = _np_params(convert.mha_to_gqa(m, K_new, "first"))
    for name in KV_PARAMS:
        axis = PARAM_AXES[name][0].index("kv_heads")
        for j in range(K_new):
            run = [np.take(old[name], j * r + i, axis) for i in range(r)]
            np.testing.assert_allclose(np.take(mean[name], j, axis), sum(run) / r,
                                       rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(np.take(first[name], j, axis), run[0])
        assert mean[name].shape[axis] == first[name].shape[axis] == K_new
    for name in QO_PARAMS:
        np.testing.assert_array_equal(mean[name], old[name])


def test_gqa_to_smaller_gqa_and_round_trip():
    gqa = _module(8, 4)
    old = _np_params(gqa)
    g2 = _np_params(convert.mha_to_gqa(gqa, 2))  # runs of 2 of the 4 kv heads
    np.testing.assert_allclose(g2["k_kernel"][:, 1], (old["k_kernel"][:, 2] +
                                                      old["k_kernel"][:, 3]) / 2, rtol=1e-6)
    # Repeating then mean-pooling gives the original back exactly.
    back = convert.mha_to_gqa(convert.gqa_to_mha(gqa), 4)
    chex.assert_trees_all_equal(_np_params(back), old)
    mqa = convert.mha_to_mqa(gqa)
    np.testing.assert_allclose(np.asarray(mqa.v_bias[...])[0], old["v_bias"].mean(0), rtol=1e-6)


def test_random_method_reinitialises_kv_only():
    m = _module(8, 8)
    a = convert.mha_to_gqa(m, 2, "random", rngs=nnx.Rngs(5))
    b = convert.mha_to_gqa(m, 2, "random", rngs=nnx.Rngs(5))
    c = convert.mha_to_gqa(m, 2, "random", rngs=nnx.Rngs(6))
    mean = convert.mha_to_gqa(m, 2)
    pa, pb, pc, pm, old = map(_np_params, (a, b, c, mean, m))
    chex.assert_trees_all_equal(pa, pb)  # reproducible from the rng
    assert not np.allclose(pa["k_kernel"], pc["k_kernel"])
    assert not np.allclose(pa["k_kernel"], pm["k_kernel"])
    np.testing.assert_array_equal(pa["k_bias"], 0.0)
    for name in QO_PARAMS:
        np.testing.assert_array_equal(pa[name], old[name])
    # fan-in 16 LeCun normal: std 1/4
    assert 0.1 < pa["k_kernel"].std() < 0.4


def test_configuration_is_preserved():
    m = aj.MultiHeadAttention(12, 6, head_dim=4, v_head_dim=2, in_k_features=10,
                              in_v_features=8, out_features=5, use_bias=False, dropout_rate=0.1,
                              dtype=jnp.float32, param_dtype=jnp.bfloat16, scale=0.3,
                              rope=1000.0, deterministic=True, rngs=nnx.Rngs(0))
    g = convert.mha_to_gqa(m, 3)
    for attr in ("in_features", "num_heads", "head_dim", "v_head_dim", "in_k_features",
                 "in_v_features", "out_features", "use_bias", "dropout_rate", "dtype",
                 "param_dtype", "implementation", "scale", "rope", "deterministic"):
        assert getattr(g, attr) == getattr(m, attr), attr
    assert g.num_kv_heads == 3 and g.k_bias is None and g.rngs is not None
    assert g.k_kernel.shape == (10, 3, 4) and g.k_kernel[...].dtype == jnp.bfloat16
    assert g.k_kernel.get_metadata()["out_sharding"] == PARAM_AXES["k_kernel"][0]


def test_errors_name_the_head_counts():
    m = _module(8, 8)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(8\)"):
        convert.mha_to_gqa(m, 3)
    with pytest.raises(ValueError, match=r"num_kv_heads \(8\) > K=4 \(N=8\)"):
        convert.mha_to_gqa(_module(8, 4), 8)
    with pytest.raises(ValueError, match=r"K=4 kv heads to K'=6 \(N=12\)"):
        convert.convert_kv_heads(_module(12, 4), 6)
    with pytest.raises(ValueError, match="needs rngs"):
        convert.mha_to_mqa(m, "random")
    with pytest.raises(ValueError, match="method must be one of"):
        convert.mha_to_gqa(m, 2, "median")
