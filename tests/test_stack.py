"""Stacks of layers (attention_jax.stack): one module with a layer axis, one scan.

The expected values always come from L separate modules called one after the other
in Python (each with its own per-layer cache when decoding); the stacked program's
jaxpr / HLO is read to show it holds one layer body in one loop, not L copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention
from attention_jax import cache as cache_lib
from attention_jax import stack as st
from attention_jax.config import AttentionConfig
from tests.helpers import jitted

ATOL, RTOL = 1e-5, 1e-5  # float32: the scan and the Python loop run the same layer math
B, T, D, N, H = 2, 6, 16, 4, 4
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # K for N = 4
NORMAL = nnx.initializers.normal(0.5)  # non-zero biases: a dropped bias shows


def _config(K: int, **changes) -> AttentionConfig:
    return AttentionConfig(D, N, num_kv_heads=K, head_dim=H, rope=10_000.0, **changes)


def _modules(config: AttentionConfig, L: int, seed: int = 0) -> list[MultiHeadAttention]:
    """L separately built layers, each with its own random kernels and biases."""
    return [MultiHeadAttention.from_config(config, rngs=nnx.Rngs(seed + i), bias_init=NORMAL)
            for i in range(L)]


def _x(t: int = T, seed: int = 7) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, t, D))


def _close(got, want, **kw):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL, **kw)


def _sequential(modules, x, **kwargs):
    for m in modules:
        x = x + jitted(m)(x, **kwargs)
    return x


# ---------------------------------------------------------------------------
# Building: shapes, metadata, stack_modules / layer
# ---------------------------------------------------------------------------


def test_stacked_params_have_a_layer_axis_and_metadata():
    cfg = _config(2)
    s = st.stacked(cfg, 3, rngs=nnx.Rngs(0))
    one = MultiHeadAttention.from_config(cfg, rngs=nnx.Rngs(0))
    for name, value in one.param_values().items():
        if value is not None:
            param = getattr(s, name)
            assert param.shape == (3, *value.shape), name
            assert param.get_metadata()["out_sharding"][0] == st.LAYERS, name
    assert st.num_stacked(s) == 3
    k = np.asarray(s.q_kernel[...])
    assert not np.array_equal(k[0], k[1]), "every layer must draw its own parameters"


def test_stack_modules_and_layer_round_trip():
    modules = _modules(_config(2), 3)
    s = st.stack_modules(modules)
    for i, m in enumerate(modules):
        back = st.layer(s, i)
        assert back.q_kernel.get_metadata()["out_sharding"] == m.q_kernel.get_metadata()[
            "out_sharding"]
        for name, value in m.param_values().items():
            if value is not None:
                np.testing.assert_array_equal(getattr(back, name)[...], value, err_msg=name)
    np.testing.assert_array_equal(st.layer(s, -1).o_bias[...], modules[-1].o_bias[...])


# ---------------------------------------------------------------------------
# Forward: the scan equals L separate calls
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADS)
def test_stack_forward_equals_separate_calls(kind):
    modules = _modules(_config(HEADS[kind]), 3)
    x = _x()
    want = _sequential(modules, x, is_causal=True)
    _close(st.stack_forward(st.stack_modules(modules), x, is_causal=True), want)
    jitted = nnx.jit(lambda s, x: st.stack_forward(s, x, is_causal=True))
    _close(jitted(st.stack_modules(modules), x), want)


def test_stacked_forward_equals_its_layers():
    s = st.stacked(lambda rngs: MultiHeadAttention.from_config(
        _config(2), rngs=rngs, bias_init=NORMAL), 4, rngs=nnx.Rngs(3))
    x = _x()
    want = _sequential([st.layer(s, i) for i in range(4)], x, is_causal=True)
    _close(st.stack_forward(s, x, is_causal=True), want)


class _Block(nnx.Module):
    """A layer with more than attention: attention, then a Linear, both residual."""

    def __init__(self, rngs: nnx.Rngs):
        self.attn = MultiHeadAttention(D, N, num_kv_heads=2, bias_init=NORMAL, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)


def _block_body(block: _Block, x, **kwargs):
    x = x + block.attn(x, **kwargs)
    return x + jnp.tanh(block.mlp(x))


def test_user_factory_and_body():
    s = st.stacked(_Block, 3, rngs=nnx.Rngs(0))
    assert s.mlp.kernel.shape == (3, D, D)
    x = _x()
    want = x
    for i in range(3):
        want = _block_body(st.layer(s, i), want, is_causal=True)
    _close(st.stack_forward(s, x, body=_block_body, is_causal=True), want)


# ---------------------------------------------------------------------------
# Decode: prefill + steps equal L separate modules with their own caches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADS)
def test_stack_decode_prefill_and_steps_equal_separate_modules(kind):
    L, max_len, steps = 3, 12, 3
    modules = _modules(_config(HEADS[kind]), L)
    s = st.stack_modules(modules)
    caches = [m.init_cache(B, max_len) for m in modules]
    stacked_cache = st.init_stacked_cache(s, L, B, max_len)
    step = nnx.jit(st.stack_decode)
    valid = jnp.array([T, T - 2])  # ragged prompts: row 1 right-padded by 2
    inputs = [_x()] + [_x(1, seed=20 + i) for i in range(steps)]
    for n, x in enumerate(inputs):
        kwargs = {"valid_lengths": valid} if n == 0 else {}
        want = x
        for i, m in enumerate(modules):
            y, caches[i] = jitted(m, "decode")(want, caches[i], **kwargs)
            want = want + y
        got, stacked_cache = step(s, x, stacked_cache, **kwargs)
        if n == 0:  # padded prompt positions are meaningless: compare real tokens only
            _close(got[0], want[0])
            _close(got[1, : T - 2], want[1, : T - 2])
        else:
            _close(got, want, err_msg=f"step {n}")
    for i, cache in enumerate(caches):
        mine = st.layer_cache(stacked_cache, i)
        np.testing.assert_array_equal(mine.lengths, cache.lengths)
        _close(mine.k, cache.k)
        _close(mine.v, cache.v)
    assert stacked_cache.lengths.tolist() == [[T + steps, T - 2 + steps]] * L


def test_stack_decode_left_padded_prompts_equal_separate_modules():
    L, max_len = 2, 10
    modules = _modules(_config(2, sliding_window=4), L, seed=5)
    s = st.stack_modules(modules)
    padding = jnp.array([0, 3])  # row 1: 3 padding slots before its prompt
    caches = [cache_lib.left_padded(m.init_cache(B, max_len), padding) for m in modules]
    stacked_cache = st.init_stacked_cache(s, L, B, max_len, padding=padding)
    np.testing.assert_array_equal(stacked_cache.starts, [[0, 3]] * L)
    for n, x in enumerate([_x(), _x(1, seed=30), _x(1, seed=31)]):
        want = x
        for i, m in enumerate(modules):
            y, caches[i] = jitted(m, "decode")(want, caches[i])
            want = want + y
        got, stacked_cache = nnx.jit(st.stack_decode)(s, x, stacked_cache)
        if n == 0:  # the padding slots' outputs are meaningless
            _close(got[0], want[0])
            _close(got[1, 3:], want[1, 3:])
        else:
            _close(got, want, err_msg=f"step {n}")


def test_init_stacked_cache_is_stacked_per_layer_caches():
    cfg = _config(2)
    m = MultiHeadAttention.from_config(cfg, rngs=nnx.Rngs(0))
    for dtype in (None, jnp.int8):
        got = st.init_stacked_cache(cfg, 3, B, 8, dtype=dtype)
        want = st.stack_caches([m.init_cache(B, 8, dtype=dtype)] * 3)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert st.init_stacked_cache(m, 3, B, 8).k.shape == (3, B, 2, 8, H)


# ---------------------------------------------------------------------------
# One loop, not L copies
# ---------------------------------------------------------------------------


def _count(jaxpr, name: str) -> int:
    """Equations named ``name`` in ``jaxpr`` and every sub-jaxpr (scan / pjit bodies)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


