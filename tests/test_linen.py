"""The Linen adapter: inside a user's Linen model, equal to the NNX module, conversion, dropout,
errors and logical partitioning metadata.

Initialisation is not under test except in ``test_initialisers_applied_as_in_nnx``: elsewhere the
parameters are drawn on the host (``_fast``) and whole runs are jitted, as compiling PRNG and
op-by-op programs for every shape would dominate the runtime.
"""

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax import linen as ajl
from attention_jax import sharding
from attention_jax.modules import PARAM_AXES
from tests.helpers import numpy_attention

# Linen vs NNX run the same math on the same arrays; jit may fuse differently.
ATOL_F32 = RTOL_F32 = 1e-5
# float32 forward vs the float64 numpy reference.
ATOL_REF_F32 = RTOL_REF_F32 = 1e-5
# Gradients w.r.t. parameters, Linen vs NNX.
ATOL_GRAD_F32 = RTOL_GRAD_F32 = 1e-5

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _randn(seed, shape, std=1.0):
    """Normal float32 values drawn on the host: no PRNG program to compile (tests stay fast)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * std, jnp.float32)


def _host_normal(std, seed):
    """An initialiser drawing on the host; each call draws new values (the key is ignored)."""
    rng = np.random.default_rng(seed)

    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape) * std, dtype)

    return init


def _fast(seed=0):
    """Initialisers where initialisation is not under test: host normals (compiling PRNG
    programs per shape would dominate the runtime) and non-zero biases, so that their wiring is
    tested."""
    return {"kernel_init": _host_normal(0.3, seed), "bias_init": _host_normal(0.5, seed + 1)}


# Inputs and options per forward case: widths (D, Dk, Dv), lengths (T, S), module options
# common to both APIs, and call options.
CASES = {
    "self_masked": dict(widths=(8, 8, 8), lengths=(5, 5), options={},
                        call=dict(is_causal=True, lengths=[5, 3])),
    "cross": dict(widths=(8, 12, 10), lengths=(3, 5),
                  options=dict(head_dim=6, v_head_dim=4, out_features=7),
                  call=dict(return_weights=True, lengths=[5, 2])),
    "rope": dict(widths=(8, 8, 8), lengths=(5, 5), options=dict(head_dim=4, rope=100.0),
                 call=dict(is_causal=True, return_weights=True)),
}


def _inputs(case, seed=0, batch=2):
    (D, Dk, Dv), (T, S) = case["widths"], case["lengths"]
    xq = _randn(seed, (batch, T, D))
    xk = _randn(seed + 1, (batch, S, Dk))
    xv = _randn(seed + 2, (batch, S, Dv))
    return xq, xk, xv


def _call_kwargs(case):
    call = dict(case["call"])
    lengths = call.pop("lengths", None)
    if lengths is not None:
        call["mask"] = aj.padding_mask(jnp.array(lengths), case["lengths"][1])
    return call


def _nnx_params(m):
    """``{name: array}`` of an NNX attention module, biases left out when absent."""
    return {n: getattr(m, n)[...] for n in PARAM_AXES if getattr(m, n) is not None}


def _numpy_forward(p, xq, xk, xv, mask=None):
    """float64 module forward from a parameter dict, with explicitly repeated K/V heads."""
    p = {n: np.asarray(a, np.float64) for n, a in p.items()}
    zero = np.float64(0.0)
    q = np.einsum("btd,dnh->btnh", xq, p["q_kernel"]) + p.get("q_bias", zero)
    k = np.einsum("bsd,dkh->bskh", xk, p["k_kernel"]) + p.get("k_bias", zero)
    v = np.einsum("bsd,dkh->bskh", xv, p["v_kernel"]) + p.get("v_bias", zero)
    out, w = numpy_attention(q, k, v, mask)
    return np.einsum("btnv,nvd->btd", out, p["o_kernel"]) + p.get("o_bias", zero), w


# ---------------------------------------------------------------------------
# (1) Inside a user's Linen model
# ---------------------------------------------------------------------------


class _Block(nn.Module):
    """A user's block: a Dense, then the attention on its output."""

    num_heads: int
    num_kv_heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.Dense(12, kernel_init=_host_normal(0.3, 9), name="proj")(x)  # [B, T, 12]
        attn = ajl.MultiHeadAttention(self.num_heads, num_kv_heads=self.num_kv_heads,
                                      head_dim=3, **_fast(), name="attn")
        return attn(h, mask=mask)  # [B, T, 12]


