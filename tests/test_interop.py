"""attention_jax.interop against PyTorch: outputs, exact round trips, errors, no-torch import."""

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax import interop
from attention_jax.modules import PARAM_AXES
from tests.helpers import jitted

torch = pytest.importorskip("torch")
F = torch.nn.functional

# float32 forward comparisons (ours vs torch on the same weights and inputs).
ATOL_F32 = 1e-5
RTOL_F32 = 1e-5

E, N_HEADS = 8, 2  # torch MHA: embed_dim, num_heads (head_dim 4)
B, T, S = 2, 3, 4

# (kdim, vdim) as given to torch; None means embed_dim (torch's default for both).
KV_DIMS = {
    "packed": (None, None),  # in_proj_weight [3E, E]
    "separate": (6, 5),  # q/k/v_proj_weight
    "k_only": (6, None),  # separate too; vdim defaults to E (not to kdim) in torch
}


def _torch_mha(kv_dims="packed", *, bias=True, batch_first=True, dropout=0.1,
               dtype=torch.float32, seed=0, **kwargs):
    """A torch MHA with every parameter random (torch initialises biases to 0)."""
    kdim, vdim = KV_DIMS[kv_dims]
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(
        E, N_HEADS, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
        batch_first=batch_first, dtype=dtype, **kwargs,
    )
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, 0.5)
    return mha.eval()


def _inputs(dq, dk, dv, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, T, dq), np.float32),
            rng.standard_normal((B, S, dk), np.float32),
            rng.standard_normal((B, S, dv), np.float32))


def _torch_forward(mha, xq, xk, xv, attn_mask=None):
    """torch MHA on ``[B, L, *]`` numpy inputs -> (out [B, T, E], weights [B, N, T, S])."""
    xs = [torch.from_numpy(x) for x in (xq, xk, xv)]
    if not mha.batch_first:
        xs = [x.transpose(0, 1) for x in xs]  # [L, B, *]
    with torch.no_grad():
        out, w = mha(*xs, attn_mask=attn_mask, need_weights=True, average_attn_weights=False)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out.numpy(), w.numpy()


def _widths(mha):
    return mha.embed_dim, mha.kdim, mha.vdim


def _params(module):
    return {n: None if getattr(module, n) is None else np.asarray(getattr(module, n)[...])
            for n in PARAM_AXES}


def _assert_params_equal(a, b):
    pa, pb = _params(a), _params(b)
    for name in PARAM_AXES:
        if pa[name] is None or pb[name] is None:
            assert pa[name] is None and pb[name] is None, name
            continue
        assert pa[name].dtype == pb[name].dtype, name
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def _random_module(*, use_bias=True, param_dtype=jnp.float32, seed=0, random=True, **kwargs):
    """Our module with N(0, 0.5^2) kernels and biases (zeros when not ``random``).

    Built with zero init and filled from numpy: no JAX random op to compile per shape.
    """
    module = aj.MultiHeadAttention(
        kwargs.pop("in_features", E), kwargs.pop("num_heads", N_HEADS), use_bias=use_bias,
        param_dtype=param_dtype, kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0),
        **kwargs,
    )
    rng = np.random.default_rng(seed)
    for name in PARAM_AXES if random else ():
        param = getattr(module, name)
        if param is not None:
            value = rng.normal(0.0, 0.5, param.shape).astype(np.float32)
            param.set_value(jnp.asarray(value, param_dtype))
    return module