def _programs(L: int):
    """(jaxpr, HLO text) of the jitted stacked decode step, and of L separate calls."""
    modules = _modules(_config(2), L)
    s, cache = st.stack_modules(modules), st.init_stacked_cache(modules[0], L, B, 8)
    x = _x(1)

    def stacked_step(s, x, cache):
        return st.stack_decode(s, x, cache)

    def separate(x):
        for m in modules:
            x = x + m(x, is_causal=True)
        return x

    graphdef, state = nnx.split(s)
    pure = jax.jit(lambda st_, x, c: stacked_step(nnx.merge(graphdef, st_), x, c))
    jaxpr = jax.make_jaxpr(pure)(state, x, cache).jaxpr
    hlo = pure.lower(state, x, cache).as_text()
    return jaxpr, hlo, jax.make_jaxpr(separate)(x).jaxpr


def test_stacked_step_is_one_loop_whatever_the_layer_count():
    counts = {}
    for L in (2, 5):
        jaxpr, hlo, separate = _programs(L)
        counts[L] = (_count(jaxpr, "dot_general"), _count(jaxpr, "scan"),
                     hlo.count("stablehlo.dot_general"), hlo.count("stablehlo.while"),
                     _count(separate, "dot_general"))
    (dots2, scans2, hdots2, whiles2, sep2), (dots5, scans5, hdots5, whiles5, sep5) = (
        counts[2], counts[5])
    assert scans2 == scans5 == 1
    assert dots2 == dots5 > 0 and hdots2 == hdots5 > 0
    assert whiles2 == whiles5 >= 1
    assert sep5 * 2 == sep2 * 5, "L separate calls trace L copies (the count can tell)"