@pytest.mark.parametrize("variant", VARIANTS)
@JIT
def test_inside_a_user_module_matches_numpy(variant, jit):
    N, K = VARIANTS[variant]
    block = _Block(N, K)
    x = _randn(0, (2, 5, 8))
    mask = aj.causal_mask(5)

    def init_apply(key, x):
        variables = block.init(key, x, mask)
        return variables, block.apply(variables, x, mask)

    variables, y = (jax.jit(init_apply) if jit else init_apply)(jax.random.key(1), x)
    params = nn.meta.unbox(variables)["params"]
    shapes = jax.tree.map(jnp.shape, params["attn"])
    assert shapes == {"q_kernel": (12, N, 3), "k_kernel": (12, K, 3), "v_kernel": (12, K, 3),
                      "o_kernel": (N, 3, 12), "q_bias": (N, 3), "k_bias": (K, 3),
                      "v_bias": (K, 3), "o_bias": (12,)}

    h = np.asarray(x, np.float64) @ np.asarray(params["proj"]["kernel"], np.float64)
    h = h + np.asarray(params["proj"]["bias"], np.float64)
    ref, _ = _numpy_forward(params["attn"], h, h, h, np.asarray(mask))
    assert y.shape == (2, 5, 12)
    chex.assert_trees_all_close(y, ref.astype(np.float32), atol=ATOL_REF_F32, rtol=RTOL_REF_F32)


def test_thin_constructors():
    mqa, gqa = ajl.MultiQueryAttention(4, name="a"), ajl.GroupedQueryAttention(4, 2, rope=10.0)
    assert type(mqa) is type(gqa) is ajl.MultiHeadAttention
    assert (mqa.num_kv_heads, mqa.name, gqa.num_kv_heads, gqa.rope) == (1, "a", 2, 10.0)
    abstract = nn.meta.unbox(jax.eval_shape(mqa.init, jax.random.key(0), jnp.ones((1, 2, 8))))
    assert abstract["params"]["k_kernel"].shape == (8, 1, 2)
    assert abstract["params"]["v_bias"].shape == (1, 2)


