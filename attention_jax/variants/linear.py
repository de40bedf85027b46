"""Linear attention: a feature map instead of the softmax (Katharopoulos et al., 2020).

With a positive feature map ``phi``, attention becomes associative:

.. math::

   \\mathrm{out}_t = \\frac{\\phi(q_t)^\\top \\sum_s \\phi(k_s) v_s^\\top}
                         {\\phi(q_t)^\\top \\sum_s \\phi(k_s) + \\epsilon}

so the ``[H, V]`` sum is formed once and the cost is linear in the length.
Causal attention sums over ``s <= t`` only; that is a recurrence whose state
``kv [B, K, H, V]`` and normaliser ``z [B, K, H]`` do not grow with T, so a
decode step costs the same at token 10 and at token 10 000 (no KV cache).

``phi`` is ``"elu1"`` (``elu(x) + 1``, the paper's) or ``"relu"``. Query heads
are grouped ``[B, T, K, G, H]`` and share their group's state (GQA / MQA),
keys and values are never repeated. The causal parallel form works in chunks
of ``chunk_size``: exact softmax-free attention inside a chunk, the running
state between chunks (``lax.scan``), so memory is ``T x chunk_size`` not ``T x T``.
There is no logit scale (no softmax) and no rope.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from attention_jax import ops
from attention_jax.modules import MultiHeadAttention
from attention_jax.variants import common

Array = jax.Array

FEATURE_MAPS = {
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}


@struct.dataclass
class LinearState:
    """Causal linear attention's running sums (everything decoding needs).

    Attributes:
      kv: ``[B, K, H, V]`` float32, ``sum_s phi(k_s) v_s^T``.
      z: ``[B, K, H]`` float32, ``sum_s phi(k_s)``.
    """

    kv: Array
    z: Array


def init_state(batch_size: int, num_kv_heads: int, head_dim: int, v_head_dim: int
               ) -> LinearState:
    """Zero sums: the state before the first token."""
    return LinearState(jnp.zeros((batch_size, num_kv_heads, head_dim, v_head_dim), jnp.float32),
                       jnp.zeros((batch_size, num_kv_heads, head_dim), jnp.float32))


def apply_feature_map(x: Array, feature_map: str) -> Array:
    """``phi(x)`` in float32 for ``feature_map`` in ``FEATURE_MAPS``."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}; got {feature_map!r}")
    return FEATURE_MAPS[feature_map](x.astype(jnp.float32))


def _features(q, k, v, feature_map):
    B, T, N, H = q.shape
    K = k.shape[2]
    qf = apply_feature_map(q, feature_map).reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    return qf, apply_feature_map(k, feature_map), v.astype(jnp.float32)


def _chunk(qf, kf, vf, state: LinearState):
    """One chunk of the causal form: ``[B, C, ...]`` blocks and the state before them."""
    C = qf.shape[1]
    tril = jnp.tril(jnp.ones((C, C), bool))
    a = jnp.einsum("BTKGH,BSKH->BKGTS", qf, kf) * tril  # [B, K, G, C, C]
    num = jnp.einsum("BKGTS,BSKV->BTKGV", a, vf) + jnp.einsum("BTKGH,BKHV->BTKGV", qf, state.kv)
    den = jnp.einsum("BKGTS->BTKG", a) + jnp.einsum("BTKGH,BKH->BTKG", qf, state.z)
    new = LinearState(state.kv + jnp.einsum("BSKH,BSKV->BKHV", kf, vf),
                      state.z + kf.sum(axis=1))
    return num, den, new


