"""Rotary position embeddings: the pure functions against NumPy, the module against a
Hugging Face-style rotary attention written in torch (forward and gradients)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import rope
from attention_jax.modules import PARAM_AXES

ATOL_F32 = RTOL_F32 = 1e-5
# Gradients of a float32 forward against a float64 reference.
ATOL_GRAD = RTOL_GRAD = 1e-4

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
THETA = 500.0  # small base: the angles turn visibly over a handful of positions


def numpy_rope(x, positions, theta):
    """float64, written pair by pair: (x_i, x_{i+H/2}) rotated by p * theta**(-2i/H)."""
    x = np.asarray(x, np.float64)
    H = x.shape[-1]
    out = np.empty_like(x)
    pos = np.asarray(positions, np.float64)
    pos = (pos[None] if pos.ndim == 1 else pos)[:, :, None]  # [B | 1, T, 1]
    for i in range(H // 2):
        a = pos * theta ** (-2.0 * i / H)
        x1, x2 = x[..., i], x[..., i + H // 2]
        out[..., i] = x1 * np.cos(a) - x2 * np.sin(a)
        out[..., i + H // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


def test_apply_rope_matches_numpy_shared_and_per_row_positions():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    pos_t = jnp.arange(5) + 3
    chex.assert_trees_all_close(rope.apply_rope(x, pos_t, THETA),
                                numpy_rope(x, pos_t, THETA).astype(np.float32),
                                atol=ATOL_F32, rtol=RTOL_F32)
    pos_bt = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    chex.assert_trees_all_close(rope.apply_rope(x, pos_bt, THETA),
                                numpy_rope(x, pos_bt, THETA).astype(np.float32),
                                atol=ATOL_F32, rtol=RTOL_F32)
    np.testing.assert_array_equal(rope.apply_rope(x, jnp.zeros(5), THETA), x)  # p = 0: identity
    np.testing.assert_allclose(rope.inv_frequencies(8, THETA),
                               THETA ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(1), (1, 4, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 4, 1, 16))
    pos = jnp.array([0, 3, 5, 9])

    def scores(shift):
        qr, kr = rope.apply_rope(q, pos + shift, THETA), rope.apply_rope(k, pos + shift, THETA)
        return jnp.einsum("bthd,bshd->ts", qr, kr)

    chex.assert_trees_all_close(scores(0), scores(37), atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(jnp.linalg.norm(rope.apply_rope(q, pos, THETA), axis=-1),
                                jnp.linalg.norm(q, axis=-1), atol=ATOL_F32, rtol=RTOL_F32)


def test_rope_errors_and_dtype():
    with pytest.raises(ValueError, match="even head_dim; got 5"):
        aj.MultiHeadAttention(10, 2, rope=THETA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="theta must be > 0; got 0"):
        aj.MultiHeadAttention(8, 2, rope=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"positions must be \[T\] or \[B, T\]"):
        rope.apply_rope(jnp.ones((2, 3, 1, 4)), jnp.arange(4), THETA)
    x = jnp.ones((1, 3, 1, 4), jnp.bfloat16)
    assert rope.apply_rope(x, jnp.arange(3), THETA).dtype == jnp.bfloat16


def test_attention_forward_positions_shift_invariance():
    """Self-attention with rope is invariant to a common shift of all positions, and
    rope changes the result (so the positions really reach q and k)."""
    m = aj.MultiHeadAttention(16, 4, num_kv_heads=2, rope=THETA, rngs=nnx.Rngs(0))
    p = {n: None if getattr(m, n) is None else getattr(m, n)[...] for n in PARAM_AXES}
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))

    def fwd(rope_theta, pos):
        y, _ = aj.attention_forward(p, x, x, x, is_causal=True, rope=rope_theta,
                                    positions=pos, kv_positions=pos)
        return y

    base = fwd(THETA, None)
    chex.assert_trees_all_close(fwd(THETA, jnp.arange(5)), base, atol=ATOL_F32, rtol=RTOL_F32)
    shifted = jnp.stack([jnp.arange(5) + 11, jnp.arange(5) + 40])  # [B, T], per row
    chex.assert_trees_all_close(fwd(THETA, shifted), base, atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(fwd(None, None) - base)).max() > 1e-2


# --------------------------------------------------------------------------- torch


def _torch_rotary_attention(torch, params, x, *, num_kv_heads, theta):
    """Llama-style attention in torch: Linear projections, HF ``rotate_half`` rotary
    embedding at positions ``arange(T)``, kv heads repeated with ``repeat_interleave``,
    causal SDPA, output Linear. ``params`` are torch tensors in our layout."""
    B, T, D = x.shape
    _, N, H = params["q_kernel"].shape
    K = num_kv_heads

    def linear(x, kernel, bias):  # [B, T, D] -> [B, T, heads * H], as torch's F.linear
        w = kernel.reshape(kernel.shape[0], -1).T  # [out, in], torch's weight layout
        return torch.nn.functional.linear(x, w, bias.reshape(-1))

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    inv_freq = 1.0 / (theta ** (torch.arange(0, H, 2, dtype=torch.float64) / H))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, H/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, H]
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, T, H]

    q = linear(x, params["q_kernel"], params["q_bias"]).view(B, T, N, H).transpose(1, 2)
    k = linear(x, params["k_kernel"], params["k_bias"]).view(B, T, K, H).transpose(1, 2)
    v = linear(x, params["v_kernel"], params["v_bias"]).view(B, T, K, -1).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(N // K, dim=1)
    v = v.repeat_interleave(N // K, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = out.transpose(1, 2).reshape(B, T, -1)  # [B, T, N * V]
    o = params["o_kernel"]
    return torch.nn.functional.linear(out, o.reshape(-1, o.shape[-1]).T, params["o_bias"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_with_rope_matches_torch_hf_rotary(variant):
    torch = pytest.importorskip("torch")
    N, K = VARIANTS[variant]
    m = aj.MultiHeadAttention(16, N, num_kv_heads=K, head_dim=6, rope=THETA,
                              bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 7, 16))
    g = jax.random.normal(jax.random.key(5), (2, 7, 16))  # output cotangent

    graphdef, state = nnx.split(m)

    @jax.jit
    def forward_and_vjp(state, x):
        y, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x, is_causal=True), state, x)
        return y, vjp(g)

    y, (state_grads, x_grad) = forward_and_vjp(state, x)

    tp = {n: torch.tensor(np.asarray(getattr(m, n)[...], np.float64), requires_grad=True)
          for n in PARAM_AXES}
    tx = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    ty = _torch_rotary_attention(torch, tp, tx, num_kv_heads=K, theta=THETA)
    (ty * torch.tensor(np.asarray(g, np.float64))).sum().backward()

    chex.assert_trees_all_close(y, ty.detach().numpy().astype(np.float32),
                                atol=ATOL_F32, rtol=RTOL_F32)
    chex.assert_trees_all_close(x_grad, tx.grad.numpy().astype(np.float32),
                                atol=ATOL_GRAD, rtol=RTOL_GRAD)
    for name in PARAM_AXES:
        chex.assert_trees_all_close(state_grads[name][...],
                                    tp[name].grad.numpy().astype(np.float32),
                                    atol=ATOL_GRAD, rtol=RTOL_GRAD, custom_message=name)
    # rope really matters for this comparison
    m.rope = None
    assert np.abs(np.asarray(m(x, is_causal=True)) - ty.detach().numpy()).max() > 1e-2