def test_initialisers_applied_as_in_nnx():
    seen = []

    def counting_init(key, shape, dtype):  # key-independent, so NNX and Linen must agree
        seen.append(tuple(shape))
        return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape) / 100

    options = dict(num_kv_heads=2, head_dim=3, v_head_dim=5, out_features=7,
                   kernel_init=counting_init, bias_init=counting_init)
    lin = ajl.MultiHeadAttention(4, **options)
    variables = jax.jit(lin.init)(jax.random.key(0), jnp.ones((1, 2, 8)), jnp.ones((1, 3, 6)))
    # [fan_in, fan_out] as the NNX module: q [D, N*H], k [Dk, K*H], v [Dv, K*V], o [N*V, Do].
    assert sorted(seen) == sorted([(8, 12), (6, 6), (6, 10), (20, 7),
                                   (4, 3), (2, 3), (2, 5), (7,)])
    m = aj.MultiHeadAttention(8, 4, in_k_features=6, **options, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(nn.meta.unbox(variables)["params"], _nnx_params(m))

    # Defaults: zero biases, LeCun normal kernels over fan_in = D (std 1/sqrt(D)).
    big = jax.jit(ajl.MultiHeadAttention(8, head_dim=16).init)(jax.random.key(0),
                                                                jnp.ones((1, 1, 64)))
    big = nn.meta.unbox(big)["params"]
    np.testing.assert_array_equal(big["q_bias"], np.zeros((8, 16)))
    std = float(jnp.std(big["q_kernel"]))
    assert abs(std - 1 / 8) < 0.1 / 8, std


# ---------------------------------------------------------------------------
# (2) Same numbers as the NNX module, converting either way
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "case", "jit"),
    # Eager once (the most general case; eager Linen inside a user module for every variant
    # is in the first test): eager runs compile every op and cost seconds.
    [("gqa", "cross", False)] + [(v, c, True) for v in VARIANTS for c in CASES],
    ids=lambda v: {False: "eager", True: "jit"}.get(v, v),
)
def test_same_outputs_as_nnx_both_ways(variant, case, jit):
    N, K = VARIANTS[variant]
    case = CASES[case]
    xq, xk, xv = _inputs(case)
    call = _call_kwargs(case)
    # NNX -> Linen.
    D, Dk, Dv = case["widths"]
    m = aj.MultiHeadAttention(D, N, num_kv_heads=K, in_k_features=Dk, in_v_features=Dv,
                              **_fast(), rngs=nnx.Rngs(4), **case["options"])
    lin2, variables2 = ajl.from_nnx(m)
    graph, state = nnx.split(m)
    # Linen -> NNX (converted inside the same program).
    lin = ajl.MultiHeadAttention(N, num_kv_heads=K, **_fast(seed=10), **case["options"])

    def outputs(key, variables2, state):  # one jit for the four runs
        variables = lin.init(key, xq, xk, xv)
        return (lin.apply(variables, xq, xk, xv, **call),
                ajl.to_nnx(lin, variables)(xq, xk, xv, **call),
                lin2.apply(variables2, xq, xk, xv, **call),
                nnx.merge(graph, state)(xq, xk, xv, **call))

    out_linen_a, out_nnx_a, out_linen, out_nnx = (jax.jit(outputs) if jit else outputs)(
        jax.random.key(3), variables2, state)
    chex.assert_trees_all_close(out_linen_a, out_nnx_a, atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(out_linen, out_nnx, atol=ATOL_F32, rtol=RTOL_F32)

    if case["options"].get("rope") is None:  # and both equal an independent reference
        mask = np.ones((1, 1, *case["lengths"]), bool) if "mask" not in call else call["mask"]
        if call.get("is_causal"):
            mask = mask & np.tril(np.ones(case["lengths"], bool))
        ref_y, ref_w = _numpy_forward(_nnx_params(m), xq, xk, xv, np.asarray(mask))
        y = out_linen[0] if call.get("return_weights") else out_linen
        chex.assert_trees_all_close(y, ref_y.astype(np.float32),
                                    atol=ATOL_REF_F32, rtol=RTOL_REF_F32)
        if call.get("return_weights"):
            chex.assert_trees_all_close(out_linen[1], ref_w.astype(np.float32),
                                        atol=ATOL_REF_F32, rtol=RTOL_REF_F32)


# ---------------------------------------------------------------------------
# (3) Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_gradients_equal_nnx(variant):
    """Under jit only: eager differentiation adds seconds and no adapter code path."""
    N, K = VARIANTS[variant]
    case = CASES["cross"]
    xq, xk, xv = _inputs(case, seed=5)
    call = _call_kwargs(case) | {"return_weights": False}
    D, Dk, Dv = case["widths"]
    m = aj.MultiHeadAttention(D, N, num_kv_heads=K, in_k_features=Dk, in_v_features=Dv,
                              **_fast(), rope=100.0, rngs=nnx.Rngs(6), **case["options"])
    lin, variables = ajl.from_nnx(m)
    params = variables["params"]
    cot = _randn(7, (2, 3, 7))  # [B, T, Do]

    def linen_loss(params):
        return jnp.sum(lin.apply({"params": params}, xq, xk, xv, **call) * cot)

    def nnx_loss(m):
        return jnp.sum(m(xq, xk, xv, **call) * cot)

    graph, state = nnx.split(m)

    @jax.jit
    def grads(params, state):  # one jit for both
        g_state = jax.grad(lambda state: nnx_loss(nnx.merge(graph, state)))(state)
        return jax.grad(linen_loss)(params), g_state

    g_linen, g_state = grads(params, state)
    g_nnx = {str(path[0]): var[...] for path, var in nnx.to_flat_state(g_state)}
    assert set(g_nnx) == set(g_linen) == set(PARAM_AXES)
    chex.assert_trees_all_close(g_linen, g_nnx, atol=ATOL_GRAD_F32, rtol=RTOL_GRAD_F32)
    assert float(jnp.abs(g_linen["q_kernel"]).max()) > 0.0


# ---------------------------------------------------------------------------
# (4) Round trips
# ---------------------------------------------------------------------------

_NNX_OPTIONS = ("in_features", "num_heads", "num_kv_heads", "head_dim", "v_head_dim",
                "in_k_features", "in_v_features", "out_features", "use_bias", "dropout_rate",
                "dtype", "param_dtype", "implementation", "scale", "rope", "deterministic")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
def test_round_trip_nnx_linen_nnx_is_bit_exact(variant, use_bias):
    N, K = VARIANTS[variant]
    m = aj.MultiHeadAttention(8, N, num_kv_heads=K, head_dim=4, v_head_dim=2, in_k_features=6,
                              out_features=5, use_bias=use_bias, dropout_rate=0.25, scale=0.3,
                              rope=50.0, implementation="xla", deterministic=True,
                              **_fast(), rngs=nnx.Rngs(0))
    lin, variables = ajl.from_nnx(m)
    expected = set(PARAM_AXES) if use_bias else {"q_kernel", "k_kernel", "v_kernel", "o_kernel"}
    assert set(variables) == {"params"} and set(variables["params"]) == expected

    back = ajl.to_nnx(lin, variables)
    assert {o: getattr(back, o) for o in _NNX_OPTIONS} == {o: getattr(m, o) for o in _NNX_OPTIONS}
    for name in PARAM_AXES:
        a, b = getattr(m, name), getattr(back, name)
        if not use_bias and name.endswith("_bias"):
            assert a is None and b is None
            continue
        assert a[...].dtype == b[...].dtype
        np.testing.assert_array_equal(a[...], b[...])
        assert b.get_metadata()["out_sharding"] == PARAM_AXES[name][0]
    xq, xk = jnp.ones((1, 3, 8)), _randn(1, (1, 4, 6))
    (graph, state), (graph_back, state_back) = nnx.split(m), nnx.split(back)

    @jax.jit
    def outputs(state, state_back, variables):
        return (nnx.merge(graph, state)(xq, xk), nnx.merge(graph_back, state_back)(xq, xk),
                lin.apply(variables, xq, xk))

    y, y_back, y_linen = outputs(state, state_back, variables)
    np.testing.assert_array_equal(y_back, y)
    np.testing.assert_allclose(y_linen, y, atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_round_trip_linen_nnx_linen_is_bit_exact(param_dtype):
    lin = ajl.GroupedQueryAttention(4, 2, param_dtype=param_dtype, **_fast())
    variables = nn.meta.unbox(jax.jit(lin.init)(jax.random.key(0), jnp.ones((1, 2, 8))))
    lin2, variables2 = ajl.from_nnx(ajl.to_nnx(lin, variables))
    assert jax.tree.structure(variables2) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2), strict=True):
        assert a.dtype == b.dtype == param_dtype
        np.testing.assert_array_equal(a, b)
    assert (lin2.num_heads, lin2.num_kv_heads, lin2.head_dim, lin2.param_dtype) == (
        4, 2, 2, param_dtype)