def linear_attention(q: Array, k: Array, v: Array, *, causal: bool = False,
                     feature_map: str = "elu1", chunk_size: int = 64, eps: float = 1e-6,
                     initial_state: LinearState | None = None, return_state: bool = False
                     ) -> Array | tuple[Array, LinearState]:
    """Linear attention, non-causal or causal (chunked parallel form).

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys, N % K == 0 (GQA / MQA grouped, never repeated).
      v: ``[B, S, K, V]`` values.
      causal: query t sees keys s <= t (needs S == T).
      feature_map: ``"elu1"`` or ``"relu"``.
      chunk_size: block length of the causal form (a speed / memory knob only).
      eps: added to the normaliser.
      initial_state: causal only: sums of earlier tokens (prefill after a
        previous call); default zeros.
      return_state: causal only: also return the state after the last token.

    Returns:
      ``[B, T, N, V]`` in q's dtype (and the :class:`LinearState` when asked).

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 5, 4, 8)); kv = jnp.ones((1, 5, 1, 8))     # MQA
    >>> linear_attention(q, kv, kv, causal=True, chunk_size=2).shape
    (1, 5, 4, 8)
    """
    B, T, S, N, K, H, V = ops.check_qkv(q, k, v)
    qf, kf, vf = _features(q, k, v, feature_map)
    if not causal:
        if initial_state is not None or return_state:
            raise ValueError("initial_state / return_state are for causal=True only")
        kv = jnp.einsum("BSKH,BSKV->BKHV", kf, vf)  # [B, K, H, V]
        num = jnp.einsum("BTKGH,BKHV->BTKGV", qf, kv)
        den = jnp.einsum("BTKGH,BKH->BTKG", qf, kf.sum(axis=1))
        return (num / (den[..., None] + eps)).reshape(B, T, N, V).astype(q.dtype)
    if S != T:
        raise ValueError(f"causal linear attention needs as many keys as queries; got T={T}, "
                         f"S={S}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    state = init_state(B, K, H, V) if initial_state is None else initial_state
    C = min(chunk_size, T)
    pad = -T % C
    # Zero features at the end (phi is applied first): padded keys add nothing to
    # the sums, padded queries' outputs are cut.
    qf, kf, vf = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (qf, kf, vf))
    n = (T + pad) // C

    def blocks(x):  # [B, n*C, ...] -> [n, B, C, ...]
        return jnp.moveaxis(x.reshape(B, n, C, *x.shape[2:]), 1, 0)

    def step(state, xs):
        num, den, state = _chunk(*xs, state)
        return state, num / (den[..., None] + eps)

    last, out = jax.lax.scan(step, state, (blocks(qf), blocks(kf), blocks(vf)))
    out = jnp.moveaxis(out, 0, 1).reshape(B, T + pad, N, V)[:, :T].astype(q.dtype)
    return (out, last) if return_state else out


