"""Model-family options under head parallelism (8 fake CPU devices, tests/conftest.py).

``qk_norm="head"`` normalises each head on its own, so it splits over the ``model``
axis like the projections; ``qk_norm="full"`` normalises over all heads at once,
which no head shard holds: ``head_parallel`` refuses it on a model axis > 1 rather
than return per-shard norms.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from attention_jax import MultiHeadAttention
from attention_jax import sharding as sh

D, N, K, H = 32, 8, 4, 4


def _module(qk_norm: str) -> MultiHeadAttention:
    """A module whose norm scales are random (all-ones scales would hide a wrong norm)."""
    m = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, qk_norm=qk_norm, rngs=nnx.Rngs(0))
    m.q_norm.set_value(jax.random.normal(jax.random.key(1), m.q_norm.shape))
    m.k_norm.set_value(jax.random.normal(jax.random.key(2), m.k_norm.shape))
    return m


def _x():
    return jax.random.normal(jax.random.key(3), (8, 5, D))  # B = 8: divides every data axis


@pytest.mark.parametrize("model", [2, 4])
def test_qk_norm_full_refused_on_model_axis(model):
    mesh = sh.make_mesh(data=8 // model, model=model)
    with pytest.raises(ValueError, match=rf"qk_norm='full'.*model axis of size {model} > 1"):
        sh.head_parallel(_module("full"), mesh)


def test_qk_norm_full_runs_on_model_axis_of_one():
    m = _module("full")
    expected = m(_x(), is_causal=True)
    hp = sh.head_parallel(nnx.clone(m), sh.make_mesh(data=8, model=1))
    got = hp(_x(), is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("model", [2, 4])
def test_qk_norm_head_splits_over_heads(model):
    m = _module("head")
    expected = m(_x(), is_causal=True)
    hp = sh.head_parallel(nnx.clone(m), sh.make_mesh(data=8 // model, model=model))
    got = hp(_x(), is_causal=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=2e-5)