def test_to_nnx_takes_a_config_mapping_and_a_submodule_params_dict():
    block = _Block(4, 2)
    x = _randn(0, (2, 5, 8))

    @jax.jit
    def run(key):
        variables = block.init(key, x, None)
        m = ajl.to_nnx({"num_heads": 4, "num_kv_heads": 2, "head_dim": 3},
                       variables["params"]["attn"])  # boxed, no 'params' level
        h = nn.Dense(12).apply({"params": variables["params"]["proj"]}, x)
        return m(h), block.apply(variables, x, None), m.in_features, m.head_dim

    y_nnx, y_linen, in_features, head_dim = run(jax.random.key(1))
    assert (int(in_features), int(head_dim)) == (12, 3)
    np.testing.assert_allclose(y_nnx, y_linen, atol=ATOL_F32, rtol=RTOL_F32)


# ---------------------------------------------------------------------------
# (5) Dropout
# ---------------------------------------------------------------------------

RATE = 0.5


@pytest.mark.parametrize(
    ("variant", "jit"),
    [("gqa", False)] + [(v, True) for v in VARIANTS],  # eager once: each run compiles its ops
    ids=lambda v: {False: "eager", True: "jit"}.get(v, v),
)
def test_dropout_is_deterministic_given_the_rng(variant, jit):
    N, K = VARIANTS[variant]
    lin = ajl.MultiHeadAttention(N, num_kv_heads=K, dropout_rate=RATE, **_fast())
    x = _randn(0, (2, 5, 8))
    variables = lin.init(jax.random.key(1), x)  # no 'dropout' rng needed at init
    apply = jax.jit(lin.apply, static_argnames=("deterministic", "return_weights"))
    apply = apply if jit else lin.apply

    def run(seed, **kw):
        return apply(variables, x, rngs={"dropout": jax.random.key(seed)}, return_weights=True,
                     **kw)

    (y1, w1), (y2, _), (y3, _) = run(2), run(2), run(3)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)

    # Weights are the deterministic ones, dropped (0) or scaled by 1 / (1 - rate).
    y0, w0 = run(2, deterministic=True)
    w1, w0 = np.asarray(w1), np.asarray(w0)
    dropped = w1 == 0.0
    np.testing.assert_allclose(np.where(dropped, 0.0, w1), np.where(dropped, 0.0, w0 / (1 - RATE)),
                               rtol=RTOL_F32, atol=ATOL_F32)
    frac = dropped.mean()
    assert 0.3 < frac < 0.7, frac

    # deterministic=True is the module without dropout.
    no_drop = ajl.MultiHeadAttention(N, num_kv_heads=K, **_fast())
    np.testing.assert_allclose(y0, no_drop.apply(variables, x), rtol=RTOL_F32, atol=ATOL_F32)