# ---------------------------------------------------------------------------
# Gradients through the scan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_gradients_through_the_scan_equal_separate_modules(kind):
    modules = _modules(_config(HEADS[kind]), 3)
    x = _x()

    def stacked_loss(s, x):
        return jnp.sum(jnp.sin(st.stack_forward(s, x, is_causal=True)))

    def separate_loss(ms, x):
        return jnp.sum(jnp.sin(_sequential(ms, x, is_causal=True)))

    g_stack, gx_stack = nnx.grad(stacked_loss, argnums=(0, 1))(st.stack_modules(modules), x)
    g_sep, gx_sep = nnx.grad(separate_loss, argnums=(0, 1))(nnx.List(modules), x)
    _close(gx_stack, gx_sep)
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel", "q_bias", "o_bias"):
        want = np.stack([np.asarray(g_sep[i][name][...]) for i in range(3)])
        _close(g_stack[name][...], want, err_msg=name)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_errors_name_the_numbers():
    cfg = _config(2)
    with pytest.raises(ValueError, match=r"num_layers must be an integer >= 1; got 0"):
        st.stacked(cfg, 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"config_or_factory must be an AttentionConfig"):
        st.stacked(3, 2, rngs=nnx.Rngs(0))
    s = st.stacked(cfg, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"leading layer axis of 3.*\(2, 2\), expected \(3, B\)"):
        st.stack_decode(s, _x(1), st.init_stacked_cache(cfg, 2, B, 8))
    with pytest.raises(IndexError, match=r"layer index 3 out of range for a stack of 3"):
        st.layer(s, 3)
    with pytest.raises(ValueError, match=r"module 1's config differs .*: num_kv_heads=1 vs 2"):
        st.stack_modules([MultiHeadAttention.from_config(cfg, rngs=nnx.Rngs(0)),
                          MultiHeadAttention.from_config(cfg.replace(num_kv_heads=1),
                                                         rngs=nnx.Rngs(0))])
    with pytest.raises(ValueError, match=r"at least one module"):
        st.stack_modules([])


def test_stack_compile_script_tiny_run(tmp_path):
    """experiments/stack_compile.py --tiny runs and its three ways give the same outputs
    (its timings are not checked: they mean nothing on a shared machine)."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "stack_compile.py"
    spec = importlib.util.spec_from_file_location("stack_compile", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cache_on = jax.config.jax_enable_compilation_cache
    assert script.main(["--tiny", "--layers", "2", "--out", str(tmp_path)]) == 0
    assert jax.config.jax_enable_compilation_cache == cache_on
    report = json.loads((tmp_path / "stack_compile.json").read_text())
    assert report["outputs_equal"] is True
    assert [(r["way"], r["layers"]) for r in report["rows"]] == [
        ("stacked", 2), ("unrolled", 2), ("per_layer", 2)]
