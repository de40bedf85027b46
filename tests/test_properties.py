"""Property tests over the public API (hypothesis).

* Random valid configurations: the module equals the float64 numpy reference
  built from its own parameters (float32, 2e-5 absolute; values are O(1)).
* Random invalid configurations: a ValueError / TypeError raised by this
  package (not from JAX internals), naming the offending option.

Examples are few and shapes tiny: every new shape compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attention_jax as aj
from attention_jax.config import CONFIG_FIELDS, AttentionConfig
from tests.helpers import jitted, numpy_attention

TOL = dict(atol=2e-5, rtol=2e-5)
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_configs(draw):
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2, 3]))
    return dict(
        in_features=draw(st.sampled_from([4, 6, 8])), num_heads=N, num_kv_heads=K,
        head_dim=draw(st.sampled_from([2, 4])), v_head_dim=draw(st.sampled_from([2, 3])),
        in_k_features=draw(st.sampled_from([None, 5])),
        out_features=draw(st.sampled_from([None, 7])),
        use_bias=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5, -1.0])),
    )


def _reference(m: aj.MultiHeadAttention, xq, xk, mask):
    p = {n: None if v is None else np.asarray(v, np.float64) for n, v in m.param_values().items()}

    def proj(x, kernel, bias):
        y = np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), kernel)
        return y if bias is None else y + bias

    q = proj(xq, p["q_kernel"], p["q_bias"])
    k = proj(xk, p["k_kernel"], p["k_bias"])
    v = proj(xk, p["v_kernel"], p["v_bias"])
    out, _ = numpy_attention(q, k, v, mask=mask, scale=m.config.scale)
    y = np.einsum("btnv,nvd->btd", out, p["o_kernel"])
    return y if p["o_bias"] is None else y + p["o_bias"]


@SETTINGS
@given(options=valid_configs(), T=st.integers(1, 4), S=st.integers(1, 5),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_random_valid_configurations_equal_the_reference(options, T, S, seed, masked):
    m = aj.MultiHeadAttention(**options, rngs=nnx.Rngs(seed % 7))
    for name in ("q_bias", "k_bias", "v_bias", "o_bias"):
        if getattr(m, name) is not None:  # non-zero biases, so they are checked too
            getattr(m, name)[...] = 0.1 * jnp.ones(getattr(m, name).shape)
    cfg = m.config
    kq, kk = jax.random.split(jax.random.key(seed))
    xq = jax.random.normal(kq, (2, T, cfg.in_features))
    xk = jax.random.normal(kk, (2, S, cfg.in_k_features))
    mask = None
    if masked:
        mask = np.asarray(jax.random.bernoulli(jax.random.key(seed + 1), 0.6, (2, 1, T, S)))
    y = jitted(m)(xq, xk, mask=None if mask is None else jnp.asarray(mask))
    assert y.shape == (2, T, cfg.out_features)
    np.testing.assert_allclose(np.asarray(y), _reference(m, xq, xk, mask), **TOL)


BAD_VALUES = {
    "in_features": [0, -3, 8.0, "8", True],
    "num_heads": [0, 2.5, None],
    "num_kv_heads": [0, 3, 1.0],
    "head_dim": [0, -1, 4.0],
    "v_head_dim": [0, 2.0],
    "in_k_features": [0, 1.5],
    "in_v_features": [-1],
    "out_features": [0, 3.0],
    "dropout_rate": [1.0, -0.1, "0.1"],
    "implementation": ["flash", 3],
    "scale": [float("inf"), "0.1"],
    "use_bias": [1, "yes"],
    "rope": [-1.0, "theta"],
    "param_dtype": ["float33"],
    "qk_norm": ["rms", True],
    "qk_norm_eps": [0.0, -1e-6],
    "softcap": [0.0, -2.0],
    "sliding_window": [0, 2.5],
    "sinks": [1, "yes"],
    "qk_norm_offset": [float("nan"), float("inf"), "1", True],
}


@SETTINGS
@given(data=st.data())
def test_random_invalid_configurations_name_the_option(data):
    name = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    value = data.draw(st.sampled_from(BAD_VALUES[name]))
    options = dict(in_features=8, num_heads=4, head_dim=2)
    options[name] = value
    with pytest.raises((ValueError, TypeError)) as info:
        AttentionConfig(**options)
    message = str(info.value)
    assert name in message or name.replace("_", " ") in message or (
        name == "rope" and "theta" in message), message
    # raised from this package, not from JAX or numpy internals
    frames = [str(entry.path) for entry in info.traceback]
    assert "attention_jax" in frames[-1], frames[-1]


def test_every_config_field_is_covered_by_a_check_or_accepts_anything():
    # fields without a bad value above: their whole domain is valid (None or any bool/dtype)
    unchecked = set(CONFIG_FIELDS) - set(BAD_VALUES)
    assert unchecked <= {"deterministic", "dtype", "use_bias", "q_bias", "k_bias", "v_bias",
                         "o_bias"}, unchecked