def test_deterministic_field_and_call_argument():
    x = _randn(0, (1, 4, 8))
    lin = ajl.MultiHeadAttention(4, dropout_rate=RATE, deterministic=True, **_fast())
    variables = lin.init(jax.random.key(1), x)
    plain = ajl.MultiHeadAttention(4).apply(variables, x)
    np.testing.assert_array_equal(lin.apply(variables, x), plain)  # no rng needed
    on = lin.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(on, plain)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        lin.apply(variables, x, deterministic=False)
    # The NNX module built from it keeps the setting.
    assert ajl.to_nnx(lin, variables).deterministic is True


# ---------------------------------------------------------------------------
# (6) Errors name the numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_kv_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"num_kv_heads": 0}, "num_kv_heads must be >= 1; got 0"),
        ({"width": 18}, r"in_features \(18\) is not divisible by num_heads \(4\)"),
        ({"dropout_rate": 1.5}, r"dropout_rate must be in \[0, 1\); got 1.5"),
        ({"implementation": "fast"}, "unknown implementation 'fast'"),
        ({"rope": 10_000.0, "head_dim": 3}, "rope needs an even head_dim; got 3"),
    ],
)
def test_config_errors_at_init(kwargs, match):
    kwargs = dict(kwargs)
    width = kwargs.pop("width", 16)
    with pytest.raises(ValueError, match=match):
        ajl.MultiHeadAttention(4, **kwargs).init(jax.random.key(0), jnp.ones((1, 2, width)))


