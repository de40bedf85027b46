"""Weights in and out of PyTorch.

Two layouts are understood:

* ``torch.nn.MultiheadAttention``: :func:`from_torch` / :func:`to_torch`, both
  ways exact (the same bits, not just close numbers).
* ``torch.nn.Linear`` projections ``[out, in]``, as Hugging Face attention layers
  keep them (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, or BERT's
  ``query`` / ``key`` / ``value`` and the output ``dense``), GQA included:
  :func:`load_linear_weights` / :func:`to_linear_weights`.

The map between the layouts is a transpose and a reshape, head-major like
torch: row ``n * H + h`` of a ``[N * H, D]`` Linear weight is head ``n``, dim ``h``::

    q_kernel [D, N, H]   = q_weight [N*H, D].T.reshape(D, N, H)
    k_kernel [Dk, K, H]  = k_weight [K*H, Dk].T.reshape(Dk, K, H)
    v_kernel [Dv, K, V]  = v_weight [K*V, Dv].T.reshape(Dv, K, V)
    o_kernel [N, V, Do]  = o_weight [Do, N*V].T.reshape(N, V, Do)
    q_bias [N, H] = q_bias [N*H].reshape(N, H)      (k_bias, v_bias alike; o_bias as is)

torch is imported inside the functions that need it, so this module imports
without torch; :func:`load_linear_weights` also takes numpy arrays and works
without torch. Usage::

    import torch
    from flax import nnx
    import attention_jax as aj
    from attention_jax import interop

    mha = interop.from_torch(torch.nn.MultiheadAttention(64, 8, batch_first=True))
    back = interop.to_torch(mha)                      # same state_dict as the original

    layer = hf_model.model.layers[0].self_attn         # e.g. a Llama / Qwen2 layer
    ours = aj.GroupedQueryAttention(2048, 32, 8, use_bias=False, rngs=nnx.Rngs(0))
    interop.load_linear_weights(
        ours, *[(p.weight, p.bias) for p in (layer.q_proj, layer.k_proj, layer.v_proj,
                                             layer.o_proj)])

The Linear layout round trip, with numpy arrays (GQA: N=4, K=2, H=8, D=32):

>>> import numpy as np
>>> from flax import nnx
>>> from attention_jax import GroupedQueryAttention
>>> m = GroupedQueryAttention(32, 4, 2, rngs=nnx.Rngs(0))
>>> w = to_linear_weights(m)                      # {"q": (weight, bias), "k": ..., ...}
>>> w["q"][0].shape, w["k"][0].shape, w["o"][0].shape    # [N*H, D], [K*H, D], [Do, N*V]
((32, 32), (16, 32), (32, 32))
>>> m2 = GroupedQueryAttention(32, 4, 2, rngs=nnx.Rngs(1))
>>> _ = load_linear_weights(m2, **w)
>>> bool(np.array_equal(m2.k_kernel[...], m.k_kernel[...]))
True
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import ops
from attention_jax.modules import PARAM_AXES, MultiHeadAttention

# Projection names, in the argument order of :func:`load_linear_weights`.
PROJECTIONS = ("q", "k", "v", "o")

Pair = tuple[Any, Any]  # (weight [out, in], bias [out] or None): torch tensors or arrays


def _import_torch(caller: str):
    """``import torch``, or an ImportError that says what needs it."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"attention_jax.interop.{caller} needs PyTorch, which could not be imported "
            "(install it with `pip install torch`); the rest of attention_jax works "
            "without it"
        ) from err
    return torch


