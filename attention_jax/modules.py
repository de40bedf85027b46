"""The Flax NNX attention module: MHA, MQA and GQA in one class.

Parameters are einsum kernels named by their dims, each carrying its logical
axis names in the ``out_sharding`` metadata of its ``nnx.Param`` (no mesh is
needed to create one; :mod:`attention_jax.sharding` maps the names to mesh axes):

==========  ===================  =============================================
parameter   shape                logical axes
==========  ===================  =============================================
q_kernel    ``[D, N, H]``        ``('embed', 'heads', 'head_dim')``
k_kernel    ``[Dk, K, H]``       ``('embed', 'kv_heads', 'head_dim')``
v_kernel    ``[Dv, K, V]``       ``('embed', 'kv_heads', 'head_dim')``
o_kernel    ``[N, V, Do]``       ``('heads', 'head_dim', 'embed')``
q_bias      ``[N, H]``           ``('heads', 'head_dim')``
k_bias      ``[K, H]``           ``('kv_heads', 'head_dim')``
v_bias      ``[K, V]``           ``('kv_heads', 'head_dim')``
o_bias      ``[Do]``             ``('embed',)``
==========  ===================  =============================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import cache as kv_cache
from attention_jax import ops
from attention_jax import rope as rope_lib

Array = jax.Array
Initializer = Callable[[Array, Sequence[int], Any], Array]

EMBED, HEADS, KV_HEADS, HEAD_DIM = "embed", "heads", "kv_heads", "head_dim"

# (logical axes, number of leading "fan-in" axes) per parameter.
PARAM_AXES: dict[str, tuple[tuple[str, ...], int]] = {
    "q_kernel": ((EMBED, HEADS, HEAD_DIM), 1),
    "k_kernel": ((EMBED, KV_HEADS, HEAD_DIM), 1),
    "v_kernel": ((EMBED, KV_HEADS, HEAD_DIM), 1),
    "o_kernel": ((HEADS, HEAD_DIM, EMBED), 2),
    "q_bias": ((HEADS, HEAD_DIM), 0),
    "k_bias": ((KV_HEADS, HEAD_DIM), 0),
    "v_bias": ((KV_HEADS, HEAD_DIM), 0),
    "o_bias": ((EMBED,), 0),
}


_ZEROS: Initializer = nnx.initializers.zeros_init()


def default_kernel_init() -> Initializer:
    """LeCun normal over the flattened ``[fan_in, fan_out]`` matrix (as Flax's Dense)."""
    return nnx.initializers.lecun_normal()


def init_param_value(name: str, init: Initializer, rng: Array, shape: tuple[int, ...],
                     dtype) -> Array:
    """Parameter ``name``'s initial value: ``init`` on its 2-D ``[fan_in, fan_out]`` view.

    Kernels are initialised as the matrix they multiply by (so fan-in based
    initialisers see ``D``, not ``D`` and ``N`` apart); biases as they are.
    Shared by the NNX module and :mod:`attention_jax.linen`.
    """
    _, n_in = PARAM_AXES[name]
    if n_in:
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return init(rng, flat, dtype).reshape(shape)
    return init(rng, shape, dtype)


def _param(name: str, init: Initializer, rng: Array, shape: tuple[int, ...], dtype) -> nnx.Param:
    """:func:`init_param_value` as an ``nnx.Param`` with its logical axis names."""
    value = init_param_value(name, init, rng, shape, dtype)
    return nnx.Param(value, out_sharding=PARAM_AXES[name][0], eager_sharding=False)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with ``num_kv_heads`` key/value heads (MHA, GQA, MQA).

    ``y = merge_heads(attn(x_q W_q + b_q, x_k W_k + b_k, x_v W_v + b_v), W_o) + b_o``
    with ``attn`` from :func:`attention_jax.ops.dot_product_attention`.

    Args:
      in_features: D, the width of ``inputs_q``.
      num_heads: N query heads.
      num_kv_heads: K key/value heads; ``None`` means N (MHA), 1 is MQA.
        N must be a multiple of K.
      head_dim: H, query/key size per head; default ``in_features // num_heads``.
      v_head_dim: V, value size per head; default H.
      in_k_features: width of ``inputs_k`` (torch's ``kdim``); default D.
      in_v_features: width of ``inputs_v`` (torch's ``vdim``); default the key width.
      out_features: output width; default D.
      use_bias: biases on the four projections.
      dropout_rate: dropout on the attention weights.
      dtype: computation dtype; default: promoted from inputs and parameters.
      param_dtype: parameter dtype.
      implementation: attention backend passed to ``dot_product_attention``.
      scale: logit scale; default ``1/sqrt(H)``.
      kernel_init, bias_init: initialisers; kernels see their flattened
        ``[fan_in, fan_out]`` shape.
      deterministic: default for ``__call__``'s ``deterministic`` (``None`` means
        dropout is on when ``dropout_rate > 0``).
      rope: rotary position embeddings' base theta (e.g. ``10_000.0``), applied
        to q and k after projection at their absolute positions
        (:mod:`attention_jax.rope`); ``None`` (default) means no rope.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when dropout is used).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> mha = MultiHeadAttention(64, 8, num_kv_heads=2, rngs=nnx.Rngs(0))   # GQA
    >>> mha(jnp.ones((2, 10, 64)), is_causal=True).shape
    (2, 10, 64)

    Decoding with an explicit cache (:mod:`attention_jax.cache`):

    >>> cache = mha.init_cache(batch_size=2, max_length=16)
    >>> y, cache = mha.decode(jnp.ones((2, 5, 64)), cache)       # prefill 5 tokens
    >>> y, cache = mha.decode(jnp.ones((2, 1, 64)), cache)       # one step
    >>> cache.k.shape, cache.lengths.tolist()                    # sized by K = 2
    ((2, 16, 2, 8), [6, 6])
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        v_head_dim: int | None = None,
        in_k_features: int | None = None,
        in_v_features: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        scale: float | None = None,
        kernel_init: Initializer | None = None,
        bias_init: Initializer = _ZEROS,
        deterministic: bool | None = None,
        rope: float | None = None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("in_features", in_features), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"in_features ({in_features}) is not divisible by num_heads ({num_heads}); "
                    "pass head_dim explicitly"
                )
            head_dim = in_features // num_heads
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}")
        rope_lib.check_rope(rope, head_dim)
        if implementation is not None and implementation not in ops.available_implementations():
            raise ValueError(
                f"unknown implementation {implementation!r}; available: "
                f"{ops.available_implementations()}"
            )

        self.in_features = in_features
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.in_k_features = in_features if in_k_features is None else in_k_features
        self.in_v_features = self.in_k_features if in_v_features is None else in_v_features
        self.out_features = in_features if out_features is None else out_features
        self.use_bias = use_bias
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = implementation
        self.scale = scale
        self.deterministic = deterministic
        self.rope = rope

        kinit = default_kernel_init() if kernel_init is None else kernel_init
        N, K, H, V = num_heads, num_kv_heads, head_dim, self.v_head_dim
        shapes = {
            "q_kernel": (in_features, N, H),
            "k_kernel": (self.in_k_features, K, H),
            "v_kernel": (self.in_v_features, K, V),
            "o_kernel": (N, V, self.out_features),
        }
        for name, shape in shapes.items():
            setattr(self, name, _param(name, kinit, rngs.params(), shape, param_dtype))
        if use_bias:
            bias_shapes = {"q_bias": (N, H), "k_bias": (K, H), "v_bias": (K, V),
                           "o_bias": (self.out_features,)}
            for name, shape in bias_shapes.items():
                setattr(self, name, _param(name, bias_init, rngs.params(), shape, param_dtype))
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.rngs = rngs.dropout.fork() if dropout_rate > 0.0 else None

    # -- helpers -----------------------------------------------------------

    @property
    def num_groups(self) -> int:
        """G = N // K, query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: Any = None) -> int:
        """Bytes of key and value cache one token costs: ``K * (H + V) * itemsize``."""
        dtype = self.param_dtype if dtype is None else dtype
        return self.num_kv_heads * (self.head_dim + self.v_head_dim) * jnp.dtype(dtype).itemsize

    def _check_width(self, name: str, x: Array, expected: int) -> None:
        if x.ndim != 3:
            raise ValueError(f"{name} must be [batch, length, features]; got shape {x.shape}")
        if x.shape[-1] != expected:
            raise ValueError(
                f"{name} has {x.shape[-1]} features but the module expects {expected}"
            )

    def resolve_inputs(
        self, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """Applies the input defaults (k = q, v = k) and checks widths and batch.

        Shared by every path that calls this module's math (single device, head parallel).

        Raises:
          ValueError: naming the width or shape that does not match the module.
        """
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        self._check_width("inputs_q", inputs_q, self.in_features)
        self._check_width("inputs_k", inputs_k, self.in_k_features)
        self._check_width("inputs_v", inputs_v, self.in_v_features)
        if inputs_k.shape[:2] != inputs_v.shape[:2]:
            raise ValueError(
                f"inputs_k {inputs_k.shape} and inputs_v {inputs_v.shape} must share "
                "[batch, length]"
            )
        if inputs_q.shape[0] != inputs_k.shape[0]:
            raise ValueError(
                f"inputs_q has batch {inputs_q.shape[0]} but inputs_k has {inputs_k.shape[0]}"
            )
        return inputs_q, inputs_k, inputs_v

    def check_decode_inputs(self, x: Array, cache: kv_cache.KVCache) -> None:
        """Checks ``x [B, t, D]`` and ``cache`` against this module (every decode path).

        Raises:
          ValueError: naming the width, batch or cache shape that does not match.
        """
        self._check_width("x", x, self.in_features)
        if self.in_k_features != self.in_features or self.in_v_features != self.in_features:
            raise ValueError(
                "decode is self-attention: it needs in_k_features == in_v_features == "
                f"in_features; got {self.in_k_features}, {self.in_v_features}, {self.in_features}"
            )
        K, H, V = self.num_kv_heads, self.head_dim, self.v_head_dim
        if cache.k.shape[2:] != (K, H) or cache.v.shape[2:] != (K, V):
            raise ValueError(
                f"cache k {cache.k.shape} / v {cache.v.shape} do not fit the module: expected "
                f"[B, L, K={K}, H={H}] / [B, L, K={K}, V={V}] (use module.init_cache)"
            )
        if x.shape[0] != cache.batch_size:
            raise ValueError(f"x has batch {x.shape[0]} but the cache has {cache.batch_size}")

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view`` / ``module.eval()`` / ``module.train()``."""
        if deterministic is not None:
            self.deterministic = deterministic

    def param_values(self) -> dict[str, Array | None]:
        """Parameter values by name (``PARAM_AXES`` order), None for absent biases."""
        params = {name: getattr(self, name) for name in PARAM_AXES}
        return {name: None if p is None else p[...] for name, p in params.items()}

    def dropout_key(self, deterministic: bool | None = None) -> Array | None:
        """A fresh dropout key, or None when dropout is off for this call.

        Off when ``dropout_rate == 0`` or when deterministic (the argument, else
        the module's ``deterministic``). Every path that runs this module's math
        (single device, head parallel) draws its key here.
        """
        if self.dropout_rate == 0.0:
            return None
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic:
            return None
        return self.rngs()

    # -- forward -----------------------------------------------------------

    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Attends ``inputs_q`` to ``inputs_k`` / ``inputs_v``.

        Args:
          inputs_q: ``[B, T, D]``.
          inputs_k: ``[B, S, Dk]``; default ``inputs_q`` (self-attention).
          inputs_v: ``[B, S, Dv]``; default ``inputs_k``.
          mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend.
          is_causal: add the top-left aligned causal mask.
          deterministic: disable dropout (default: the module's setting;
            dropout is on when ``dropout_rate > 0`` and nothing says otherwise).
          return_weights: also return the ``[B, N, T, S]`` attention weights.

        Returns:
          ``[B, T, Do]``, and the weights when ``return_weights``.
        """
        inputs_q, inputs_k, inputs_v = self.resolve_inputs(inputs_q, inputs_k, inputs_v)
        params = self.param_values()
        dropout_rng = self.dropout_key(deterministic)
        y, weights = attention_forward(
            params, inputs_q, inputs_k, inputs_v,
            mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_rate=0.0 if dropout_rng is None else self.dropout_rate,
            dropout_rng=dropout_rng,
            return_weights=return_weights, implementation=self.implementation,
            dtype=self.dtype, rope=self.rope,
        )
        y = add_output_bias(y, params)
        return (y, weights) if return_weights else y

    # -- decoding ----------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> kv_cache.KVCache:
        """An empty :class:`~attention_jax.cache.KVCache` for this module's K, H and V.

        Args:
          batch_size: B.
          max_length: L, the most tokens (prompt and generated) a row can hold.
          dtype: cache dtype; default the module's ``dtype``, else ``param_dtype``.
            ``jnp.int8`` stores keys and values quantized per token and head.
        """
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return kv_cache.init_cache(
            batch_size, max_length, self.num_kv_heads, self.head_dim, self.v_head_dim, dtype
        )

    def decode(
        self,
        x: Array,
        cache: kv_cache.KVCache,
        *,
        mask: Array | None = None,
        valid_lengths: Array | None = None,
    ) -> tuple[Array, kv_cache.KVCache]:
        """Causal self-attention of new tokens to the cache and to themselves.

        A prefill (t > 1) and a single-token step (t = 1) are the same call.
        Rows sit at their own positions ``cache.lengths``; rope (when set) uses
        them. No dropout is applied. Wrap in ``nnx.jit(..., donate_argnums=...)``
        to update the cache in place. See :mod:`attention_jax.cache` for ragged
        prompts, overflow and int8.

        Args:
          x: ``[B, t, D]`` new tokens, t >= 1.
          cache: from :meth:`init_cache` or a previous call.
          mask: optional extra boolean mask broadcastable to ``[B, N, t, L]``.
          valid_lengths: ``[B]`` real tokens per row among the t (right-padded
            prompts of different lengths); default t. Padded tokens are not
            stored and their outputs are to be ignored.

        Returns:
          ``(y [B, t, Do], updated cache)``.

        Raises:
          ValueError: when eager and a row would pass the cache's ``max_length``.
        """
        self.check_decode_inputs(x, cache)
        params = self.param_values()
        y, cache = decode_forward(
            params, x, cache, mask=mask, valid_lengths=valid_lengths, scale=self.scale,
            rope=self.rope, implementation=self.implementation, dtype=self.dtype,
        )
        y = add_output_bias(y, params)
        return y, cache


def attention_forward(
    params: dict[str, Array | None],
    inputs_q: Array,
    inputs_k: Array,
    inputs_v: Array,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    implementation: str | None = None,
    dtype: Any = None,
    rope: float | None = None,
    positions: Array | None = None,
    kv_positions: Array | None = None,
) -> tuple[Array, Array | None]:
    """The module's math on plain arrays, without the output bias.

    Head counts come from the kernels' shapes, so a head-parallel caller passes
    its local slices (``q_kernel[:, heads_here]`` ...), sums the partial outputs
    across devices and adds ``o_bias`` once.

    Args:
      params: the module's parameters by name (``PARAM_AXES``), biases may be None.
      inputs_q: ``[B, T, D]``; inputs_k ``[B, S, Dk]``; inputs_v ``[B, S, Dv]``.
      rope: rotary base theta, or None for no rotary embedding.
      positions: ``[T]`` or ``[B, T]`` query positions for rope; default ``arange(T)``.
      kv_positions: ``[S]`` or ``[B, S]`` key positions for rope; default ``arange(S)``.

    Returns:
      ``([B, T, Do], weights [B, N, T, S] or None)``.
    """
    p, dtype = _cast_params(params, inputs_q, inputs_k, inputs_v, dtype=dtype)
    q, k, v = _project_qkv(p, inputs_q, inputs_k, inputs_v, dtype=dtype, rope=rope,
                           positions=positions, kv_positions=kv_positions)
    out = ops.dot_product_attention(
        q, k, v, mask, is_causal=is_causal, scale=scale,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        return_weights=return_weights, implementation=implementation,
    )
    out, weights = out if return_weights else (out, None)
    return ops.merge_heads(out, p["o_kernel"]), weights  # [B, T, Do]


def add_output_bias(y: Array, params: dict[str, Array | None]) -> Array:
    """``y + o_bias`` (in y's dtype), or ``y`` for a module without biases.

    Every path adds it once, after the heads' partial outputs are summed
    (on one device, after :func:`attention_forward`; head parallel, after the psum).
    """
    return y if params["o_bias"] is None else y + params["o_bias"].astype(y.dtype)


def _cast_params(params: dict[str, Array | None], *inputs: Array, dtype: Any
                 ) -> tuple[dict[str, Array | None], Any]:
    """Parameters in the computation dtype (default: promoted from inputs and params)."""
    arrays = [*inputs, *(p for p in params.values() if p is not None)]
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return {n: None if a is None else jnp.asarray(a, dtype) for n, a in params.items()}, dtype


def _project_qkv(
    p: dict[str, Array | None],
    inputs_q: Array,
    inputs_k: Array,
    inputs_v: Array,
    *,
    dtype: Any,
    rope: float | None,
    positions: Array | None,
    kv_positions: Array | None,
) -> tuple[Array, Array, Array]:
    """Projections to heads, rope on q and k: ``[B, T, N, H], [B, S, K, H], [B, S, K, V]``."""
    xq, xk, xv = (jnp.asarray(x, dtype) for x in (inputs_q, inputs_k, inputs_v))
    q = ops.project_heads(xq, p["q_kernel"], p["q_bias"])  # [B, T, N, H]
    k = ops.project_heads(xk, p["k_kernel"], p["k_bias"])  # [B, S, K, H]
    v = ops.project_heads(xv, p["v_kernel"], p["v_bias"])  # [B, S, K, V]
    if rope is not None:
        T, S = q.shape[1], k.shape[1]
        positions = jnp.arange(T) if positions is None else positions
        kv_positions = jnp.arange(S) if kv_positions is None else kv_positions
        q = rope_lib.apply_rope(q, positions, rope)
        k = rope_lib.apply_rope(k, kv_positions, rope)
    return q, k, v


def decode_forward(
    params: dict[str, Array | None],
    x: Array,
    cache: kv_cache.KVCache,
    *,
    mask: Array | None = None,
    valid_lengths: Array | None = None,
    scale: float | None = None,
    rope: float | None = None,
    implementation: str | None = None,
    dtype: Any = None,
    kv_heads: tuple[Array | int, int] | None = None,
) -> tuple[Array, kv_cache.KVCache]:
    """:meth:`MultiHeadAttention.decode` on plain arrays, without the output bias.

    As :func:`attention_forward`, head counts come from the kernels' and the
    cache's shapes, so a head-parallel caller passes local slices of both.

    Args:
      params: parameters by name (``PARAM_AXES``), biases may be None.
      x: ``[B, t, D]`` new tokens; they sit at positions ``cache.lengths + arange(t)``.
      cache: the :class:`~attention_jax.cache.KVCache` before the step.
      mask, valid_lengths: see :meth:`MultiHeadAttention.decode`.
      kv_heads: ``(first, count)`` of the kv heads the queries attend to; the
        projections and the cache update cover all kv heads of ``params``
        (see :func:`attention_jax.cache.cached_attention`). Default all.

    Returns:
      ``(y [B, t, Do], updated cache)``.
    """
    p, dtype = _cast_params(params, x, dtype=dtype)
    pos = kv_cache.positions(cache, x.shape[1])  # [B, t]
    q, k, v = _project_qkv(p, x, x, x, dtype=dtype, rope=rope, positions=pos,
                           kv_positions=pos)
    out, cache = kv_cache.cached_attention(
        q, k, v, cache, valid_lengths=valid_lengths, mask=mask, scale=scale,
        implementation=implementation, kv_heads=kv_heads,
    )  # [B, t, N, V]
    return ops.merge_heads(out, p["o_kernel"]), cache  # [B, t, Do]


def MultiQueryAttention(in_features: int, num_heads: int, **kwargs) -> MultiHeadAttention:
    """MQA: a :class:`MultiHeadAttention` with one key/value head."""
    return MultiHeadAttention(in_features, num_heads, num_kv_heads=1, **kwargs)


def GroupedQueryAttention(
    in_features: int, num_heads: int, num_kv_heads: int, **kwargs
) -> MultiHeadAttention:
    """GQA: a :class:`MultiHeadAttention` whose N query heads share K key/value heads."""
    return MultiHeadAttention(in_features, num_heads, num_kv_heads=num_kv_heads, **kwargs)