def test_call_errors_name_the_numbers():
    lin = ajl.MultiHeadAttention(4, **_fast())
    x = jnp.ones((2, 5, 16))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"inputs_q must be \[batch, length, features\]; "
                                         r"got shape \(5, 16\)"):
        lin.init(key, jnp.ones((5, 16)))
    with pytest.raises(ValueError, match="inputs_q has batch 2 but inputs_k has 3"):
        lin.init(key, x, jnp.ones((3, 5, 16)))
    with pytest.raises(ValueError, match=r"inputs_k \(2, 5, 16\) and inputs_v \(2, 4, 16\)"):
        lin.init(key, x, x, jnp.ones((2, 4, 16)))

    variables = lin.init(key, x, jnp.ones((2, 5, 12)))  # Dk = 12 from the inputs
    with pytest.raises(ValueError, match="inputs_q has 10 features but the module expects 16"):
        lin.apply(variables, jnp.ones((2, 5, 10)), jnp.ones((2, 5, 12)))
    with pytest.raises(ValueError, match="inputs_k has 16 features but the module expects 12"):
        lin.apply(variables, x)
    # A configuration that does not fit the stored parameters: Flax's shape check.
    with pytest.raises(flax.errors.ScopeParamShapeError,
                       match=r"k_kernel.*shape \(12, 2, 4\).*shape \(12, 4, 4\)"):
        ajl.MultiHeadAttention(4, num_kv_heads=2).apply(variables, x, jnp.ones((2, 5, 12)))


def test_conversion_errors():
    lin = ajl.MultiQueryAttention(4, **_fast())
    variables = nn.meta.unbox(lin.init(jax.random.key(0), jnp.ones((1, 2, 16))))
    with pytest.raises(ValueError, match=r"missing \['q_bias', 'k_bias', 'v_bias', 'o_bias'\]"):
        ajl.to_nnx(lin, {"params": {n: a for n, a in variables["params"].items()
                                    if n.endswith("_kernel")}})
    with pytest.raises(ValueError, match=r"use_bias=False: missing \[\], unexpected \['k_bias'"):
        ajl.to_nnx(ajl.MultiQueryAttention(4, use_bias=False), variables)
    with pytest.raises(ValueError, match=r"k_kernel has shape \(16, 1, 4\) but num_heads=4, "
                                         r"num_kv_heads=2, .* give \(16, 2, 4\)"):
        ajl.to_nnx(ajl.GroupedQueryAttention(4, 2), variables)
    with pytest.raises(TypeError, match="got int"):
        ajl.to_nnx(4, variables)
    with pytest.raises(TypeError, match="got MultiHeadAttention"):
        ajl.from_nnx(lin)  # the Linen module, not an NNX one


# ---------------------------------------------------------------------------
# (7) Logical partitioning metadata
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_logical_partitioning_metadata(variant):
    N, K = VARIANTS[variant]
    lin = ajl.MultiHeadAttention(N, num_kv_heads=K, **_fast())
    x = jnp.ones((2, 3, 8))
    abstract = jax.eval_shape(lin.init, jax.random.key(0), x)
    specs = nn.get_partition_spec(abstract)["params"]
    assert specs == {name: P(*axes) for name, (axes, _) in PARAM_AXES.items()}

    # They place the parameters: heads split over 'model' (kv heads too when K % 4 == 0).
    mesh = sharding.make_mesh(2, 4)
    rules = sharding.logical_rules(sharding.kv_layout(N, K, 4))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    variables = nn.meta.unbox(jax.jit(lin.init, out_shardings=shardings)(jax.random.key(0), x))
    q_kernel, k_kernel = variables["params"]["q_kernel"], variables["params"]["k_kernel"]
    assert q_kernel.sharding.shard_shape(q_kernel.shape) == (8, N // 4, 2)
    assert k_kernel.sharding.shard_shape(k_kernel.shape) == (8, K // 4 if K % 4 == 0 else K, 2)

    # With the package's rules, Linen's mesh specs are those of the NNX module.
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)["params"]
    assert mesh_specs == sharding.param_specs(ajl.to_nnx(lin, variables), mesh)