def linear_attention_step(q: Array, k: Array, v: Array, state: LinearState, *,
                          feature_map: str = "elu1", eps: float = 1e-6
                          ) -> tuple[Array, LinearState]:
    """One token of the causal recurrence.

    Args:
      q: ``[B, N, H]``; k ``[B, K, H]``; v ``[B, K, V]``: the new token's heads.
      state: the sums of the tokens before it.

    Returns:
      ``(out [B, N, V] in q's dtype, the state including this token)``.
    """
    B, N, H = q.shape
    K = k.shape[1]
    qf = apply_feature_map(q, feature_map).reshape(B, K, N // K, H)  # [B, K, G, H]
    kf = apply_feature_map(k, feature_map)  # [B, K, H]
    state = LinearState(state.kv + jnp.einsum("BKH,BKV->BKHV", kf, v.astype(jnp.float32)),
                        state.z + kf)
    num = jnp.einsum("BKGH,BKHV->BKGV", qf, state.kv)
    den = jnp.einsum("BKGH,BKH->BKG", qf, state.z)
    out = num / (den[..., None] + eps)
    return out.reshape(B, N, -1).astype(q.dtype), state


class LinearAttention(MultiHeadAttention):
    """:class:`~attention_jax.MultiHeadAttention`'s projections around linear attention.

    Args:
      in_features, num_heads: as :class:`~attention_jax.MultiHeadAttention`.
      feature_map: ``"elu1"`` or ``"relu"``.
      chunk_size: block length of the causal parallel form.
      **kwargs: the parent's (``num_kv_heads``, ``head_dim``, ``use_bias``,
        ``rngs`` ...); no ``scale``, ``rope`` or dropout (there is no softmax).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> m = LinearAttention(32, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 6, 32))
    >>> y = m(x, is_causal=True)
    >>> state = m.init_state(2)
    >>> y5, state = m.decode(x[:, :5], state)        # prefill
    >>> y1, state = m.decode(x[:, 5:], state)        # one step: same sizes at any length
    >>> state.kv.shape, bool(jnp.allclose(y1, y[:, 5:], atol=1e-5))
    ((2, 2, 8, 8), True)
    """

    def __init__(self, in_features: int, num_heads: int, *, feature_map: str = "elu1",
                 chunk_size: int = 64, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, num_heads, rngs=rngs, **kwargs)
        common.check_no_dropout("LinearAttention", self.dropout_rate)
        if self.rope is not None or self.scale is not None:
            raise ValueError(f"LinearAttention has no softmax logits to scale or rotate; got "
                             f"scale={self.scale}, rope={self.rope} (use None)")
        apply_feature_map(jnp.zeros(()), feature_map)  # validates the name
        self.feature_map = feature_map
        self.chunk_size = chunk_size

    def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
                 inputs_v: Array | None = None, *, mask: Array | None = None,
                 is_causal: bool = False, deterministic: bool | None = None,
                 return_weights: bool = False) -> Array:
        """``[B, T, D]`` (keys/values ``[B, S, Dk|Dv]``) -> ``[B, T, Do]``.

        Raises:
          ValueError: for a mask or ``return_weights`` (there are no ``[T, S]`` weights).
        """
        del deterministic  # no dropout: accepted for MultiHeadAttention's signature
        if mask is not None or return_weights:
            raise ValueError("LinearAttention takes no mask and returns no [T, S] weights")
        inputs_q, inputs_k, inputs_v = self.resolve_inputs(inputs_q, inputs_k, inputs_v)
        p, _ = common.cast_params(self.param_values(), inputs_q, inputs_k, inputs_v,
                                  dtype=self.dtype)
        q, k, v = common.project_qkv(p, inputs_q, inputs_k, inputs_v)
        heads = linear_attention(q, k, v, causal=is_causal, feature_map=self.feature_map,
                                 chunk_size=self.chunk_size)
        return common.output(p, heads)

    def init_state(self, batch_size: int, dtype: Any = None) -> LinearState:
        """Zero :class:`LinearState` ``kv [B, K, H, V]``, ``z [B, K, H]`` (float32;
        ``dtype`` is accepted for symmetry with ``init_cache`` and ignored)."""
        del dtype
        return init_state(batch_size, self.num_kv_heads, self.head_dim, self.v_head_dim)

    def decode(self, x: Array, state: LinearState) -> tuple[Array, LinearState]:
        """Causal self-attention of ``x [B, t, D]`` after the tokens summed in ``state``.

        t == 1 runs :func:`linear_attention_step`; t > 1 (a prefill) the chunked form.

        Returns:
          ``(y [B, t, Do], the state after the t tokens)``.
        """
        common.check_width("x", x, self.in_features)
        if state.kv.shape[0] != x.shape[0] or state.kv.shape[1:] != (
                self.num_kv_heads, self.head_dim, self.v_head_dim):
            raise ValueError(f"state kv {tuple(state.kv.shape)} does not fit x {tuple(x.shape)}"
                             f" and the module (K={self.num_kv_heads}, H={self.head_dim}, "
                             f"V={self.v_head_dim}); use module.init_state")
        p, _ = common.cast_params(self.param_values(), x, dtype=self.dtype)
        q, k, v = common.project_qkv(p, x, x, x)
        if x.shape[1] == 1:
            heads, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state,
                                                 feature_map=self.feature_map)
            heads = heads[:, None]
        else:
            heads, state = linear_attention(q, k, v, causal=True, feature_map=self.feature_map,
                                            chunk_size=self.chunk_size, initial_state=state,
                                            return_state=True)
        return common.output(p, heads), state

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError("LinearAttention keeps a LinearState, not a KV cache: use "
                                  "init_state / decode")
