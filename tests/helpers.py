"""Test helpers shared by several test files (test files never import each other).

* :func:`numpy_attention`: the float64 numpy reference of attention.
* Blockwise-style checks: :func:`inputs`, :func:`mask_of_kind`, :func:`via_ops`,
  :func:`check_against_einsum` and their stated tolerances.
* :func:`jitted`: a module's method compiled as one program, for the references and
  setup steps of tests that are not about eager execution.
* :func:`child_env`: the environment for a test's child process.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import ops, runtime

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Stated tolerances (absolute; values and gradients are O(1) here).
F32_TOL = dict(atol=2e-5, rtol=2e-5)
F32_GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
# bf16 inputs, float32 accumulation on both sides; the two paths round
# differently (per-block rescaling), so about 3 bf16 ulps at O(1).
BF16_TOL = dict(atol=3e-2, rtol=3e-2)
BF16_GRAD_TOL = dict(atol=6e-2, rtol=6e-2)
# An int8 (or bf16) KV cache against a float32 one: max |dy| relative to max |y|
# (measured 0.25-0.4% for int8, 0.2% for bf16).
INT8_CACHE_TOL = BF16_CACHE_TOL = 1e-2

# (N, K) per variant.
HEADS = {"mha": (4, 4), "mqa": (4, 1), "gqa": (4, 2)}
B, T, S, H, V = 2, 10, 13, 8, 6


def numpy_attention(q, k, v, mask=None, scale=None):
    """float64 reference: repeat K/V to N heads, softmax, zero rows with no key.

    Returns ``(out [B, T, N, V], weights [B, N, T, S])``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scale = 1 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    m = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    logits = np.where(m, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(mx), mx, 0.0))
    w = np.where(m, w, 0.0)
    den = w.sum(-1, keepdims=True)
    w = np.divide(w, den, out=np.zeros_like(w), where=den > 0)
    return np.einsum("bnts,bsnv->btnv", w, v), w


def inputs(N, K, T=T, S=S, *, dtype=jnp.float32, seed=0):
    """Random ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, V]``."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, V))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def mask_of_kind(kind, N, T=T, S=S, seed=1):
    """Masks of the shapes callers use; "full" has rows that see no key."""
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "keypad":  # [B, 1, 1, S], lengths 7 and S
        return jnp.arange(S)[None, None, None, :] < jnp.array([7, S])[:, None, None, None]
    if kind == "full":  # [B, N, T, S] random, rows 3 (batch 0, head 1) and T-1 (all) empty
        m = rng.random((B, N, T, S)) > 0.3
        m[0, 1, 3, :] = False
        m[:, :, T - 1, :] = False
        return jnp.asarray(m)
    if kind == "query":  # [1, 1, T, S] random, shared by batch and heads
        return jnp.asarray(rng.random((1, 1, T, S)) > 0.4)
    raise ValueError(kind)


def out_and_grads(fn, mask, argnums, *, is_causal):
    """``(q, k, v[, bias]) -> (out, grads)`` of a loss that weights every output differently."""

    def loss(q, k, v, bias=None):
        out = fn(q, k, v, mask, bias, is_causal=is_causal, scale=None)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w), out

    def run(*args):
        grads, out = jax.grad(loss, argnums, has_aux=True)(*args)
        return out, grads

    return run


def via_ops(impl):
    """``ops.dot_product_attention`` with ``implementation=impl`` (attention_core's signature)."""
    def fn(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        return ops.dot_product_attention(
            q, k, v, mask, bias, is_causal=is_causal, scale=scale, implementation=impl
        )

    return fn


def check_against_einsum(fn, q, k, v, mask, bias=None, *, is_causal, jit=True, tol=F32_TOL,
                         grad_tol=F32_GRAD_TOL):
    """``fn`` (signature of ops.attention_core) equals the einsum path, values and gradients."""
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    got_fn = out_and_grads(fn, mask, argnums, is_causal=is_causal)
    got, g_got = (jax.jit(got_fn) if jit else got_fn)(*args)
    want, g_want = jax.jit(out_and_grads(ops.attention_core, mask, argnums,
                                         is_causal=is_causal))(*args)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    for name, a, b in zip("qkvb"[: len(argnums)], g_got, g_want, strict=True):
        assert a.dtype == b.dtype, name
        assert np.all(np.isfinite(np.asarray(a, np.float32))), f"d{name} not finite"
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"d{name}", **grad_tol
        )


# --------------------------------------------------------------------------- Hugging Face
# (tests/test_hf_config.py, tests/test_hf_layers.py)

HF_SMALL = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "num_hidden_layers": 4, "max_position_embeddings": 64}


