"""Rotary position embeddings: the pure functions against NumPy, the module against a
Hugging Face-style rotary attention written in torch (forward and gradients), and the
:class:`~attention_jax.rope.Rope` scalings / partial rotary / interleaved layout against
transformers' own rotary classes and ``ROPE_INIT_FUNCTIONS`` (skipped without transformers)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import rope
from attention_jax.modules import PARAM_AXES
from attention_jax.rope import Rope

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
    # rope really matters for this comparison: the same parameters (same seed) without rope
    plain = aj.MultiHeadAttention(16, N, num_kv_heads=K, head_dim=6, rope=None,
                                  bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain.q_kernel[...], m.q_kernel[...])
    assert np.abs(np.asarray(plain(x, is_causal=True)) - ty.detach().numpy()).max() > 1e-2


# --------------------------------------------------------------------------- Rope: scalings,
# partial rotary and interleaved layout against transformers' own rotary classes (float32).

ATOL_HF = RTOL_HF = 1e-5  # float32 forward and gradients w.r.t. x, both sides in float32
H_HF = 16  # head size of the small transformers configs
SHORT = (1.0, 1.5, 2.0, 3.0)  # longrope factors for R = 8 (4 frequencies)
LONG = (2.0, 3.0, 5.0, 8.0)


def _hf_case(name):
    """(transformers config, rotary class, apply function, kind, our Rope) of one case;
    kind "halves" = ``apply(q, k, cos, sin)`` on [B, N, T, H], "gptj" = GPT-J's."""
    tf = pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.gptj import modeling_gptj
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2

    small = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2,
             "head_dim": H_HF, "num_hidden_layers": 1}
    llama = (modeling_llama.LlamaRotaryEmbedding, modeling_llama.apply_rotary_pos_emb, "halves")
    if name == "llama3":
        cfg = tf.LlamaConfig(**small, max_position_embeddings=256, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        ours = Rope(10_000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position=32)
        return (cfg, *llama, ours)
    if name == "linear":
        cfg = tf.LlamaConfig(**small, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": THETA})
        return (cfg, *llama, Rope(THETA, "linear", factor=4.0))
    if name == "dynamic":
        cfg = tf.LlamaConfig(**small, max_position_embeddings=16, rope_parameters={
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": THETA})
        return (cfg, *llama, Rope(THETA, "dynamic", factor=2.0, original_max_position=16))
    if name == "yarn-qwen2":
        cfg = tf.Qwen2Config(**small, max_position_embeddings=128, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
            "rope_theta": 10_000.0})
        return (cfg, modeling_qwen2.Qwen2RotaryEmbedding, modeling_qwen2.apply_rotary_pos_emb,
                "halves", Rope(10_000.0, "yarn", factor=4.0, original_max_position=32))
    if name == "yarn-gpt-oss":
        cfg = tf.GptOssConfig(**small, max_position_embeddings=128, rope_parameters={
            "rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150_000.0})
        ours = Rope(150_000.0, "yarn", factor=8.0, original_max_position=16, truncate=False)
        return (cfg, modeling_gpt_oss.GptOssRotaryEmbedding,
                modeling_gpt_oss.apply_rotary_pos_emb, "gpt-oss", ours)
    if name == "longrope-partial-phi3":
        cfg = tf.Phi3Config(**{k: v for k, v in small.items() if k != "head_dim"},
                            max_position_embeddings=128, original_max_position_embeddings=32,
                            rope_parameters={"rope_type": "longrope", "short_factor": list(SHORT),
                                             "long_factor": list(LONG), "rope_theta": THETA,
                                             "partial_rotary_factor": 0.5})
        ours = Rope(THETA, "longrope", factor=4.0, original_max_position=32, short_factor=SHORT,
                    long_factor=LONG, rotary_dim=8)
        return (cfg, modeling_phi3.Phi3RotaryEmbedding, modeling_phi3.apply_rotary_pos_emb,
                "halves", ours)
    if name == "partial-neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                               rope_parameters={"rope_type": "default", "rope_theta": THETA,
                                                "partial_rotary_factor": 0.25})
        return (cfg, modeling_gpt_neox.GPTNeoXRotaryEmbedding,
                modeling_gpt_neox.apply_rotary_pos_emb, "halves", Rope(THETA, rotary_dim=4))
    assert name == "interleaved-gptj"
    cfg = tf.GPTJConfig(n_embd=32, n_head=2, n_layer=1, rotary_dim=8, n_positions=64)
    return (cfg, modeling_gptj.GPTJRotaryEmbedding, modeling_gptj.apply_rotary_pos_emb, "gptj",
            Rope(10_000.0, rotary_dim=8, layout="interleaved"))


HF_CASES = ("llama3", "linear", "dynamic", "yarn-qwen2", "yarn-gpt-oss",
            "longrope-partial-phi3", "partial-neox", "interleaved-gptj")
# [B, T] positions: an offset row and a left-padded one (positions repeat on the padding);
# "long" goes past every case's original length (dynamic grows, longrope switches).
POSITIONS = {"short": [[3, 4, 5, 6, 7], [0, 0, 0, 1, 2]],
             "long": [[30, 31, 32, 33, 34], [0, 0, 38, 39, 40]]}


def _hf_rotate(torch, case, q, k, positions):
    """transformers' rotation of q, k ``[B, T, N, H]`` (torch float32) at ``positions``."""
    cfg, rotary_cls, apply, kind, ours = case
    pos = torch.tensor(positions)
    if kind == "gptj":
        R = ours.rotary_dim
        sin, cos = rotary_cls(cfg)(q, pos)  # [B, T, R/2]
        return [torch.cat([apply(t[..., :R], sin, cos), t[..., R:]], dim=-1) for t in (q, k)]
    cos, sin = rotary_cls(cfg)(q, pos)  # a fresh instance: dynamic's state starts clean
    qe, ke = apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qe.transpose(1, 2), ke.transpose(1, 2)


@pytest.mark.parametrize("length", POSITIONS)
@pytest.mark.parametrize("name", HF_CASES)
def test_rope_matches_transformers_rotary_forward_and_grad(name, length):
    torch = pytest.importorskip("torch")
    case = _hf_case(name)
    ours = case[-1]
    positions = jnp.array(POSITIONS[length])
    q = jax.random.normal(jax.random.key(6), (2, 5, 2, H_HF))
    k = jax.random.normal(jax.random.key(7), (2, 5, 2, H_HF))
    gq, gk = (jax.random.normal(jax.random.key(s), q.shape) for s in (8, 9))

    def loss(q, k, positions):
        return (jnp.sum(rope.apply_rope(q, positions, ours) * gq)
                + jnp.sum(rope.apply_rope(k, positions, ours) * gk))

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    _, (dq, dk) = value_and_grad(q, k, positions)

    tq, tk = (torch.tensor(np.asarray(t), requires_grad=True) for t in (q, k))
    hq, hk = _hf_rotate(torch, case, tq, tk, POSITIONS[length])
    ((hq * torch.tensor(np.asarray(gq))).sum() + (hk * torch.tensor(np.asarray(gk))).sum()
     ).backward()
    for got, want in ((rope.apply_rope(q, positions, ours), hq), (dq, tq.grad),
                      (rope.apply_rope(k, positions, ours), hk), (dk, tk.grad)):
        chex.assert_trees_all_close(got, want.detach().numpy(), atol=ATOL_HF, rtol=RTOL_HF)
    # the rotary part really rotates (and a partial rotary leaves the rest untouched)
    R = ours.dim(H_HF)
    assert np.abs(np.asarray(hq[..., :R].detach()) - np.asarray(q[..., :R])).max() > 1e-2
    np.testing.assert_array_equal(rope.apply_rope(q, positions, ours)[..., R:], q[..., R:])


def _init_config(tf, rope_parameters, **extra):
    kw = {"hidden_size": 32, "num_attention_heads": 2, "head_dim": H_HF,
          "max_position_embeddings": 64, "num_hidden_layers": 1, **extra}
    return tf.LlamaConfig(**kw, rope_parameters=rope_parameters)


INIT_CASES = {  # rope_parameters of a LlamaConfig (max_position 64) and our Rope
    "linear": ({"rope_type": "linear", "factor": 3.0, "rope_theta": THETA},
               Rope(THETA, "linear", factor=3.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 3.0, "rope_theta": THETA},
                Rope(THETA, "dynamic", factor=3.0, original_max_position=64)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                "rope_theta": 10_000.0},
               Rope(10_000.0, "llama3", factor=8.0, original_max_position=16)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
              "rope_theta": 10_000.0},
             Rope(10_000.0, "yarn", factor=4.0, original_max_position=16)),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                     "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0,
                     "rope_theta": 10_000.0},
                    Rope(10_000.0, "yarn", factor=4.0, original_max_position=16, mscale=0.707,
                         mscale_all_dim=1.0, beta_fast=16.0, beta_slow=2.0)),
    "yarn-attention-factor": ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.9,
                               "original_max_position_embeddings": 32, "rope_theta": THETA},
                              Rope(THETA, "yarn", factor=2.0, original_max_position=32,
                                   attention_factor=0.9)),
    "longrope": ({"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2,
                                                            2.4],
                  "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5],
                  "original_max_position_embeddings": 16, "rope_theta": THETA},
                 Rope(THETA, "longrope", factor=4.0, original_max_position=16,
                      short_factor=(1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4),
                      long_factor=(2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5))),
    "llama3-partial": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                        "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
                       Rope(10_000.0, "llama3", factor=8.0, original_max_position=16,
                            rotary_dim=8)),
}


