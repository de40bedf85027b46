"""AttentionConfig: validation with named numbers, derived sizes, the parameter table, and
one option reaching the NNX module, Linen, convert and head parallelism through the config.

Tolerances: float32, the same computation on both sides (1e-6 absolute), head
parallel against one device 2e-5 as in tests/test_sharding.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import convert, layer, sharding
from attention_jax import linen as ajl
from attention_jax.config import PARAM_AXES, AttentionConfig

TOL = dict(atol=1e-6, rtol=1e-6)
SHARD_TOL = dict(atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(num_heads=0), ValueError, r"num_heads must be >= 1; got 0"),
    (dict(num_heads=8.0), TypeError, r"num_heads must be an int >= 1; got 8.0 \(float\)"),
    (dict(in_features=64 / 8), TypeError, r"in_features must be an int >= 1; got 8.0"),
    (dict(num_kv_heads=3), ValueError, r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"),
    (dict(num_kv_heads=0), ValueError, r"num_kv_heads must be >= 1; got 0"),
    (dict(head_dim=0), ValueError, r"head_dim must be >= 1; got 0"),
    (dict(v_head_dim=-2), ValueError, r"v_head_dim must be >= 1; got -2"),
    (dict(out_features=0), ValueError, r"out_features must be >= 1; got 0"),
    (dict(in_features=60), ValueError, r"in_features \(60\) is not divisible by num_heads \(8\)"),
    (dict(dropout_rate=1.0), ValueError, r"dropout_rate must be in \[0, 1\); got 1.0"),
    (dict(implementation="flash"), ValueError, r"unknown implementation 'flash'; available"),
    (dict(head_dim=7, rope=10_000.0), ValueError, r"rope needs an even head_dim; got 7"),
    (dict(rope="yes"), TypeError, r"rope must be a theta"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number or None; got nan"),
    (dict(use_bias=1), TypeError, r"use_bias must be a bool; got 1"),
    (dict(param_dtype="nope"), TypeError, r"param_dtype must be a dtype; got 'nope'"),
])
def test_invalid_options_name_the_option_and_the_numbers(kwargs, error, message):
    base = dict(in_features=64, num_heads=8)
    with pytest.raises(error, match=message):
        AttentionConfig(**{**base, **kwargs})
    # the module and the Linen adapter raise the same, from the same place
    with pytest.raises(error, match=message):
        aj.MultiHeadAttention(**{**base, **kwargs}, rngs=nnx.Rngs(0))


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_head'\]"):
        aj.MultiHeadAttention(64, 8, num_head=2, rngs=nnx.Rngs(0))


def test_linen_raises_the_config_errors_at_init():
    with pytest.raises(ValueError, match=r"num_heads \(8\) must be a multiple of num_kv_heads"):
        ajl.MultiHeadAttention(8, num_kv_heads=3).init(jax.random.key(0), jnp.ones((1, 2, 16)))


# --------------------------------------------------------------------------- derived


def test_sizes_are_resolved_and_the_config_is_hashable():
    cfg = AttentionConfig(64, 8, num_kv_heads=2, v_head_dim=4, in_k_features=32)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.num_groups) == (2, 8, 4, 4)
    assert (cfg.in_k_features, cfg.in_v_features, cfg.out_features) == (32, 32, 64)
    assert hash(cfg) == hash(AttentionConfig(**cfg.to_dict()))
    assert cfg == AttentionConfig(**cfg.to_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_heads = 4
    assert cfg.kv_bytes_per_token() == 2 * (8 + 4) * 4


def test_param_table_names_shapes_and_axes():
    cfg = AttentionConfig(64, 8, num_kv_heads=2, v_head_dim=4, out_features=48)
    table = {p.name: (p.shape, p.axes) for p in cfg.params()}
    assert list(table) == [n for n in PARAM_AXES if n.endswith(("_kernel", "_bias"))]
    assert table["q_kernel"] == ((64, 8, 8), ("embed", "heads", "head_dim"))
    assert table["v_kernel"] == ((64, 2, 4), ("embed", "kv_heads", "head_dim"))
    assert table["o_kernel"] == ((8, 4, 48), ("heads", "head_dim", "embed"))
    assert table["o_bias"] == ((48,), ("embed",))
    assert [p.name for p in cfg.replace(use_bias=False).params()] == [
        "q_kernel", "k_kernel", "v_kernel", "o_kernel"]


def test_replace_rederives_defaulted_sizes():
    cfg = AttentionConfig(64, 8, head_dim=16)
    assert cfg.replace(in_features=128).head_dim == 16  # explicit: kept
    assert AttentionConfig(64, 8).replace(in_features=128).head_dim == 16  # derived: 128 / 8
    assert AttentionConfig(64, 8).replace(num_kv_heads=2).num_kv_heads == 2


def test_module_exposes_and_rebuilds_from_its_config():
    m = aj.GroupedQueryAttention(32, 4, 2, rope=10_000, rngs=nnx.Rngs(0))
    assert m.config == AttentionConfig(32, 4, num_kv_heads=2, rope=10_000.0)
    assert (m.num_kv_heads, m.head_dim, m.rope) == (2, 8, 10_000.0)
    again = aj.MultiHeadAttention.from_config(m.config, rngs=nnx.Rngs(0))
    for spec in m.config.params():
        np.testing.assert_array_equal(getattr(again, spec.name)[...], getattr(m, spec.name)[...])


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("variant", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_attention_layer_is_what_the_module_returns(variant, jit):
    N, K = variant
    m = aj.MultiHeadAttention(16, N, num_kv_heads=K, rngs=nnx.Rngs(0))
    for spec in m.config.params():
        getattr(m, spec.name)[...] += 0.1  # non-zero biases
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    fn = jax.jit(layer.attention_layer, static_argnums=0,
                 static_argnames="is_causal") if jit else layer.attention_layer
    y = fn(m.config, m.param_values(), x, is_causal=True)
    np.testing.assert_allclose(y, m(x, is_causal=True), **TOL)
    # the kept function returns the same minus the output bias, as documented
    y_old, _ = aj.attention_forward(m.param_values(), x, x, x, is_causal=True)
    np.testing.assert_allclose(y_old + m.o_bias[...], y, **TOL)
    assert not np.allclose(y_old, y)  # o_bias is 0.1: the difference is visible


def test_reduce_hook_is_applied_before_the_bias():
    m = aj.MultiHeadAttention(16, 4, rngs=nnx.Rngs(0))
    m.o_bias[...] = jnp.ones_like(m.o_bias[...])
    x = jnp.ones((1, 3, 16))
    y = layer.attention_layer(m.config, m.param_values(), x)
    y2 = layer.attention_layer(m.config, m.param_values(), x, reduce=lambda t: 2 * t)
    np.testing.assert_allclose(y2, 2 * (y - 1.0) + 1.0, **TOL)


# --------------------------------------------------------------------------- one option
# ``q_bias`` / ``k_bias`` / ``v_bias`` / ``o_bias`` were added to AttentionConfig after the
# module, Linen, convert and head parallelism read their options from the config; none
# of them was edited for it. Qwen 2's layout: biases on q, k, v but not on o.


QWEN2_BIASES = dict(use_bias=False, q_bias=True, k_bias=True, v_bias=True)


def test_per_projection_biases_reach_the_module():
    m = aj.GroupedQueryAttention(32, 4, 2, **QWEN2_BIASES, rngs=nnx.Rngs(0))
    assert m.o_bias is None and m.q_bias.shape == (4, 8) and m.v_bias.shape == (2, 8)
    assert m.config.has_bias("k") and not m.config.has_bias("o")


def test_per_projection_biases_reach_linen():
    attn = ajl.GroupedQueryAttention(4, 2, **QWEN2_BIASES)
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    variables = attn.init(jax.random.key(1), x)
    assert set(variables["params"]) == {"q_kernel", "k_kernel", "v_kernel", "o_kernel",
                                        "q_bias", "k_bias", "v_bias"}
    nnx_module = ajl.to_nnx(attn, variables)
    assert nnx_module.config.q_bias is True and nnx_module.o_bias is None
    np.testing.assert_allclose(nnx_module(x), attn.apply(variables, x), **TOL)
    back, v2 = ajl.from_nnx(nnx_module)
    assert back.q_bias is True and "o_bias" not in v2["params"]


def test_per_projection_biases_reach_convert():
    m = aj.MultiHeadAttention(32, 4, **QWEN2_BIASES, rngs=nnx.Rngs(0))
    m.k_bias[...] = jax.random.normal(jax.random.key(2), m.k_bias.shape)
    mqa = convert.mha_to_mqa(m)
    assert mqa.config == m.config.replace(num_kv_heads=1)
    assert mqa.o_bias is None
    np.testing.assert_allclose(mqa.k_bias[...], m.k_bias[...].mean(0, keepdims=True), **TOL)


def test_per_projection_biases_reach_head_parallel():
    m = aj.GroupedQueryAttention(32, 8, 2, **QWEN2_BIASES, rngs=nnx.Rngs(0))
    m.q_bias[...] = jax.random.normal(jax.random.key(3), m.q_bias.shape)
    x = jax.random.normal(jax.random.key(4), (4, 6, 32))
    want = m(x, is_causal=True)
    hp = sharding.head_parallel(m, sharding.make_mesh(data=2, model=4))
    got = nnx.jit(lambda mod, x: mod(x, is_causal=True))(hp, x)
    np.testing.assert_allclose(got, want, **SHARD_TOL)