# ---------------------------------------------------------------------------
# Layout maps (numpy, no torch)
# ---------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """A torch tensor, jax array or array-like as a numpy array of its own, bits unchanged.

    Always a copy: ``Tensor.numpy()`` shares the tensor's memory and ``jnp.asarray``
    of a numpy array may too (zero-copy on CPU), so without it a later in-place
    change of the torch tensor would change the loaded module.
    """
    if hasattr(x, "detach"):  # a torch tensor; duck-typed so that torch is not imported
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen (exactly)
            x = x.float()
        return np.array(x.numpy(), copy=True)
    return np.array(x, copy=True)


def _linear_shape(kernel_shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    """The ``[out, in]`` Linear shape of a kernel whose first ``n_in`` axes are fan-in."""
    return math.prod(kernel_shape[n_in:]), math.prod(kernel_shape[:n_in])


def _kernel_name(proj: str) -> str:
    return f"{proj}_kernel"


def _bias_name(proj: str) -> str:
    return f"{proj}_bias"


def expected_linear_shapes(
    module: MultiHeadAttention,
) -> dict[str, tuple[tuple[int, int], tuple[int, ...]]]:
    """The Linear-layout shapes ``module`` takes, ``name -> (weight, bias)``.

    ``q: ([N*H, D], [N*H])``, ``k: ([K*H, Dk], [K*H])``, ``v: ([K*V, Dv], [K*V])``,
    ``o: ([Do, N*V], [Do])``.
    """
    shapes = {}
    for proj in PROJECTIONS:
        name = _kernel_name(proj)
        kernel_shape = tuple(getattr(module, name).shape)
        w_shape = _linear_shape(kernel_shape, PARAM_AXES[name].fan_in_axes)
        shapes[proj] = (w_shape, (w_shape[0],))
    return shapes


def _check_shape(what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{what} has shape {tuple(shape)} but the module expects {tuple(expected)}"
        )


# ---------------------------------------------------------------------------
# nn.Linear layout
# ---------------------------------------------------------------------------


def load_linear_weights(
    module: MultiHeadAttention, q: Pair, k: Pair, v: Pair, o: Pair
) -> MultiHeadAttention:
    """Loads ``torch.nn.Linear``-layout projections into ``module``, in place.

    Each argument is a ``(weight, bias)`` pair of torch tensors or arrays, the
    weight in Linear layout ``[out, in]``:

    ===  ===============  ========
    arg  weight           bias
    ===  ===============  ========
    q    ``[N*H, D]``     ``[N*H]``
    k    ``[K*H, Dk]``    ``[K*H]``
    v    ``[K*V, Dv]``    ``[K*V]``
    o    ``[Do, N*V]``    ``[Do]``
    ===  ===============  ========

    Row ``n * H + h`` is head ``n``, dim ``h`` (as in Hugging Face's
    ``view(B, T, heads, head_dim)``); for GQA the k / v weights have ``K * H``
    rows. Values are cast to each parameter's dtype.

    Bias rule: a bias of ``None`` for a module with biases loads zeros (which is
    what a Linear without bias computes: Qwen2, for instance, has q/k/v biases
    but none on ``o_proj``); a bias given to a module built with
    ``use_bias=False`` is an error, since it would be dropped.

    Args:
      module: the :class:`~attention_jax.MultiHeadAttention` to fill.
      q, k, v, o: ``(weight, bias_or_None)`` for the query, key, value and
        output projections.

    Returns:
      ``module``, its parameters replaced.

    Raises:
      ValueError: naming the tensor, its shape and the expected shape; or a
        bias given to a module without biases. Nothing is changed then.
    """
    shapes = expected_linear_shapes(module)
    new: dict[str, np.ndarray | None] = {}
    for proj, (weight, bias) in zip(PROJECTIONS, (q, k, v, o), strict=True):
        (w_shape, b_shape) = shapes[proj]
        kname, bname = _kernel_name(proj), _bias_name(proj)
        w = _to_numpy(weight)
        _check_shape(f"{proj} weight", w.shape, w_shape)
        kernel_shape = tuple(getattr(module, kname).shape)
        new[kname] = w.T.reshape(kernel_shape)  # [in, out] -> kernel
        param = getattr(module, bname)
        if bias is None:
            new[bname] = None if param is None else np.zeros(param.shape, np.float32)
            continue
        b = _to_numpy(bias)
        if param is None:
            raise ValueError(
                f"{proj} bias of shape {tuple(b.shape)} given, but the module has no {proj} "
                f"bias (its config has {proj}_bias off); build it with that bias or pass None"
            )
        _check_shape(f"{proj} bias", b.shape, b_shape)
        new[bname] = b.reshape(param.shape)
    for name, value in new.items():  # all checks passed: now write
        if value is not None:
            param = getattr(module, name)
            param.set_value(jnp.asarray(value, dtype=param.dtype))
    return module


def to_linear_weights(
    module: MultiHeadAttention,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The inverse of :func:`load_linear_weights`: numpy arrays in Linear layout.

    Returns:
      ``{"q": (w [N*H, D], b [N*H]), "k": (w [K*H, Dk], b [K*H]), ...}`` and
      ``"v": (w [K*V, Dv], b [K*V]), "o": (w [Do, N*V], b [Do])``, biases ``None``
      when the module has none; ``load_linear_weights(m, **to_linear_weights(m2))``
      copies ``m2`` into ``m``.
    """
    shapes = expected_linear_shapes(module)
    out = {}
    for proj in PROJECTIONS:
        w_shape, b_shape = shapes[proj]
        kernel = np.asarray(getattr(module, _kernel_name(proj))[...])
        weight = kernel.reshape(w_shape[::-1]).T  # kernel -> [in, out] -> [out, in]
        bias = getattr(module, _bias_name(proj))
        out[proj] = (weight, None if bias is None else np.asarray(bias[...]).reshape(b_shape))
    return out


