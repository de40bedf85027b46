"""Our attention equals PyTorch: forward outputs, returned weights and gradients.

Every test runs the same inputs through a PyTorch reference (float32) and through
``attention_jax`` and compares:

* the output, and the ``[B, N, T, S]`` attention weights where the reference has them;
* the gradients of ``sum(out * g_out) + sum(weights * g_w)`` (random cotangents)
  with respect to the inputs and to every parameter, the torch gradients being mapped
  to our ``[D, N, H]`` / ``[N, V, D]`` layout by ``tests/reference/torch_refs.py``.

References: the seed-article references of ``torch_refs`` (001 split/combine MHA,
003 dk != dv, 004 grouped K/V heads for MHA/GQA/MQA, 000 head-split layout),
``torch.nn.MultiheadAttention`` and ``torch.nn.functional.scaled_dot_product_attention``
(``enable_gqa=True``). Comparisons run under ``jax.jit`` and eagerly (the eager run on
one representative case per test where eager compilation would be slow, see ``VARIANT_JIT``).

Tolerances are module constants: float32 ``F32_TOL``; bfloat16 ``BF16_TOL`` compares
our bfloat16 computation with the float32 reference run on the same bfloat16-rounded
inputs and parameters, so it measures only our rounding inside the computation.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_jax as aj
from attention_jax import ops

torch = pytest.importorskip("torch")
F = torch.nn.functional
refs = pytest.importorskip("tests.reference.torch_refs")

# float32: torch CPU and XLA CPU sum in different orders. Observed max abs error over
# the file is ~1e-6 (outputs, weights, every gradient); 1e-5 leaves room for other BLAS.
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bfloat16 computation (8-bit mantissa, eps 2**-8 = 0.0039) against the float32
# reference on bfloat16-rounded values. Observed: outputs/weights 3.5e-3.
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}
# Gradients in bfloat16 pass through more rounded matmuls. Observed: 2.1e-2.
BF16_GRAD_TOL = {"atol": 5e-2, "rtol": 5e-2}

VARIANTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # name -> (N, K)
B = 2


@pytest.fixture(params=[True, False], ids=["jit", "nojit"])
def jit(request) -> bool:
    return request.param


# (variant, jit) pairs for the tests parametrized over variants: every variant under
# jax.jit, and the eager (no-jit) run for GQA only, the case that exercises the grouping.
# Eager runs compile every primitive separately, which costs seconds per shape here.
VARIANT_JIT = [pytest.param(v, True, id=f"{v}-jit") for v in VARIANTS] + [
    pytest.param("gqa", False, id="gqa-nojit")
]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _t(x: np.ndarray | None, grad: bool = False):
    """numpy -> float32 torch tensor (a leaf that records its gradient when ``grad``)."""
    if x is None:
        return None
    return torch.tensor(np.asarray(x, np.float32), requires_grad=grad)


def _np(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(jnp.asarray(x, jnp.float32))


def _bf16_round(x: np.ndarray | None) -> np.ndarray | None:
    """float32 values that bfloat16 represents exactly (the inputs both sides see)."""
    return None if x is None else np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def _padding_causal(lengths: list[int], T: int, S: int) -> np.ndarray:
    """Numpy ``[B, 1, T, S]``: keys ``< lengths[b]`` and ``s <= t`` (True = attend)."""
    pad = np.arange(S)[None, :] < np.asarray(lengths)[:, None]  # [B, S]
    causal = np.arange(S)[None, :] <= np.arange(T)[:, None]  # [T, S]
    return pad[:, None, None, :] & causal[None, None]


def _module(params: dict[str, np.ndarray | None], **kwargs) -> aj.MultiHeadAttention:
    """Our module with the given parameters (``PARAM_AXES`` names) loaded."""
    module = aj.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
    for name, value in params.items():
        param = getattr(module, name)
        if (value is None) != (param is None):
            raise AssertionError(f"{name}: reference and module disagree on its presence")
        if value is not None:
            assert param.shape == value.shape, (name, param.shape, value.shape)
            param[...] = jnp.asarray(value)
    return module


def _ours(module, xq, xk, xv, *, mask=None, is_causal=False, g_out, g_w, jit):
    """Our output, weights, parameter gradients (dict) and input gradients (q, k, v).

    ``xk`` / ``xv`` may be None (self-attention): the gradient of ``xq`` then sums
    all three paths, as torch's does for a tensor used three times.
    """
    graphdef, state = nnx.split(module)
    g_out, g_w = jnp.asarray(g_out), jnp.asarray(g_w)

    def loss_fn(state, xq, xk, xv):
        y, w = nnx.merge(graphdef, state)(
            xq, xk, xv, mask=mask, is_causal=is_causal, return_weights=True
        )
        loss = jnp.sum(y.astype(jnp.float32) * g_out) + jnp.sum(w * g_w)
        return loss, (y, w)

    fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)
    fn = jax.jit(fn) if jit else fn
    args = [None if x is None else jnp.asarray(x) for x in (xq, xk, xv)]
    (_, (y, w)), (g_state, *g_inputs) = fn(state, *args)
    return y, w, nnx.to_pure_dict(g_state), g_inputs


def _torch_run(fn, inputs, g_out, g_w):
    """Runs ``fn(*tensors) -> (out, weights)``, backprops the same loss as :func:`_ours`.

    Returns ``(out, weights, input grads)`` as numpy (None for None inputs).
    """
    tensors = [_t(x, grad=True) for x in inputs]
    out, weights = fn(*tensors)
    loss = (out * _t(g_out)).sum() + (weights * _t(g_w)).sum()
    loss.backward()
    return _np(out), _np(weights), [None if t is None else _np(t.grad) for t in tensors]


def _present(d: dict) -> dict:
    return {k: _np(v) for k, v in d.items() if v is not None}


def _assert_equal_runs(ours, theirs, *, param_grads_ref, tol=F32_TOL, grad_tol=None):
    """Compares output, weights, input grads and parameter grads (``PARAM_AXES`` names)."""
    grad_tol = tol if grad_tol is None else grad_tol
    y, w, g_params, g_inputs = ours
    ty, tw, tg_inputs = theirs
    chex.assert_trees_all_close(_np(y), ty, **tol)
    chex.assert_trees_all_close(_np(w), tw, **tol)
    chex.assert_trees_all_close([_np(g) for g in g_inputs], tg_inputs, **grad_tol)
    chex.assert_trees_all_close(_present(g_params), _present(param_grads_ref), **grad_tol)


# ---------------------------------------------------------------------------
# Seed references (torch_refs)
# ---------------------------------------------------------------------------

# name -> (T, S, ref kwargs beyond (D=16, N, K), cross-attention, masked). Features are
# combined to keep the file fast: every variant sees dk != dv, cross-attention with other
# key/value widths, bias on and off, padding + causal masks and the returned weights.
GROUPED_CASES = {
    "cross_dk_ne_dv_masks": (
        4, 6, {"head_dim": 6, "v_head_dim": 3, "kdim": 12, "vdim": 10}, True, True
    ),
    "self_no_bias": (5, 5, {"bias": False}, False, False),
}


@pytest.mark.parametrize("case", list(GROUPED_CASES))
@pytest.mark.parametrize(("variant", "jit"), VARIANT_JIT)
def test_grouped_kv_reference(variant, case, jit):
    """Seed 004 (corrected) for MHA/GQA/MQA, with dk != dv, cross-attention, no bias, masks."""
    N, K = VARIANTS[variant]
    T, S, kw, cross, masked = GROUPED_CASES[case]
    D = 16
    torch.manual_seed(0)
    ref = refs.GroupedKVAttention(D, N, K, **kw)
    rng = np.random.default_rng(1)
    xq = _rand(rng, B, T, D)
    xk = _rand(rng, B, S, kw.get("kdim", D)) if cross else None
    xv = _rand(rng, B, S, kw.get("vdim", kw.get("kdim", D))) if cross else None
    lengths = [S, 3]
    mask_np = _padding_causal(lengths, T, S) if masked else None
    g_out, g_w = _rand(rng, B, T, D), _rand(rng, B, N, T, S)

    theirs = _torch_run(
        lambda q, k, v: ref(q, k, v, mask=_t(mask_np)), (xq, xk, xv), g_out, g_w
    )
    module = _module(
        refs.params_from_ref(ref), in_features=D, num_heads=N, num_kv_heads=K,
        head_dim=ref.head_dim, v_head_dim=ref.v_head_dim, in_k_features=kw.get("kdim"),
        in_v_features=kw.get("vdim"), use_bias=kw.get("bias", True),
    )
    # Ours builds the same mask from attention_jax.masks + is_causal.
    mask = aj.padding_mask(jnp.asarray(lengths), S) if masked else None
    ours = _ours(module, xq, xk, xv, mask=mask, is_causal=masked, g_out=g_out, g_w=g_w, jit=jit)
    _assert_equal_runs(ours, theirs, param_grads_ref=refs.grads_from_ref(ref))


@pytest.mark.parametrize(
    "case", [("self_bias", False, True, False), ("cross_no_bias_masks", True, False, True)],
    ids=lambda c: c[0],
)
def test_split_combine_reference(case, jit):
    """Seed 001: split/combine heads, (B, 1, T, S) mask with 0 blocked, returned weights."""
    _, cross, bias, masked = case
    D, N, T = 16, 4, 4
    S, Dk, Dv = (6, 12, 10) if cross else (T, D, D)
    torch.manual_seed(0)
    ref = refs.SplitCombineMHA(D, N, kdim=Dk, vdim=Dv, bias=bias)
    rng = np.random.default_rng(2)
    xq, xk, xv = _rand(rng, B, T, D), _rand(rng, B, S, Dk), _rand(rng, B, S, Dv)
    if not cross:
        xk = xv = None
    mask = _padding_causal([S, 2], T, S) if masked else None
    g_out, g_w = _rand(rng, B, T, D), _rand(rng, B, N, T, S)

    theirs = _torch_run(lambda q, k, v: ref(q, k, v, mask=_t(mask)), (xq, xk, xv), g_out, g_w)
    module = _module(refs.params_from_ref(ref), in_features=D, num_heads=N, in_k_features=Dk,
                     in_v_features=Dv, use_bias=bias)
    ours = _ours(module, xq, xk, xv, mask=None if mask is None else jnp.asarray(mask),
                 g_out=g_out, g_w=g_w, jit=jit)
    _assert_equal_runs(ours, theirs, param_grads_ref=refs.grads_from_ref(ref))


@pytest.mark.parametrize("bias", [False], ids=["no_bias"])  # with bias: grouped cross case
def test_dk_dv_reference(bias, jit):
    """Seed 003: q/k to dk * heads, v to dv * heads (dk != dv != D / N), masked."""
    D, dk, dv, N, T = 8, 6, 3, 4, 5
    torch.manual_seed(0)
    ref = refs.DkDvAttention(D, dk, dv, N, bias=bias)
    rng = np.random.default_rng(3)
    x = _rand(rng, B, T, D)
    mask = _padding_causal([T, 4], T, T)
    g_out, g_w = _rand(rng, B, T, D), _rand(rng, B, N, T, T)

    theirs = _torch_run(lambda q: ref(q, mask=_t(mask)), (x,), g_out, g_w)
    module = _module(refs.params_from_ref(ref), in_features=D, num_heads=N, head_dim=dk,
                     v_head_dim=dv, use_bias=bias)
    y, w, g_params, (gx, _, _) = _ours(module, x, None, None, mask=jnp.asarray(mask),
                                       g_out=g_out, g_w=g_w, jit=jit)
    _assert_equal_runs((y, w, g_params, [gx]), theirs, param_grads_ref=refs.grads_from_ref(ref))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross_masks"])
def test_head_split_reference(cross, jit):
    """Seed 000 layout via block-diagonal kernels, scale 1/sqrt(E), fc_out bias."""
    E, N, T = 16, 4, 4
    S = 6 if cross else T
    torch.manual_seed(0)
    ref = refs.HeadSplitMHA(E, N)
    rng = np.random.default_rng(4)
    xq = _rand(rng, B, T, E)
    xk, xv = (_rand(rng, B, S, E), _rand(rng, B, S, E)) if cross else (None, None)
    mask = _padding_causal([S, 3], T, S) if cross else None
    g_out, g_w = _rand(rng, B, T, E), _rand(rng, B, N, T, S)

    theirs = _torch_run(lambda q, k, v: ref(q, k, v, mask=_t(mask)), (xq, xk, xv), g_out, g_w)
    params = refs.head_split_to_params(ref)
    module = _module(params, in_features=E, num_heads=N, scale=1.0 / math.sqrt(E))
    y, w, g_params, g_inputs = _ours(
        module, xq, xk, xv, mask=None if mask is None else jnp.asarray(mask),
        g_out=g_out, g_w=g_w, jit=jit,
    )
    ty, tw, tg_inputs = theirs
    chex.assert_trees_all_close(_np(y), ty, **F32_TOL)
    chex.assert_trees_all_close(_np(w), tw, **F32_TOL)
    chex.assert_trees_all_close([_np(g) for g in g_inputs], tg_inputs, **F32_TOL)
    # Gradients of the reference's parameters: the diagonal blocks and fc_out.
    # (Off-diagonal blocks and q/k/v biases are ours only; nothing to compare them to.)
    block = refs.head_split_block_mask(E, N)
    ref_grads = refs.head_split_grads(ref)
    for name in ("q_kernel", "k_kernel", "v_kernel"):
        chex.assert_trees_all_close(_np(g_params[name])[block], ref_grads[name][block],
                                    **F32_TOL)
    chex.assert_trees_all_close(
        {n: _np(g_params[n]) for n in ("o_kernel", "o_bias")},
        {n: ref_grads[n] for n in ("o_kernel", "o_bias")}, **F32_TOL,
    )


# ---------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------

# name -> (batch_first, kdim, vdim, bias, key_padding_mask, attn_mask)
TORCH_MHA_CASES = {
    "batch_first_bias_padding": (True, None, None, True, True, False),
    "seq_first_kdim_vdim_no_bias_causal": (False, 12, 10, False, False, True),
    "batch_first_kdim_vdim_both_masks": (True, 12, 10, True, True, True),
}


@pytest.mark.parametrize("case", list(TORCH_MHA_CASES))
def test_torch_multihead_attention(case, jit):
    """``torch.nn.MultiheadAttention`` (need_weights, average_attn_weights=False)."""
    batch_first, kdim, vdim, bias, use_kpm, use_attn = TORCH_MHA_CASES[case]
    E, N, T, S = 16, 4, 4, 6
    Dk = E if kdim is None else kdim
    Dv = Dk if vdim is None else vdim
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, N, bias=bias, kdim=kdim, vdim=vdim,
                                      batch_first=batch_first)
    rng = np.random.default_rng(5)
    xq, xk, xv = _rand(rng, B, T, E), _rand(rng, B, S, Dk), _rand(rng, B, S, Dv)
    kpm = torch.tensor(np.arange(S)[None, :] >= np.array([[S], [2]])) if use_kpm else None
    attn = torch.triu(torch.ones(T, S, dtype=torch.bool), diagonal=1) if use_attn else None
    g_out, g_w = _rand(rng, B, T, E), _rand(rng, B, N, T, S)

    def run(q, k, v):
        if not batch_first:  # torch wants [L, B, E]; the loss is computed batch-first
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out, weights = mha(q, k, v, key_padding_mask=kpm, attn_mask=attn,
                           need_weights=True, average_attn_weights=False)
        return (out if batch_first else out.transpose(0, 1)), weights

    theirs = _torch_run(run, (xq, xk, xv), g_out, g_w)
    module = _module(refs.params_from_torch_mha(mha), in_features=E, num_heads=N,
                     in_k_features=Dk, in_v_features=Dv, use_bias=bias)
    mask = refs.mask_from_torch_mha(kpm, attn)
    ours = _ours(module, xq, xk, xv, mask=None if mask is None else jnp.asarray(mask),
                 g_out=g_out, g_w=g_w, jit=jit)
    _assert_equal_runs(ours, theirs, param_grads_ref=refs.grads_from_torch_mha(mha))


# ---------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention against ops.dot_product_attention
# ---------------------------------------------------------------------------


def _sdpa(q, k, v, g, *, mask=None, is_causal=False, scale=None):
    """torch SDPA (``enable_gqa``) on our ``[B, L, heads, dim]`` layout; out and q/k/v grads."""
    tq, tk, tv = (_t(np.swapaxes(x, 1, 2), grad=True) for x in (q, k, v))  # [B, heads, L, dim]
    out = F.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=None if mask is None else torch.tensor(mask),
        is_causal=is_causal, scale=scale, enable_gqa=True,
    )
    out.backward(_t(np.swapaxes(g, 1, 2)))
    return [np.swapaxes(_np(x), 1, 2) for x in (out, tq.grad, tk.grad, tv.grad)]


def _ops_value_and_vjp(q, k, v, g, mask, *, is_causal, scale):
    """``ops.dot_product_attention`` output and its q/k/v gradients for cotangent ``g``."""

    def f(q, k, v):
        return ops.dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)

    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(g.astype(out.dtype)))


# One compiled program per shape, shared by every test that uses the shape.
_ops_value_and_vjp_jit = jax.jit(_ops_value_and_vjp, static_argnames=("is_causal", "scale"))


def _ours_ops(q, k, v, g, *, mask=None, is_causal=False, scale=None, jit=True, dtype=None):
    """Numpy ``[out, dq, dk, dv]`` of ``ops.dot_product_attention`` (``dtype`` for q/k/v/g)."""
    fn = _ops_value_and_vjp_jit if jit else _ops_value_and_vjp
    args = [jnp.asarray(x, dtype) for x in (q, k, v, g)]
    mask = None if mask is None else jnp.asarray(mask)
    return [_np(x) for x in fn(*args, mask, is_causal=is_causal, scale=scale)]


# name -> (T, S, H, V, is_causal, masked, scale)
SDPA_CASES = {
    "causal_t_ne_s_v_ne_h": (4, 6, 8, 5, True, False, None),
    "bool_mask_custom_scale": (5, 6, 4, 6, False, True, 0.3),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize(("variant", "jit"), VARIANT_JIT)
def test_sdpa(variant, case, jit):
    """``F.scaled_dot_product_attention(enable_gqa=True)``: forward and grads of q, k, v."""
    N, K = VARIANTS[variant]
    T, S, H, V, is_causal, masked, scale = SDPA_CASES[case]
    rng = np.random.default_rng(6)
    q, k, v = _rand(rng, B, T, N, H), _rand(rng, B, S, K, H), _rand(rng, B, S, K, V)
    g = _rand(rng, B, T, N, V)
    # A per-head [B, N, T, S] mask (each row keeps at least one key).
    mask = rng.random((B, N, T, S)) < 0.6 if masked else None
    if masked:
        mask[..., 0] = True
    kw = {"mask": mask, "is_causal": is_causal, "scale": scale}
    chex.assert_trees_all_close(_ours_ops(q, k, v, g, jit=jit, **kw), _sdpa(q, k, v, g, **kw),
                                **F32_TOL)


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 2), t=st.integers(1, 5), s=st.integers(1, 5), k_heads=st.integers(1, 3),
    groups=st.integers(1, 3), h=st.integers(1, 8), v_dim=st.integers(1, 6),
    is_causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sdpa_shapes_hypothesis(b, t, s, k_heads, groups, h, v_dim, is_causal, seed):
    """Random shapes (B, T, S, N = K * G, K, H, V), causal or not: ops equals SDPA."""
    rng = np.random.default_rng(seed)
    n = k_heads * groups
    q, k, v = _rand(rng, b, t, n, h), _rand(rng, b, s, k_heads, h), _rand(rng, b, s, k_heads, v_dim)
    g = _rand(rng, b, t, n, v_dim)
    chex.assert_trees_all_close(_ours_ops(q, k, v, g, is_causal=is_causal),
                                _sdpa(q, k, v, g, is_causal=is_causal), **F32_TOL)


# ---------------------------------------------------------------------------
# Edge cases: fully masked rows, bfloat16, large logits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "jit"), VARIANT_JIT)
def test_fully_masked_row_is_zero_with_finite_grads(variant, jit):
    """A query that sees no key: zeros forward (no NaN), finite gradients; equals SDPA."""
    N, K = VARIANTS[variant]
    T, S, H = 4, 5, 8
    rng = np.random.default_rng(7)
    q, k, v = _rand(rng, B, T, N, H), _rand(rng, B, S, K, H), _rand(rng, B, S, K, H)
    g = _rand(rng, B, T, N, H)
    mask = np.ones((B, 1, T, S), bool)
    mask[0, :, 1] = False  # batch 0, query 1 sees nothing
    mask[1, :, :, 2:] = False  # batch 1 sees keys 0, 1 only
    out, gq, gk, gv = ours = _ours_ops(q, k, v, g, mask=mask, jit=jit)
    np.testing.assert_array_equal(out[0, 1], np.zeros((N, H), np.float32))
    np.testing.assert_array_equal(gq[0, 1], np.zeros((N, H), np.float32))
    assert all(np.isfinite(x).all() for x in ours)
    chex.assert_trees_all_close(ours, _sdpa(q, k, v, g, mask=mask), **F32_TOL)


@pytest.mark.parametrize("variant", ["gqa"])
def test_module_padded_query_rows(variant, jit):
    """Module with padded queries (q_lengths): those rows are exactly o_bias; grads finite."""
    N, K = VARIANTS[variant]
    D, T = 16, 5
    module = aj.MultiHeadAttention(D, N, num_kv_heads=K, bias_init=nnx.initializers.normal(1.0),
                                   rngs=nnx.Rngs(3))
    rng = np.random.default_rng(8)
    x = _rand(rng, B, T, D)
    mask = aj.padding_mask(jnp.array([T, 3]), T, q_lengths=jnp.array([T, 3]), q_len=T)
    y, w, g_params, (gx, _, _) = _ours(module, x, None, None, mask=mask, g_out=_rand(rng, B, T, D),
                                       g_w=_rand(rng, B, N, T, T), jit=jit)
    o_bias = np.broadcast_to(_np(module.o_bias[...]), (2, D))
    np.testing.assert_allclose(_np(y)[1, 3:], o_bias, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(_np(w)[1, :, 3:], 0.0)
    leaves = [gx, *jax.tree.leaves(g_params)]
    assert all(np.isfinite(_np(x)).all() for x in leaves)


@pytest.mark.parametrize("variant", ["gqa"])
def test_grouped_kv_reference_bf16(variant):
    """Our bfloat16 module (jitted) vs the float32 seed-004 reference on bf16-rounded values."""
    N, K = VARIANTS[variant]
    D, T, S = 16, 4, 6
    torch.manual_seed(0)
    ref = refs.GroupedKVAttention(D, N, K, kdim=12)
    rounded = {n: _bf16_round(p) for n, p in refs.params_from_ref(ref).items()}
    refs.load_ref(ref, rounded)
    rng = np.random.default_rng(9)
    xq, xk = _bf16_round(_rand(rng, B, T, D)), _bf16_round(_rand(rng, B, S, 12))
    mask_np = _padding_causal([S, 3], T, S)
    g_out, g_w = _rand(rng, B, T, D), _rand(rng, B, N, T, S)

    theirs = _torch_run(lambda q, k: ref(q, k, mask=_t(mask_np)), (xq, xk), g_out, g_w)
    module = _module(rounded, in_features=D, num_heads=N, num_kv_heads=K, in_k_features=12,
                     dtype=jnp.bfloat16)
    y, w, g_params, (gq, gk, _) = _ours(
        module, jnp.asarray(xq, jnp.bfloat16), jnp.asarray(xk, jnp.bfloat16), None,
        mask=jnp.asarray(mask_np), g_out=g_out, g_w=g_w, jit=True,
    )
    assert y.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    _assert_equal_runs((y, w, g_params, [gq, gk]), theirs,
                       param_grads_ref=refs.grads_from_ref(ref), tol=BF16_TOL,
                       grad_tol=BF16_GRAD_TOL)


@pytest.mark.parametrize(("variant", "jit"), VARIANT_JIT)
def test_large_logits_bf16(variant, jit):
    """q, k scaled by 100 in bfloat16: finite and close to float32 SDPA on the same values."""
    N, K = VARIANTS[variant]
    T, S, H = 4, 6, 8
    rng = np.random.default_rng(10)
    q = _bf16_round(_rand(rng, B, T, N, H, scale=100.0))
    k = _bf16_round(_rand(rng, B, S, K, H, scale=100.0))
    v = _bf16_round(_rand(rng, B, S, K, H))
    g = _bf16_round(_rand(rng, B, T, N, H))
    ours = _ours_ops(q, k, v, g, is_causal=True, jit=jit, dtype=jnp.bfloat16)
    assert all(np.isfinite(x).all() for x in ours)
    out, gq, gk, gv = _sdpa(q, k, v, g, is_causal=True)
    # Saturated softmax: the output is (nearly) one value row; q/k gradients are ~0 times
    # huge logits, so they are compared with an absolute tolerance scaled to their size.
    chex.assert_trees_all_close(ours[0], out, **BF16_TOL)
    chex.assert_trees_all_close(ours[3], gv, **BF16_GRAD_TOL)
    for ours_g, ref_g in ((ours[1], gq), (ours[2], gk)):
        np.testing.assert_allclose(ours_g, ref_g, rtol=0,
                                   atol=BF16_GRAD_TOL["atol"] * max(1.0, np.abs(ref_g).max()))
