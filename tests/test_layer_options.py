"""The model-family options of AttentionConfig (qk-norm, soft-capping, sliding window,
sinks) against a float64 numpy reference, through the NNX module, Linen and decode.

Tolerance: float32 against float64, 2e-5 absolute (values are O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import linen as ajl
from tests.helpers import jitted

TOL = dict(atol=2e-5, rtol=2e-5)
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
B, T, D, H = 2, 7, 16, 4


def _rms(x, w, eps, axes):
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps) * w


def reference(m: aj.MultiHeadAttention, x, *, causal=True):
    """float64: projections, qk-norm, scores, softcap, window, sinks, softmax, output."""
    cfg = m.config
    p = {n: None if v is None else np.asarray(v, np.float64) for n, v in m.param_values().items()}
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, p["q_kernel"]) + p["q_bias"]
    k = np.einsum("btd,dkh->btkh", x, p["k_kernel"]) + p["k_bias"]
    v = np.einsum("btd,dkh->btkh", x, p["v_kernel"]) + p["v_bias"]
    if cfg.qk_norm is not None:
        axes = (-2, -1) if cfg.qk_norm == "full" else (-1,)
        off = cfg.qk_norm_offset  # Gemma 3: x / rms(x) * (1 + w)
        q = _rms(q, off + p["q_norm"], cfg.qk_norm_eps, axes)
        k = _rms(k, off + p["k_norm"], cfg.qk_norm_eps, axes)
    G = cfg.num_groups
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * (cfg.scale or 1 / np.sqrt(cfg.head_dim))
    if cfg.softcap is not None:
        s = cfg.softcap * np.tanh(s / cfg.softcap)
    t_idx, s_idx = np.arange(x.shape[1])[:, None], np.arange(x.shape[1])[None, :]
    visible = np.ones_like(s, bool)
    if causal:
        visible &= s_idx <= t_idx
    if cfg.sliding_window is not None:
        visible &= s_idx > t_idx - cfg.sliding_window
    s = np.where(visible, s, -np.inf)
    sink = p["sinks"][None, :, None, None] if cfg.sinks else np.full((1, 1, 1, 1), -np.inf)
    mx = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - mx)
    w = e / (e.sum(-1, keepdims=True) + np.exp(sink - mx))
    out = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", out, p["o_kernel"]) + p["o_bias"]


def _module(N, K, **options):
    m = aj.MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rngs=nnx.Rngs(0), **options)
    rng = np.random.default_rng(3)
    for spec in m.config.params():  # non-trivial biases, norm scales and sinks
        if not spec.is_kernel:
            getattr(m, spec.name)[...] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(spec.shape),
                                                     jnp.float32)
    return m


OPTIONS = {
    "qk_norm_head": dict(qk_norm="head", qk_norm_eps=1e-5),
    "qk_norm_full": dict(qk_norm="full"),
    "qk_norm_offset": dict(qk_norm="head", qk_norm_offset=1.0),  # Gemma 3's 1 + w
    "softcap": dict(softcap=0.5),
    "window": dict(sliding_window=3),
    "sinks": dict(sinks=True),
    "all": dict(qk_norm="head", softcap=2.0, sliding_window=2, sinks=True),
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_matches_reference(heads, option):
    m = _module(*HEADS[heads], **OPTIONS[option])
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    np.testing.assert_allclose(np.asarray(m(x, is_causal=True)), reference(m, x), **TOL)


@pytest.mark.parametrize("option", ["qk_norm_full", "all"])
def test_option_parameters_get_gradients_and_jit_matches(option):
    m = _module(4, 2, **OPTIONS[option])
    x = jax.random.normal(jax.random.key(2), (B, T, D))
    y = nnx.jit(lambda mod, x: mod(x, is_causal=True))(m, x)
    np.testing.assert_allclose(np.asarray(y), reference(m, x), **TOL)
    grads = nnx.grad(lambda mod: jnp.sum(jnp.sin(mod(x, is_causal=True))))(m)
    names = [s.name for s in m.config.params() if not s.is_kernel and "bias" not in s.name]
    for name in names:
        g = np.asarray(grads[name][...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


def test_qk_norm_offset_starts_at_an_effective_scale_of_one():
    """With ``qk_norm_offset=1.0`` the stored w starts at 0 (NNX and Linen), so a fresh
    module normalises exactly as one with the plain scale starting at 1."""
    plain = aj.MultiHeadAttention(D, 4, num_kv_heads=2, head_dim=H, qk_norm="head",
                                  rngs=nnx.Rngs(0))
    gemma = aj.MultiHeadAttention(D, 4, num_kv_heads=2, head_dim=H, qk_norm="head",
                                  qk_norm_offset=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(gemma.q_norm[...], np.zeros(H))
    x = jax.random.normal(jax.random.key(8), (B, T, D))
    np.testing.assert_array_equal(gemma(x), plain(x))
    attn = ajl.MultiHeadAttention(4, num_kv_heads=2, head_dim=H, qk_norm="head",
                                  qk_norm_offset=1.0)
    k_norm = attn.init(jax.random.key(0), x)["params"]["k_norm"]
    np.testing.assert_array_equal(getattr(k_norm, "value", k_norm), np.zeros(H))  # unboxed


def test_parameters_shapes_and_linen():
    m = _module(4, 2, qk_norm="full", sinks=True)
    assert (m.q_norm.shape, m.k_norm.shape, m.sinks.shape) == ((4, H), (2, H), (4,))
    assert m.q_norm.get_metadata()["out_sharding"] == ("heads", "head_dim")
    assert aj.MultiHeadAttention(D, 4, rngs=nnx.Rngs(0)).sinks is None
    x = jax.random.normal(jax.random.key(4), (B, T, D))
    attn = ajl.MultiHeadAttention(4, num_kv_heads=2, head_dim=H, qk_norm="head", sinks=True,
                                  softcap=1.0, sliding_window=3)
    variables = attn.init(jax.random.key(0), x)
    assert {"q_norm", "k_norm", "sinks"} <= set(variables["params"])
    nnx_m = ajl.to_nnx(attn, variables)
    np.testing.assert_allclose(nnx_m(x, is_causal=True), attn.apply(variables, x, is_causal=True),
                               atol=1e-6)


# every option with GQA; MHA and MQA with all the options together
DECODE_CASES = [("gqa", o) for o in OPTIONS] + [("mha", "all"), ("mqa", "all")]


@pytest.mark.parametrize(("heads", "option"), DECODE_CASES)
@pytest.mark.parametrize("implementation", ["decode", "xla"])
def test_decode_equals_the_full_forward(heads, option, implementation):
    """Prefill 4 then one token at a time: the decode kernel (softcap as its score_mod,
    sinks at its merge, the window's blocks) and the einsum path over the cache."""
    m = _module(*HEADS[heads], rope=10_000.0, implementation=implementation, **OPTIONS[option])
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    full = jitted(_module(*HEADS[heads], rope=10_000.0, **OPTIONS[option]))(x, is_causal=True)
    cache = m.init_cache(B, 16)
    step = nnx.jit(lambda mod, x, c: mod.decode(x, c))
    y0, cache = step(m, x[:, :4], cache)
    ys = [y0]
    for i in range(4, T):
        y, cache = step(m, x[:, i:i + 1], cache)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), full, **TOL)


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("implementation", ["decode", "xla"])
def test_left_padded_decode_equals_each_prompt_alone(heads, implementation):
    """Two prompts (7 and 4 tokens) left-padded to 7 and prefilled together into a
    ``left_padded`` cache, then 3 steps: each row equals its own unpadded forward (rope
    positions from the first real token, padding never attended)."""
    m = _module(*HEADS[heads], rope=10_000.0, implementation=implementation,
                **OPTIONS["all"])
    x = jax.random.normal(jax.random.key(6), (B, T + 3, D))
    lengths = [7, 4]
    pad = np.array([T - n for n in lengths])
    prompts = jnp.stack([jnp.roll(x[b, :T], int(pad[b]), axis=0) for b in range(B)])
    prompts = prompts.at[1, :pad[1]].set(9.0)  # padding content must not matter
    cache = aj.cache.left_padded(m.init_cache(B, 16), jnp.asarray(pad))
    decode = jitted(m, "decode")
    y, cache = decode(prompts, cache)
    outs = [[y[b, pad[b]:]] for b in range(B)]
    rows = [np.asarray(x[b, :n]) for b, n in enumerate(lengths)]
    for i in range(3):  # the next token of row b is its own next input
        new = jnp.stack([x[b, lengths[b] + i] for b in range(B)])[:, None]
        y, cache = decode(new, cache)
        for b in range(B):
            outs[b].append(y[b])
            rows[b] = np.concatenate([rows[b], np.asarray(new[b])])
    ref = _module(*HEADS[heads], rope=10_000.0, **OPTIONS["all"])  # same parameters
    for b in range(B):
        alone = jitted(ref)(jnp.asarray(rows[b])[None], is_causal=True)[0]
        np.testing.assert_allclose(np.concatenate(outs[b]), alone, **TOL)
    np.testing.assert_array_equal(cache.starts, pad)
    assert aj.cache.token_positions(cache, 1).tolist() == [[10], [7]]