# ---------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------


def from_torch(
    mha: Any,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> MultiHeadAttention:
    """A :class:`~attention_jax.MultiHeadAttention` equal to a torch one.

    Maps ``embed_dim -> in_features = out_features``, ``num_heads``,
    ``head_dim = embed_dim // num_heads``, ``kdim -> in_k_features``,
    ``vdim -> in_v_features``, ``bias -> use_bias``, ``dropout -> dropout_rate``
    and ``training=False -> deterministic=True``. The packed ``in_proj_weight
    [3E, E]`` and the separate ``q/k/v_proj_weight`` (when kdim or vdim differ
    from embed_dim) are both read. ``batch_first`` only changes torch's call
    layout (ours is always ``[B, T, D]``), so it is not recorded.

    Args:
      mha: a ``torch.nn.MultiheadAttention``.
      rngs: ``nnx.Rngs`` for the module (its dropout stream); default
        ``nnx.Rngs(0)``.
      dtype: the module's computation dtype.
      param_dtype: the parameters' dtype; torch's values are cast to it.

    Raises:
      TypeError: ``mha`` is not a ``torch.nn.MultiheadAttention``.
      ValueError: ``add_bias_kv=True`` or ``add_zero_attn=True``, which have no
        counterpart here.
      ImportError: torch cannot be imported.
    """
    torch = _import_torch("from_torch")
    if not isinstance(mha, torch.nn.MultiheadAttention):
        raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention; got {type(mha)}")
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError(
            "torch.nn.MultiheadAttention(add_bias_kv=True) is not supported: bias_k / bias_v "
            "append a learned key/value token that MultiHeadAttention has no parameter for"
        )
    if mha.add_zero_attn:
        raise ValueError(
            "torch.nn.MultiheadAttention(add_zero_attn=True) is not supported: it appends a "
            "zero key/value token that MultiHeadAttention does not have"
        )
    E, N = mha.embed_dim, mha.num_heads
    use_bias = mha.in_proj_bias is not None
    module = MultiHeadAttention(
        E, N,
        head_dim=mha.head_dim,
        in_k_features=mha.kdim,
        in_v_features=mha.vdim,
        use_bias=use_bias,
        dropout_rate=float(mha.dropout),
        dtype=dtype,
        param_dtype=param_dtype,
        deterministic=None if mha.training else True,
        kernel_init=nnx.initializers.zeros_init(),  # overwritten below: skip the random init
        rngs=nnx.Rngs(0) if rngs is None else rngs,
    )
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)  # [3E, E] -> 3 x [E, E]
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight  # [E, D|Dk|Dv]
    bq, bk, bv = mha.in_proj_bias.chunk(3) if use_bias else (None, None, None)
    return load_linear_weights(
        module, (wq, bq), (wk, bk), (wv, bv), (mha.out_proj.weight, mha.out_proj.bias)
    )