@pytest.mark.parametrize("name", INIT_CASES)
def test_inv_freq_and_attention_scaling_match_transformers_init_functions(name):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params, ours = INIT_CASES[name]
    cfg = _init_config(tf, dict(params))
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    for seq_len in (None, 10, 40, 200):  # below, around and past the original lengths
        want, scale = init(cfg, None, seq_len=None if seq_len is None else torch.tensor(seq_len))
        got = ours.inv_freq(H_HF, None if seq_len is None else jnp.array(seq_len))
        chex.assert_trees_all_close(got, want.numpy(), atol=1e-7, rtol=1e-6,
                                    custom_message=f"seq_len={seq_len}")
        assert ours.attention_scaling == pytest.approx(float(scale), rel=1e-12)


def test_rope_default_equals_float_theta_and_is_static_hashable():
    x = jax.random.normal(jax.random.key(10), (2, 5, 3, 8))
    pos = jnp.array([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
    chex.assert_trees_all_close(rope.apply_rope(x, pos, Rope(THETA)),
                                rope.apply_rope(x, pos, THETA), atol=1e-6, rtol=1e-6)
    a = Rope(THETA, "longrope", factor=2.0, original_max_position=8, short_factor=[1, 2],
             long_factor=[3, 4], rotary_dim=4)
    assert a.short_factor == (1.0, 2.0) and hash(a) == hash(
        Rope(THETA, "longrope", factor=2.0, original_max_position=8, short_factor=(1.0, 2.0),
             long_factor=(3.0, 4.0), rotary_dim=4))
    assert Rope(np.float32(THETA), rotary_dim=np.int64(4)) == Rope(THETA, rotary_dim=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.theta = 1.0  # type: ignore[misc]
    jitted = jax.jit(rope.apply_rope, static_argnums=2)  # a Rope is a valid static argument
    chex.assert_trees_all_close(jitted(x, pos, a), rope.apply_rope(x, pos, a), atol=1e-6,
                                rtol=1e-6)
    # [T] positions are the [B, T] ones shared by the batch; the dtype is kept
    b = Rope(THETA, rotary_dim=6, layout="interleaved")
    chex.assert_trees_all_close(rope.apply_rope(x, pos[1], b),
                                rope.apply_rope(x, jnp.stack([pos[1], pos[1]]), b),
                                atol=1e-6, rtol=1e-6)
    assert rope.apply_rope(x.astype(jnp.bfloat16), pos, b).dtype == jnp.bfloat16


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_length_dependent_scalings_follow_the_traced_max_position(use_jit):
    """dynamic and longrope read ``max(positions) + 1`` over the whole batch, traced."""
    x = jax.random.normal(jax.random.key(11), (2, 3, 1, 8))
    apply = jax.jit(rope.apply_rope, static_argnums=2) if use_jit else rope.apply_rope
    longrope = Rope(THETA, "longrope", original_max_position=8, short_factor=(1, 1, 1, 1),
                    long_factor=(4, 4, 4, 4))
    dynamic = Rope(THETA, "dynamic", factor=2.0, original_max_position=8)
    short_pos = jnp.array([[0, 1, 2], [5, 6, 7]])  # length 8: the original scale
    long_pos = jnp.array([[0, 1, 2], [5, 6, 8]])  # length 9: row 2 switches row 1 too
    for r in (longrope, dynamic):
        chex.assert_trees_all_close(apply(x, short_pos, r), rope.apply_rope(x, short_pos, THETA),
                                    atol=1e-6, rtol=1e-6)
    # longrope past L0: every frequency / 4, i.e. the plain rope at positions / 4
    chex.assert_trees_all_close(apply(x, long_pos, longrope)[0],
                                rope.apply_rope(x, long_pos / 4.0, THETA)[0], atol=1e-6, rtol=1e-6)
    # dynamic at length 9: base THETA * (2 * 9 / 8 - 1) ** (8 / 6)
    grown = THETA * (2 * 9 / 8 - 1) ** (8 / 6)
    chex.assert_trees_all_close(apply(x, long_pos, dynamic), numpy_rope(x, long_pos, grown),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"scaling": "ntk"}, ValueError, r"Rope.scaling must be one of .*got 'ntk'"),
    ({"layout": "pairs"}, ValueError, r"Rope.layout must be one of .*got 'pairs'"),
    ({"theta": -1.0}, ValueError, r"Rope.theta must be > 0; got -1.0"),
    ({"factor": 2.0}, ValueError, r"Rope.factor=2.0 is not used by scaling='none'"),
    ({"scaling": "linear", "beta_fast": 8.0}, ValueError, r"Rope.beta_fast=8.0 is not used"),
    ({"scaling": "dynamic", "factor": 2.0}, ValueError, r"original_max_position is required"),
    ({"scaling": "llama3", "original_max_position": 8, "low_freq_factor": 4.0},
     ValueError, r"high_freq_factor \(4.0\) must be > low_freq_factor \(4.0\)"),
    ({"scaling": "yarn", "original_max_position": 8, "beta_fast": 1.0, "beta_slow": 2.0},
     ValueError, r"beta_fast \(1.0\) must be >= beta_slow \(2.0\)"),
    ({"scaling": "longrope", "original_max_position": 8, "short_factor": (1.0,)},
     ValueError, r"short_factor and Rope.long_factor are required"),
    ({"scaling": "longrope", "original_max_position": 8, "short_factor": (1.0,),
      "long_factor": (1.0, 2.0)}, ValueError, r"same length"),
    ({"rotary_dim": 0}, ValueError, r"Rope.rotary_dim must be an integer >= 1 or None; got 0"),
    ({"scaling": "yarn", "original_max_position": 8, "truncate": 1}, TypeError,
     r"Rope.truncate must be a bool"),
    ({"theta": "1e4"}, TypeError, r"Rope.theta must be a number"),
])
def test_rope_validation_names_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        Rope(**kwargs)


def test_rope_check_head_dim():
    with pytest.raises(ValueError, match=r"rotary_dim must be even; got 5"):
        Rope(rotary_dim=5).check(8)
    with pytest.raises(ValueError, match=r"rotary_dim \(10\) must be <= head_dim \(8\)"):
        Rope(rotary_dim=10).check(8)
    with pytest.raises(ValueError, match="even head_dim; got 7"):
        rope.check_rope(Rope(), 7)
    with pytest.raises(ValueError, match=r"rotary_dim / 2 = 4 values; got 2"):
        Rope(scaling="longrope", original_max_position=8, short_factor=(1, 1),
             long_factor=(1, 1)).check(8)
    Rope(rotary_dim=6).check(7)  # an odd head with an even rotary part is fine
    x = jnp.ones((1, 2, 1, 7))
    assert rope.apply_rope(x, jnp.arange(2), Rope(rotary_dim=6)).shape == (1, 2, 1, 7)