@pytest.mark.parametrize(("options", "message"), [
    (dict(qk_norm="rms"), r"qk_norm must be one of \('head', 'full'\) or None; got 'rms'"),
    (dict(softcap=0.0), r"softcap must be a finite number > 0; got 0.0"),
    (dict(sliding_window=0), r"sliding_window must be >= 1; got 0"),
    (dict(sinks=1), r"sinks must be a bool; got 1"),
    (dict(qk_norm_offset=float("nan")), r"qk_norm_offset must be a finite number; got nan"),
])
def test_invalid_family_options(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        aj.AttentionConfig(16, 4, **options)


@pytest.mark.parametrize("heads", list(HEADS))
def test_window_with_a_dense_mask_and_per_row_positions(heads):
    """A dense padding mask, ``[B, T]`` positions and the config's window: the same
    outputs as the padding given as a mask object (the window per row, at its positions)."""
    m = _module(*HEADS[heads], rope=10_000.0, sliding_window=3)
    x = jax.random.normal(jax.random.key(7), (B, T, D))
    pos = jnp.stack([jnp.arange(T), jnp.arange(T) + 5])
    keep = jnp.ones((B, T), bool).at[1, :2].set(False)
    dense = m(x, is_causal=True, positions=pos, mask=keep[:, None, None, :])
    obj = m(x, is_causal=True, positions=pos, mask=aj.masks.Segments(jnp.where(keep, 0, -1)))
    np.testing.assert_allclose(np.asarray(dense)[:, 2:], np.asarray(obj)[:, 2:], **TOL)
    np.testing.assert_allclose(np.asarray(dense)[0], np.asarray(obj)[0], **TOL)


@pytest.mark.parametrize("heads", list(HEADS))
def test_segment_ids_pack_sequences(heads):
    """``segment_ids`` (with positions restarting per segment): each packed sequence
    equals the sequence alone; with a dense mask too; a bad shape names both numbers."""
    m = _module(*HEADS[heads], rope=10_000.0)
    x = jax.random.normal(jax.random.key(9), (1, T, D))
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3]])
    packed = jitted(m)(x, is_causal=True, positions=pos, segment_ids=ids)
    for lo, hi in ((0, 3), (3, T)):
        alone = jitted(m)(x[:, lo:hi], is_causal=True)
        np.testing.assert_allclose(packed[:, lo:hi], alone, **TOL)
    dense = jitted(m)(x, is_causal=True, positions=pos, segment_ids=ids,
                      mask=jnp.ones((1, 1, T, T), bool))
    np.testing.assert_allclose(dense, packed, **TOL)
    with pytest.raises(ValueError, match=r"Segments q_ids must be \[1 or 1, 7\]; got shape"):
        m(x, segment_ids=ids[:, :5])