def check_torch_representable(module: MultiHeadAttention) -> None:
    """Raises ValueError, naming the numbers, if torch MHA cannot hold ``module``.

    ``torch.nn.MultiheadAttention`` has one head count for queries, keys and
    values, one head size ``embed_dim // num_heads``, output width = input
    width and the scale ``1/sqrt(head_dim)``.
    """
    cfg = module.config
    N, K, H, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
    D, Do = cfg.in_features, cfg.out_features
    biases = {f"{p}_bias": cfg.has_bias(p) for p in PROJECTIONS}
    if len(set(biases.values())) > 1:
        raise ValueError(
            "torch.nn.MultiheadAttention has biases on all four projections or none; the "
            f"module has {biases}"
        )
    if K != N:
        raise ValueError(
            f"torch.nn.MultiheadAttention has no grouped-query attention: num_kv_heads ({K}) "
            f"!= num_heads ({N}); repeat each key/value head {N // K} times to get an "
            "equivalent MHA first"
        )
    if H != V:
        raise ValueError(
            f"torch.nn.MultiheadAttention needs head_dim == v_head_dim; got {H} and {V}"
        )
    if Do != D:
        raise ValueError(
            f"torch.nn.MultiheadAttention needs out_features == in_features; got {Do} and {D}"
        )
    if N * H != D:
        raise ValueError(
            "torch.nn.MultiheadAttention needs num_heads * head_dim == in_features; got "
            f"{N} * {H} = {N * H} and {D}"
        )
    if cfg.scale is not None and not math.isclose(cfg.scale, ops.default_scale(H), rel_tol=1e-6):
        raise ValueError(
            f"torch.nn.MultiheadAttention uses the scale 1/sqrt(head_dim) = "
            f"{ops.default_scale(H):.6g}; the module has scale {cfg.scale}"
        )
    if cfg.rope is not None:
        raise ValueError(
            f"torch.nn.MultiheadAttention has no rotary embeddings; the module has "
            f"rope={cfg.rope}"
        )


def _torch_tensor(torch, x: np.ndarray):
    """numpy (bfloat16 included) -> a torch tensor, same values and dtype, owning its memory."""
    if x.dtype == jnp.bfloat16:
        x = x.astype(np.float32)  # torch.from_numpy has no bfloat16; the cast back is exact
        return torch.from_numpy(x).to(torch.bfloat16)
    return torch.from_numpy(np.array(x))  # a writable copy


def to_torch(module: MultiHeadAttention, *, batch_first: bool = True):
    """The ``torch.nn.MultiheadAttention`` equal to ``module`` (the inverse of :func:`from_torch`).

    Uses the packed ``in_proj_weight`` when ``in_k_features == in_v_features ==
    in_features`` (torch itself decides this from kdim / vdim), separate
    ``q/k/v_proj_weight`` otherwise. The torch module takes the dtype of
    ``q_kernel``; it is in eval mode when ``module.deterministic`` is True, in
    training mode (torch's default) otherwise. The computation ``dtype`` and
    ``implementation`` have no torch counterpart and are not carried.

    Args:
      module: an MHA (``num_kv_heads == num_heads``) with torch's shapes, see
        :func:`check_torch_representable`.
      batch_first: the torch module's call layout, ``[B, T, E]`` if True else
        ``[T, B, E]``.

    Raises:
      ValueError: the module is not representable (GQA / MQA, ``v_head_dim !=
        head_dim``, ``out_features != in_features``, ``num_heads * head_dim !=
        in_features``, a non-default scale); the message names the numbers.
      ImportError: torch cannot be imported.
    """
    torch = _import_torch("to_torch")
    check_torch_representable(module)
    lin = {p: (_torch_tensor(torch, w), None if b is None else _torch_tensor(torch, b))
           for p, (w, b) in to_linear_weights(module).items()}
    cfg = module.config
    mha = torch.nn.MultiheadAttention(
        cfg.in_features, cfg.num_heads,
        dropout=cfg.dropout_rate,
        bias=cfg.has_bias("q"),
        kdim=cfg.in_k_features,
        vdim=cfg.in_v_features,
        batch_first=batch_first,
        dtype=lin["q"][0].dtype,
    )
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (lin[p] for p in PROJECTIONS)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([wq, wk, wv]))  # [3E, E]
        else:
            mha.q_proj_weight.copy_(wq)  # [E, D]
            mha.k_proj_weight.copy_(wk)  # [E, Dk]
            mha.v_proj_weight.copy_(wv)  # [E, Dv]
        mha.out_proj.weight.copy_(wo)  # [E, E]
        if cfg.has_bias("q"):
            mha.in_proj_bias.copy_(torch.cat([bq, bk, bv]))  # [3E]
            mha.out_proj.bias.copy_(bo)  # [E]
    mha.train(module.deterministic is not True)
    return mha
from attention_jax.hf_layers import from_hf, to_hf  # noqa: E402, F401 (re-exported)