def hf_configs():
    """family -> (config, attention class, rotary class): small transformers configs of
    the families of :data:`attention_jax.hf.FAMILIES`, built in code (nothing downloaded)."""
    import transformers as tf
    from transformers.models.gemma2 import modeling_gemma2 as g2
    from transformers.models.gemma3 import modeling_gemma3 as g3
    from transformers.models.gpt_oss import modeling_gpt_oss as oss
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.olmo2 import modeling_olmo2 as olmo2
    from transformers.models.phi3 import modeling_phi3 as phi3
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    no_head_dim = {k: v for k, v in HF_SMALL.items() if k != "head_dim"}
    return {
        "llama": (tf.LlamaConfig(**HF_SMALL, attention_bias=True, attention_dropout=0.1,
                                 rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16,
                                                  "rope_theta": 500_000.0}),
                  llama.LlamaAttention, llama.LlamaRotaryEmbedding),
        "mistral": (tf.MistralConfig(**HF_SMALL, sliding_window=5,
                                     rope_parameters={"rope_type": "default",
                                                      "rope_theta": 1e6}),
                    mistral.MistralAttention, mistral.MistralRotaryEmbedding),
        "qwen2": (tf.Qwen2Config(**HF_SMALL, use_sliding_window=True, sliding_window=5,
                                 max_window_layers=2,
                                 rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 16,
                                                  "rope_theta": 1e6}),
                  qwen2.Qwen2Attention, qwen2.Qwen2RotaryEmbedding),
        "qwen3": (tf.Qwen3Config(**HF_SMALL, rms_norm_eps=1e-5, use_sliding_window=True,
                                 sliding_window=3, max_window_layers=3,
                                 rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                  "rope_theta": 1e6}),
                  qwen3.Qwen3Attention, qwen3.Qwen3RotaryEmbedding),
        "gemma2": (tf.Gemma2Config(**HF_SMALL, query_pre_attn_scalar=16, sliding_window=4,
                                   attn_logit_softcapping=30.0, attention_bias=True),
                   g2.Gemma2Attention, g2.Gemma2RotaryEmbedding),
        "gemma3": (tf.Gemma3TextConfig(**{**HF_SMALL, "num_hidden_layers": 6},
                                       query_pre_attn_scalar=24, sliding_window=4,
                                       rope_parameters={
                                           "full_attention": {"rope_type": "linear",
                                                              "factor": 8.0,
                                                              "rope_theta": 1e6},
                                           "sliding_attention": {"rope_type": "default",
                                                                 "rope_theta": 1e4}}),
                   g3.Gemma3Attention, g3.Gemma3RotaryEmbedding),
        "phi3": (tf.Phi3Config(**no_head_dim, original_max_position_embeddings=16,
                               sliding_window=6,
                               rope_parameters={"rope_type": "longrope",
                                                "short_factor": [1.0, 1.5],
                                                "long_factor": [2.0, 4.0],
                                                "partial_rotary_factor": 0.5,
                                                "rope_theta": 1e4}),
                 phi3.Phi3Attention, phi3.Phi3RotaryEmbedding),
        # theta and L0 where truncate=False changes YaRN's ramp at head size 8
        "gpt_oss": (tf.GptOssConfig(**{**HF_SMALL, "max_position_embeddings": 256},
                                    sliding_window=4,
                                    rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                     "beta_fast": 32.0, "beta_slow": 1.0,
                                                     "truncate": False,
                                                     "original_max_position_embeddings": 64,
                                                     "rope_theta": 500.0}),
                    oss.GptOssAttention, oss.GptOssRotaryEmbedding),
        "olmo2": (tf.Olmo2Config(**{k: v for k, v in HF_SMALL.items() if k != "head_dim"},
                                 rms_norm_eps=1e-5),
                  olmo2.Olmo2Attention, olmo2.Olmo2RotaryEmbedding),
    }


def _is_static(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@nnx.jit(static_argnums=(1, 4))
def _call(module, method, args, arrays, static):
    return getattr(module, method)(*args, **arrays, **dict(static))


def jitted(module, method: str = "__call__"):
    """``module.method`` under ``nnx.jit``: one compiled program per shape.

    Python scalars, strings and ``None`` in the keyword arguments are static; arrays and
    other pytrees (caches, mask objects) are traced. Eagerly, every operation of a forward
    is its own small XLA program, and at these test shapes compiling them costs about ten
    times one jitted forward (a GQA forward: 0.4 s eager against 0.04 s jitted, cold), so
    the references and setup steps of tests that are not about eager execution use this;
    the tests parametrized over ``jit`` keep their eager case.

    >>> from attention_jax import MultiHeadAttention
    >>> m = MultiHeadAttention(8, 2, rngs=nnx.Rngs(0))
    >>> jitted(m)(jnp.ones((1, 3, 8)), is_causal=True).shape
    (1, 3, 8)
    """
    def call(*args, **kwargs):
        static = tuple(sorted((k, v) for k, v in kwargs.items() if _is_static(v)))
        arrays = {k: v for k, v in kwargs.items() if not _is_static(v)}
        return _call(module, method, args, arrays, static)

    return call


def child_env(*, keep_devices: bool = False) -> dict[str, str]:
    """This session's environment for a child process (CLI, scripts, notebooks, README
    snippets): CPU only, the checkout importable, this session's compilation cache,
    and conftest's cheap-compile XLA flags; the fake device count dropped unless
    ``keep_devices`` (the child then chooses its own, as a user's process would)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "")
    flags = flags if keep_devices else runtime.without_device_count(flags)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
            jax.config.jax_persistent_cache_min_compile_time_secs)
    return env