# ---------------------------------------------------------------------------
# from_torch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", list(KV_DIMS))
def test_from_torch_forward_matches(kv_dims, bias, batch_first):
    mha = _torch_mha(kv_dims, bias=bias, batch_first=batch_first)
    ours = interop.from_torch(mha)
    xq, xk, xv = _inputs(*_widths(mha))
    want, want_w = _torch_forward(mha, xq, xk, xv)
    got, got_w = ours(xq, xk, xv, return_weights=True)
    assert got.shape == (B, T, E)
    np.testing.assert_allclose(got, want, atol=ATOL_F32, rtol=RTOL_F32)
    np.testing.assert_allclose(got_w, want_w, atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("kv_dims", list(KV_DIMS))
def test_from_torch_records_config(kv_dims):
    mha = _torch_mha(kv_dims, bias=False, dropout=0.25)
    ours = interop.from_torch(mha, dtype=jnp.float32)
    kdim, vdim = KV_DIMS[kv_dims]
    assert (ours.in_features, ours.out_features) == (E, E)
    assert (ours.num_heads, ours.num_kv_heads) == (N_HEADS, N_HEADS)
    assert (ours.head_dim, ours.v_head_dim) == (E // N_HEADS, E // N_HEADS)
    assert ours.in_k_features == (E if kdim is None else kdim)
    assert ours.in_v_features == (E if vdim is None else vdim)
    assert ours.use_bias is False and ours.q_bias is None and ours.o_bias is None
    assert ours.dropout_rate == 0.25
    assert ours.deterministic is True  # the torch module was in eval mode
    assert ours.scale is None and ours.dtype == jnp.float32
    assert ours.q_kernel[...].dtype == jnp.float32


def test_from_torch_training_mode_keeps_dropout_on():
    mha = _torch_mha(dropout=0.5).train()
    ours = interop.from_torch(mha, rngs=nnx.Rngs(3))
    assert ours.deterministic is None
    x = _inputs(E, E, E)[0]
    assert not np.allclose(ours(x), ours(x, deterministic=True))  # dropout active
    assert interop.to_torch(ours).training


def test_from_torch_causal_mask_matches():
    mha = _torch_mha()
    ours = interop.from_torch(mha)
    x = _inputs(E, E, E)[0]
    masked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = masked
    want, want_w = _torch_forward(mha, x, x, x, attn_mask=masked)
    got, got_w = ours(x, is_causal=True, return_weights=True)
    np.testing.assert_allclose(got, want, atol=ATOL_F32, rtol=RTOL_F32)
    np.testing.assert_allclose(got_w, want_w, atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("kv_dims", ["packed", "separate"])
def test_from_torch_module_is_jittable(kv_dims):
    mha = _torch_mha(kv_dims)
    ours = interop.from_torch(mha)
    xq, xk, xv = _inputs(*_widths(mha))

    @nnx.jit
    def apply(module, xq, xk, xv):
        return module(xq, xk, xv)

    want, _ = _torch_forward(mha, xq, xk, xv)
    np.testing.assert_allclose(apply(ours, xq, xk, xv), want, atol=ATOL_F32, rtol=RTOL_F32)


def test_from_torch_param_dtype_and_bfloat16_source():
    mha = _torch_mha(dtype=torch.bfloat16)
    ours = interop.from_torch(mha, param_dtype=jnp.bfloat16)
    assert ours.q_kernel[...].dtype == jnp.bfloat16
    want = mha.in_proj_weight[:E].detach().float().numpy().T.reshape(E, N_HEADS, E // N_HEADS)
    np.testing.assert_array_equal(np.asarray(ours.q_kernel[...], np.float32), want)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(add_bias_kv=True), r"add_bias_kv=True\) is not supported"),
        (dict(add_zero_attn=True), r"add_zero_attn=True\) is not supported"),
    ],
)
def test_from_torch_rejects_unsupported_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.from_torch(_torch_mha(**kwargs))


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.MultiheadAttention"):
        interop.from_torch(torch.nn.Linear(4, 4))


# ---------------------------------------------------------------------------
# Round trips and to_torch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", list(KV_DIMS))
def test_torch_round_trip_is_exact(kv_dims, bias, batch_first, dtype):
    mha = _torch_mha(kv_dims, bias=bias, batch_first=batch_first, dtype=dtype)
    param_dtype = jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32
    back = interop.to_torch(interop.from_torch(mha, param_dtype=param_dtype),
                            batch_first=batch_first)
    want, got = mha.state_dict(), back.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    assert back._qkv_same_embed_dim == mha._qkv_same_embed_dim
    assert (back.batch_first, back.dropout, back.training) == (batch_first, 0.1, False)
    assert (back.kdim, back.vdim) == (mha.kdim, mha.vdim)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", list(KV_DIMS))
def test_ours_round_trip_is_exact(kv_dims, bias, param_dtype):
    kdim, vdim = KV_DIMS[kv_dims]
    ours = _random_module(use_bias=bias, param_dtype=param_dtype, in_k_features=kdim,
                          in_v_features=E if vdim is None else vdim, dropout_rate=0.2,
                          deterministic=True)
    mha = interop.to_torch(ours)
    assert mha._qkv_same_embed_dim == (kv_dims == "packed")
    again = interop.from_torch(mha, param_dtype=param_dtype)
    _assert_params_equal(ours, again)
    for attr in ("in_features", "num_heads", "num_kv_heads", "head_dim", "v_head_dim",
                 "in_k_features", "in_v_features", "out_features", "use_bias",
                 "dropout_rate", "deterministic"):
        assert getattr(again, attr) == getattr(ours, attr), attr


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_dims", list(KV_DIMS))
def test_to_torch_forward_matches(kv_dims, bias, batch_first):
    kdim, vdim = KV_DIMS[kv_dims]
    ours = _random_module(use_bias=bias, in_k_features=kdim,
                          in_v_features=E if vdim is None else vdim)
    mha = interop.to_torch(ours, batch_first=batch_first).eval()
    assert mha.batch_first == batch_first
    xq, xk, xv = _inputs(*_widths(mha), seed=1)
    want, _ = _torch_forward(mha, xq, xk, xv)
    np.testing.assert_allclose(ours(xq, xk, xv), want, atol=ATOL_F32, rtol=RTOL_F32)


def test_to_torch_accepts_explicit_default_scale():
    ours = _random_module(scale=1.0 / math.sqrt(E // N_HEADS))
    assert isinstance(interop.to_torch(ours), torch.nn.MultiheadAttention)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_heads=4, num_kv_heads=2), r"num_kv_heads \(2\) != num_heads \(4\)"),
        (dict(num_heads=4, num_kv_heads=1), r"num_kv_heads \(1\) != num_heads \(4\)"),
        (dict(v_head_dim=3), r"head_dim == v_head_dim; got 4 and 3"),
        (dict(out_features=6), r"out_features == in_features; got 6 and 8"),
        (dict(head_dim=3), r"num_heads \* head_dim == in_features; got 2 \* 3 = 6 and 8"),
        (dict(scale=0.3), r"1/sqrt\(head_dim\) = 0\.5; the module has scale 0\.3"),
    ],
)
def test_to_torch_rejects_unrepresentable(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.to_torch(_random_module(random=False, **kwargs))


# ---------------------------------------------------------------------------
# nn.Linear layout (Hugging Face style), GQA included
# ---------------------------------------------------------------------------

D, H, V, DO = 12, 3, 5, 7  # model width, head dim, value head dim, output width


def _linear_layers(N, K, *, bias, seed=0):
    """Random ``torch.nn.Linear`` q/k/v/o projections of a GQA layer."""
    torch.manual_seed(seed)
    layers = {
        "q": torch.nn.Linear(D, N * H, bias=bias),
        "k": torch.nn.Linear(D, K * H, bias=bias),
        "v": torch.nn.Linear(D, K * V, bias=bias),
        "o": torch.nn.Linear(N * V, DO, bias=bias),
    }
    return {p: (layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
            for p, layer in layers.items()}


def _torch_gqa_reference(x, lin, N, K, *, causal):
    """Hugging Face's eager GQA attention, written out in torch: x [B, T, D] -> [B, T, DO]."""
    b, t, _ = x.shape
    q = F.linear(x, *lin["q"]).view(b, t, N, H).transpose(1, 2)  # [B, N, T, H]
    k = F.linear(x, *lin["k"]).view(b, t, K, H).transpose(1, 2)  # [B, K, T, H]
    v = F.linear(x, *lin["v"]).view(b, t, K, V).transpose(1, 2)  # [B, K, T, V]
    k = k.repeat_interleave(N // K, dim=1)  # [B, N, T, H]: query head n uses kv head n // G
    v = v.repeat_interleave(N // K, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(H)  # [B, N, T, T]
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    out = scores.softmax(-1) @ v  # [B, N, T, V]
    return F.linear(out.transpose(1, 2).reshape(b, t, N * V), *lin["o"])


def _gqa_module(N, K, *, bias):
    """A GQA module to load into; zero parameters, so any value read back was loaded."""
    zeros = nnx.initializers.zeros_init()
    return aj.GroupedQueryAttention(D, N, K, head_dim=H, v_head_dim=V, out_features=DO,
                                    use_bias=bias, kernel_init=zeros, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("source", ["torch", "numpy"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("N", "K"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_load_linear_weights_matches_torch_reference(N, K, bias, source):
    lin = _linear_layers(N, K, bias=bias)
    args = lin if source == "torch" else {
        p: (w.numpy(), None if b is None else b.numpy()) for p, (w, b) in lin.items()}
    module = _gqa_module(N, K, bias=bias)
    assert interop.load_linear_weights(module, *(args[p] for p in "qkvo")) is module
    x = np.random.default_rng(2).standard_normal((B, T, D), np.float32)
    with torch.no_grad():
        want = _torch_gqa_reference(torch.from_numpy(x), lin, N, K, causal=True).numpy()
    np.testing.assert_allclose(jitted(module)(jnp.asarray(x), is_causal=True), want,
                               atol=ATOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("N", "K"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_linear_weights_round_trip_is_exact(N, K, bias):
    lin = _linear_layers(N, K, bias=bias)
    module = interop.load_linear_weights(_gqa_module(N, K, bias=bias), *lin.values())
    out = interop.to_linear_weights(module)
    assert list(out) == ["q", "k", "v", "o"]
    for p, (w, b) in lin.items():
        np.testing.assert_array_equal(out[p][0], w.numpy(), err_msg=p)
        if b is None:
            assert out[p][1] is None
        else:
            np.testing.assert_array_equal(out[p][1], b.numpy(), err_msg=p)
    copy = interop.load_linear_weights(_gqa_module(N, K, bias=bias), **out)
    _assert_params_equal(copy, module)


def test_load_linear_weights_head_major_layout():
    """Row n*H + h of the q weight lands in q_kernel[:, n, h] (and o alike)."""
    N, K = 4, 2
    lin = _linear_layers(N, K, bias=True)
    module = interop.load_linear_weights(_gqa_module(N, K, bias=True), *lin.values())
    wq, bq = lin["q"]
    wo, _ = lin["o"]
    n, h, v = 2, 1, 3
    np.testing.assert_array_equal(module.q_kernel[...][:, n, h], wq[n * H + h].numpy())
    assert module.q_bias[...][n, h] == bq[n * H + h].item()
    np.testing.assert_array_equal(module.o_kernel[...][n, v, :], wo[:, n * V + v].numpy())


def test_load_linear_weights_missing_bias_loads_zeros():
    lin = _linear_layers(4, 2, bias=True)
    module = _random_module(in_features=D, num_heads=4, num_kv_heads=2, head_dim=H,
                            v_head_dim=V, out_features=DO)
    assert np.any(module.o_bias[...] != 0)
    interop.load_linear_weights(module, *(lin[p] for p in "qkv"), (lin["o"][0], None))
    np.testing.assert_array_equal(module.o_bias[...], np.zeros(DO, np.float32))
    np.testing.assert_array_equal(module.q_bias[...].reshape(-1), lin["q"][1].numpy())


@pytest.mark.parametrize(
    ("proj", "part", "bad", "match"),
    [
        ("k", 0, (12, 12), r"k weight has shape \(12, 12\) but the module expects \(6, 12\)"),
        ("v", 0, (10, 11), r"v weight has shape \(10, 11\) but the module expects \(10, 12\)"),
        ("q", 0, (12,), r"q weight has shape \(12,\) but the module expects \(12, 12\)"),
        ("o", 0, (7, 10), r"o weight has shape \(7, 10\) but the module expects \(7, 20\)"),
        ("k", 1, (12,), r"k bias has shape \(12,\) but the module expects \(6,\)"),
        ("o", 1, (20,), r"o bias has shape \(20,\) but the module expects \(7,\)"),
    ],
)
def test_load_linear_weights_rejects_bad_shapes(proj, part, bad, match):
    N, K = 4, 2
    lin = _linear_layers(N, K, bias=True)
    pair = list(lin[proj])
    pair[part] = torch.zeros(bad)
    lin[proj] = tuple(pair)
    module = _gqa_module(N, K, bias=True)
    before = _params(module)
    with pytest.raises(ValueError, match=match):
        interop.load_linear_weights(module, *lin.values())
    for name, value in _params(module).items():  # nothing was written
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_load_linear_weights_rejects_bias_for_biasless_module():
    lin = _linear_layers(4, 2, bias=True)
    module = _gqa_module(4, 2, bias=False)
    with pytest.raises(ValueError, match=r"q bias of shape \(12,\) given, but the module has no"):
        interop.load_linear_weights(module, *lin.values())


# ---------------------------------------------------------------------------
# No torch installed
# ---------------------------------------------------------------------------

_NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    from flax import nnx
    import attention_jax
    import attention_jax.interop as interop

    m = attention_jax.MultiHeadAttention(4, 2, rngs=nnx.Rngs(0))
    interop.load_linear_weights(m, **interop.to_linear_weights(m))  # numpy only: works
    for fn, arg in ((interop.from_torch, None), (interop.to_torch, m)):
        try:
            fn(arg)
        except ImportError as err:
            assert f"interop.{fn.__name__} needs PyTorch" in str(err), err
            assert "pip install torch" in str(err), err
        else:
            raise AssertionError(f"{fn.__name__} did not raise ImportError")
    print("no-torch ok")
    """
)


def test_import_without_torch():
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no-torch ok" in proc.stdout


@pytest.mark.parametrize("source", ["torch", "numpy"])
def test_load_linear_weights_does_not_alias_the_source(source):
    """In-place changes of the source tensors after loading leave the module unchanged
    (``Tensor.numpy()`` shares memory; a bias reshape stays a view of it)."""
    lin = _linear_layers(4, 2, bias=True)
    args = lin if source == "torch" else {
        p: (w.numpy(), b.numpy()) for p, (w, b) in lin.items()}
    module = interop.load_linear_weights(_gqa_module(4, 2, bias=True), *(args[p] for p in "qkvo"))
    loaded = {name: np.array(getattr(module, name)[...]) for name in PARAM_AXES}
    with torch.no_grad():
        for w, b in lin.values():  # the numpy arrays above share these tensors' memory too
            w.mul_(3.0).add_(1.0)
            b.add_(100.0)
    for name, value in loaded.items():
        np.testing.assert_array_equal(np.asarray(getattr(module, name)[...]), value,
                                      err_msg=name)
