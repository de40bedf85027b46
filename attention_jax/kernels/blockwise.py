"""Blockwise (FlashAttention) attention in pure JAX, with a hand-written backward pass.

The forward pass walks key/value blocks with an online softmax and keeps only the
output and the per-row log-sum-exp; the backward pass recomputes the scores block
by block (FlashAttention-2, Dao 2023). Neither pass materialises ``[B, N, T, S]``:
temporary memory is ``O(B * N * (T + block_q * block_kv))`` instead of ``O(B * N * T * S)``.

Internal layout (chosen so that the matmuls of a block are plain batched matmuls
over ``[B, K]``, with the G query heads of a key/value head folded into the row
dimension, so MQA gets tall, efficient matmuls and K/V are never repeated; the
backward pass works on the transposed, keys-by-queries tile)::

  q  [B, T, N, H] -> [nq, B, K, M, H]     M = block_q * G (row m is query m // G, head m % G)
  k  [B, S, K, H] -> [nk, B, K, bk, H]    bk = block_kv
  v  [B, S, K, V] -> [nk, B, K, bk, V]

Masks and biases keep their broadcast shape (``[B|1, K|1, T|1, G|1, S|1]`` after
grouping) and are sliced per block, so a key-padding mask ``[B, 1, 1, S]`` costs
``B * S`` booleans, never ``B * N * T * S``.

Causal masking (top-left aligned, as :func:`attention_jax.ops.causal_block`) skips
every block above the diagonal: the key loop of query block ``i`` stops at the
last key block that its last real query can see, and the query loop of key block
``j`` starts at the first query block that sees it (loop bounds, not masks), so a
causal call does about half the work. Only blocks that straddle the diagonal pay
for the elementwise causal mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax import ops

Array = jax.Array

# ``(block_q, block_kv)`` per platform; see :func:`default_block_sizes` (measured in
# experiments/results/auto_rule_cpu.md). Other platforms use the "gpu" entry.
_BLOCKS: dict[str, tuple[int, int]] = {
    "cpu": (256, 512),
    # Not measured on a GPU (no device was lent to the session that wrote this):
    # 512 keeps the number of sequential loop steps low, which is what XLA's
    # while loops on GPU are sensitive to. "auto" prefers cuDNN there anyway.
    "gpu": (512, 512),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one call; shapes are the unpadded ones."""

    T: int
    S: int
    K: int
    G: int
    block_q: int
    block_kv: int
    is_causal: bool
    scale: float
    # q is multiplied by the scale once, before the loops (saves a pass over every
    # score tile); only where that is exact enough: float32+ or a power-of-two scale.
    prescale: bool = True

    @property
    def nq(self) -> int:
        return -(-self.T // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.S // self.block_kv)

    @property
    def kv_padded(self) -> bool:
        return self.nk * self.block_kv != self.S


def default_block_sizes(T: int, S: int, platform: str | None = None) -> tuple[int, int]:
    """``(block_q, block_kv)`` for ``platform`` (default: JAX's default backend).

    A length that is not a multiple of the platform block is split into equal
    blocks (rounded up to 8) instead, so the padding stays small: T = 384 on CPU
    gives two blocks of 192, not 256 + 256 with 128 padded rows. Short sequences
    (and decoding, T = 1) get one unpadded block.

    CPU: 256 x 512, measured on the 2-core development machine (forward +
    backward, f32, H=64); the table is in ``experiments/results/auto_rule_cpu.md``.
    GPU: 512 x 512 (not measured).
    """
    platform = platform or jax.default_backend()
    bq, bk = _BLOCKS.get(platform, _BLOCKS["gpu"])
    return _balanced(T, bq), _balanced(S, bk)


def _balanced(length: int, block: int) -> int:
    """The smallest multiple of 8 (or ``length`` itself) that covers ``length`` in as
    few blocks as ``block`` does."""
    if length <= block:
        return max(length, 1)
    n = -(-length // block)
    per_block = -(-length // n)
    return min(block, -(-per_block // 8) * 8)


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block_q(q: Array, cfg: _Config) -> Array:
    """``[B, T, K*G, X] -> [nq, B, K, block_q * G, X]`` (zero-padded rows)."""
    B, T, N, X = q.shape
    bq, nq = cfg.block_q, cfg.nq
    q = _pad_axis(q, 1, nq * bq).reshape(B, nq, bq, cfg.K, cfg.G, X)
    return q.transpose(1, 0, 3, 2, 4, 5).reshape(nq, B, cfg.K, bq * cfg.G, X)


def _unblock_q(x: Array, cfg: _Config) -> Array:
    """Inverse of :func:`_block_q`: ``[nq, B, K, block_q * G, X] -> [B, T, K*G, X]``."""
    nq, B, K, M, X = x.shape
    x = x.reshape(nq, B, K, cfg.block_q, cfg.G, X).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(B, nq * cfg.block_q, K * cfg.G, X)[:, : cfg.T]


def _block_kv(x: Array, cfg: _Config) -> Array:
    """``[B, S, K, X] -> [nk, B, K, block_kv, X]`` (zero-padded keys)."""
    B, S, K, X = x.shape
    bk, nk = cfg.block_kv, cfg.nk
    x = _pad_axis(x, 1, nk * bk).reshape(B, nk, bk, K, X)
    return x.transpose(1, 0, 3, 2, 4)


def _unblock_kv(x: Array, cfg: _Config) -> Array:
    """``[nk, B, K, block_kv, X] -> [B, S, K, X]``."""
    nk, B, K, bk, X = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, X)[:, : cfg.S]


def _group_tile(x: Array, cfg: _Config, pad_value) -> Array:
    """A mask or bias broadcastable to ``[B, N, T, S]`` -> ``[B|1, K|1, Tp|1, G|1, Sp|1]``.

    Broadcast (size-1) dimensions stay size 1; full ones are padded to the
    block multiples with ``pad_value``.
    """
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    b, n, t, s = x.shape
    if n == 1:
        x = x.reshape(b, 1, 1, t, s)
    else:
        x = x.reshape(b, cfg.K, cfg.G, t, s)
    x = x.transpose(0, 1, 3, 2, 4)  # [b, k, t, g, s]
    if t > 1:
        x = _pad_axis(x, 2, cfg.nq * cfg.block_q, pad_value)
    if s > 1:
        x = _pad_axis(x, 4, cfg.nk * cfg.block_kv, pad_value)
    return x


def _ungroup_tile(dx: Array, shape: tuple[int, ...], cfg: _Config) -> Array:
    """Inverse of :func:`_group_tile` for the bias cotangent."""
    full = (1,) * (4 - len(shape)) + tuple(shape)
    _, _, t, s = full
    dx = dx[:, :, :t, :, :s].transpose(0, 1, 3, 2, 4)  # [b, k, g, t, s]
    return dx.reshape(shape)


def _tile(x: Array | None, i, j, cfg: _Config) -> Array | None:
    """The ``[.., block_q|1, G|1, block_kv|1]`` tile of a grouped mask/bias."""
    if x is None:
        return None
    if x.shape[2] > 1:
        x = lax.dynamic_slice_in_dim(x, i * cfg.block_q, cfg.block_q, axis=2)
    if x.shape[4] > 1:
        x = lax.dynamic_slice_in_dim(x, j * cfg.block_kv, cfg.block_kv, axis=4)
    return x


# ---------------------------------------------------------------------------
# One block of scores
# ---------------------------------------------------------------------------


def _scores(qi, kj, i, j, mask_t, bias_t, cfg: _Config, *, causal: bool, transpose=False):
    """Scaled scores of query block ``i`` against key block ``j``.

    Args:
      qi: ``[B, K, M, H]`` (already scaled when ``cfg.prescale``); kj: ``[B, K, bk, H]``.
      mask_t, bias_t: grouped tiles (see :func:`_tile`) or None.
      causal: apply the causal mask in this block (it straddles the diagonal).
      transpose: return keys-by-queries ``[B, K, bk, M]`` (the backward pass's
        layout, in which three of its four matmuls are plain ``A @ B`` or ``A @ B.T``).

    Returns:
      ``(s, visible)``: float32 scores ``[B, K, M, bk]`` (bias added) and a
      boolean broadcastable to them, or None (all visible); both transposed
      with ``transpose``.
    """
    B, K, M, _ = qi.shape
    bq, bk, G = cfg.block_q, cfg.block_kv, cfg.G
    if transpose:
        s = jnp.einsum("BKSH,BKMH->BKSM", kj, qi, preferred_element_type=jnp.float32)
        tile, out_shape = (bk, bq, G), (B, K, bk, M)

        def lay(x):  # [.., bq, G, bk] -> [.., bk, bq, G]
            return jnp.moveaxis(x, -1, -3)
    else:
        s = jnp.einsum("BKMH,BKSH->BKMS", qi, kj, preferred_element_type=jnp.float32)
        tile, out_shape = (bq, G, bk), (B, K, M, bk)

        def lay(x):
            return x
    if not cfg.prescale:
        s = s * jnp.float32(cfg.scale)
    if bias_t is None and mask_t is None and not causal and not cfg.kv_padded:
        return s, None
    s5 = s.reshape(B, K, *tile)
    if bias_t is not None:
        s5 = s5 + lay(bias_t).astype(jnp.float32)
    visible = None if mask_t is None else lay(mask_t)
    k_pos = lay(j * bk + lax.broadcasted_iota(jnp.int32, (1, 1, bk), 2))
    if causal:
        q_pos = lay(i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1, 1), 0))
        c = k_pos <= q_pos
        visible = c if visible is None else visible & c
    if cfg.kv_padded:
        c = k_pos < cfg.S
        visible = c if visible is None else visible & c
    if visible is not None:
        visible = jnp.broadcast_to(visible, (*visible.shape[:-3], *tile))
        visible = visible.reshape((*visible.shape[:-3], *out_shape[2:]))
    return s5.reshape(out_shape), visible


def _kv_range(i, cfg: _Config):
    """Key blocks ``[0, full)`` are fully visible to query block ``i``; ``[full, hi)``
    straddle the causal diagonal; blocks from ``hi`` on are skipped."""
    if not cfg.is_causal:
        return cfg.nk, cfg.nk
    first_row = i * cfg.block_q
    last_row = jnp.minimum((i + 1) * cfg.block_q, cfg.T) - 1
    hi = jnp.minimum(last_row // cfg.block_kv + 1, cfg.nk)
    # Key block j is fully visible when its last key <= the block's first query.
    full = jnp.minimum((first_row + 1) // cfg.block_kv, hi)
    return full, hi


def _q_range(j, cfg: _Config):
    """Query blocks ``[lo, nq)`` see key block ``j``; those at or past ``full`` see all of it."""
    if not cfg.is_causal:
        return 0, 0
    lo = jnp.minimum((j * cfg.block_kv) // cfg.block_q, cfg.nq)
    # Query block i sees every key of block j when its first row >= the last key.
    last_key = (j + 1) * cfg.block_kv - 1
    full = jnp.clip(-(-last_key // cfg.block_q), lo, cfg.nq)
    return lo, full


def _varying_axes(x: Array) -> frozenset:
    """Manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier jax


def _varying_like(x: Array, *refs: Array | None) -> Array:
    """Marks a fresh loop carry (zeros, -inf) as varying over the manual mesh axes
    that ``refs`` vary over, so the loops type-check inside ``jax.shard_map``
    (with ``check_vma``); a no-op outside shard_map."""
    axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))
    missing = tuple(sorted(axes - _varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def _forward(qb, kb, vb, mask_g, bias_g, cfg: _Config):
    """Online softmax. Returns ``(out [nq, B, K, M, V] f32, lse [nq, B, K, M] f32)``.

    ``lse`` is +inf for rows that see no key, so that the backward pass's
    ``exp(s - lse)`` is exactly 0 there (no NaN), and their output is 0.
    """
    _, B, K, M, _ = qb.shape
    V = vb.shape[-1]

    def q_block(i, qi):
        def kv_step(j, carry, causal):
            m, l, acc = carry
            s, visible = _scores(
                qi, kb[j], i, j, _tile(mask_g, i, j, cfg), _tile(bias_g, i, j, cfg), cfg,
                causal=causal,
            )
            if visible is not None:
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(axis=-1)
            pv = jnp.einsum(
                "BKMS,BKSV->BKMV", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32
            )
            return m_new, l, acc * corr[..., None] + pv

        carry = tuple(_varying_like(c, qi, kb, vb, mask_g, bias_g) for c in (
            jnp.full((B, K, M), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, M), jnp.float32),
            jnp.zeros((B, K, M, V), jnp.float32),
        ))
        full, hi = _kv_range(i, cfg)
        carry = lax.fori_loop(0, full, functools.partial(kv_step, causal=False), carry)
        if cfg.is_causal:
            carry = lax.fori_loop(full, hi, functools.partial(kv_step, causal=True), carry)
        m, l, acc = carry
        seen = l > 0.0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out, lse

    def step(_, xs):
        i, qi = xs
        return None, q_block(i, qi)

    _, (out, lse) = lax.scan(step, None, (jnp.arange(cfg.nq), qb))
    return out, lse


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes where ``shape`` is 1 (keeping them)."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 < n)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _backward(qb, kb, vb, mask_g, bias_g, out, lse, dob, cfg: _Config):
    """Returns ``(dq [nq,B,K,M,H] f32, dk [nk,B,K,bk,H] f32, dv [nk,B,K,bk,V] f32, dbias|None)``."""
    B, K, M = qb.shape[1:4]
    bq, bk, G = cfg.block_q, cfg.block_kv, cfg.G
    delta = jnp.sum(dob.astype(jnp.float32) * out, axis=-1)  # [nq, B, K, M]
    scale = jnp.float32(cfg.scale)
    k_scale = jnp.float32(1.0) if cfg.prescale else scale  # qb is scaled already

    def kv_block(carry, xs):
        j, kj, vj = xs

        def q_step(i, inner, causal):
            dk, dv, dq, dbias = inner
            qi, doi = qb[i], dob[i]
            # Keys by queries, [B, K, bk, M]: four of the five matmuls are then
            # plain A @ B or A @ B.T, which XLA:CPU hands to its fast dot kernels.
            s, visible = _scores(
                qi, kj, i, j, _tile(mask_g, i, j, cfg), _tile(bias_g, i, j, cfg), cfg,
                causal=causal, transpose=True,
            )
            p = jnp.exp(s - lse[i][:, :, None, :])
            if visible is not None:
                p = jnp.where(visible, p, 0.0)
            dv = dv + jnp.einsum("BKSM,BKMV->BKSV", p.astype(doi.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKSV,BKMV->BKSM", vj, doi, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][:, :, None, :])  # d loss / d (scaled logits + bias)
            dk = dk + k_scale * jnp.einsum("BKSM,BKMH->BKSH", ds.astype(qi.dtype), qi,
                                           preferred_element_type=jnp.float32)
            dqi = scale * jnp.einsum("BKSM,BKSH->BKMH", ds.astype(kj.dtype), kj,
                                     preferred_element_type=jnp.float32)
            dq = lax.dynamic_update_index_in_dim(dq, dq[i] + dqi, i, axis=0)
            if dbias is not None:
                ds5 = jnp.moveaxis(ds.reshape(B, K, bk, bq, G), 2, 4)  # [B, K, bq, G, bk]
                tile_shape = (*dbias.shape[:2], bq if dbias.shape[2] > 1 else 1,
                              dbias.shape[3], bk if dbias.shape[4] > 1 else 1)
                start = (0, 0, i * bq if dbias.shape[2] > 1 else 0, 0,
                         j * bk if dbias.shape[4] > 1 else 0)
                old = lax.dynamic_slice(dbias, start, tile_shape)
                dbias = lax.dynamic_update_slice(dbias, old + _reduce_to(ds5, tile_shape), start)
            return dk, dv, dq, dbias

        dq, dbias = carry
        refs = (qb, kj, vj, dob, mask_g, bias_g)
        inner = (
            _varying_like(jnp.zeros((B, K, bk, kj.shape[-1]), jnp.float32), *refs),
            _varying_like(jnp.zeros((B, K, bk, vj.shape[-1]), jnp.float32), *refs),
            dq,
            dbias,
        )
        if cfg.is_causal:
            lo, full = _q_range(j, cfg)
            inner = lax.fori_loop(lo, full, functools.partial(q_step, causal=True), inner)
            inner = lax.fori_loop(full, cfg.nq, functools.partial(q_step, causal=False), inner)
        else:
            inner = lax.fori_loop(0, cfg.nq, functools.partial(q_step, causal=False), inner)
        dk, dv, dq, dbias = inner
        return (dq, dbias), (dk, dv)

    refs = (qb, kb, vb, dob, mask_g, bias_g)
    dq0 = _varying_like(jnp.zeros(qb.shape, jnp.float32), *refs)
    dbias0 = None if bias_g is None else _varying_like(jnp.zeros(bias_g.shape, jnp.float32),
                                                       *refs)
    (dq, dbias), (dk, dv) = lax.scan(kv_block, (dq0, dbias0), (jnp.arange(cfg.nk), kb, vb))
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------
# custom_vjp plumbing
# ---------------------------------------------------------------------------


def _prepare(q, k, v, mask, bias, cfg: _Config):
    if cfg.prescale:
        q = q * jnp.asarray(cfg.scale, q.dtype)
    qb = _block_q(q, cfg)
    kb, vb = _block_kv(k, cfg), _block_kv(v, cfg)
    mask_g = None if mask is None else _group_tile(mask.astype(bool), cfg, False)
    bias_g = None if bias is None else _group_tile(bias, cfg, 0)
    return qb, kb, vb, mask_g, bias_g


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, mask, bias, cfg: _Config):
    out, _ = _attention_fwd(q, k, v, mask, bias, cfg)
    return out


def _attention_fwd(q, k, v, mask, bias, cfg: _Config):
    qb, kb, vb, mask_g, bias_g = _prepare(q, k, v, mask, bias, cfg)
    out, lse = _forward(qb, kb, vb, mask_g, bias_g, cfg)
    y = _unblock_q(out, cfg).astype(q.dtype)
    # Residuals: the inputs and the output (already live) plus the O(B*N*T) lse.
    return y, (q, k, v, mask, bias, y, lse)


def _attention_bwd(cfg: _Config, res, dy):
    q, k, v, mask, bias, y, lse = res
    qb, kb, vb, mask_g, bias_g = _prepare(q, k, v, mask, bias, cfg)
    ob = _block_q(y, cfg).astype(jnp.float32)
    dob = _block_q(dy.astype(q.dtype), cfg)
    dq, dk, dv, dbias = _backward(qb, kb, vb, mask_g, bias_g, ob, lse, dob, cfg)
    dq = _unblock_q(dq, cfg).astype(q.dtype)
    dk = _unblock_kv(dk, cfg).astype(k.dtype)
    dv = _unblock_kv(dv, cfg).astype(v.dtype)
    if bias is not None:
        dbias = _ungroup_tile(dbias, bias.shape, cfg).astype(bias.dtype)
    return (_sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), None,
            None if bias is None else _sum_to(dbias, bias))


def _sum_to(ct: Array, primal: Array) -> Array:
    """Inside ``jax.shard_map``: the cotangent of an input that is the same on every
    device (e.g. a bias shared by head shards) is the sum of the per-device
    cotangents (what autodiff does for the implicit broadcast). No-op elsewhere."""
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    return lax.psum(ct, extra) if extra else ct


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> Array:
    """Memory-efficient attention, equal to :func:`attention_jax.ops.attention_core`.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys (N % K == 0; K/V are never repeated).
      v: ``[B, S, K, V]`` values.
      mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend. Kept at its
        broadcast shape and sliced per block.
      bias: float, broadcastable to ``[B, N, T, S]``; added to the scaled scores.
        Differentiable (its gradient is summed back to its own shape).
      is_causal: top-left aligned causal mask; blocks above the diagonal are skipped.
      scale: score scale, default ``1/sqrt(H)``.
      block_q, block_kv: block sizes; default :func:`default_block_sizes`. T and S
        need not be multiples (inputs are padded internally, pad keys masked).

    Returns:
      ``[B, T, N, V]`` in q's dtype. Scores, softmax and accumulation are float32;
      the two matmuls take the input dtype (bf16 stays bf16 on the MXU/tensor cores)
      with float32 accumulation. Rows that see no key are zeros, with zero
      gradients (no NaN).

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 10, 4, 8)); kv = jnp.ones((1, 13, 2, 8))
    >>> blockwise_attention(q, kv, kv, is_causal=True, block_q=4, block_kv=4).shape
    (1, 10, 4, 8)
    """
    B, T, S, N, K, H, V = ops.check_qkv(q, k, v)
    # Resolved outside the jit below, so that the jit cache keys on the sizes used.
    dbq, dbk = default_block_sizes(T, S)
    block_q = dbq if block_q is None else int(block_q)
    block_kv = dbk if block_kv is None else int(block_kv)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1; got block_q={block_q}, block_kv={block_kv}")
    if math.prod(q.shape) == 0 or S == 0:
        return jnp.zeros((B, T, N, V), q.dtype)
    scale = float(ops.default_scale(H) if scale is None else scale)
    cfg = _Config(
        T=T, S=S, K=K, G=N // K, block_q=block_q, block_kv=block_kv, is_causal=bool(is_causal),
        scale=scale, prescale=_can_prescale(q.dtype, scale),
    )
    return _jit_attention(q, k, v, mask, bias, cfg)


def _can_prescale(dtype, scale: float) -> bool:
    """Scaling q before the matmul rounds it; exact for powers of two, fine in float32."""
    return jnp.dtype(dtype).itemsize >= 4 or math.log2(scale).is_integer()


@functools.partial(jax.jit, static_argnums=(5,))
def _jit_attention(q, k, v, mask, bias, cfg: _Config) -> Array:
    # Jitted so that eager callers do not run the loops op by op.
    return _attention(q, k, v, mask, bias, cfg)


def blockwise_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    bias: Array | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> Array:
    """:func:`blockwise_attention` with the signature of ``ops.attention_core``."""
    return blockwise_attention(q, k, v, mask, bias, is_causal=is_causal, scale=scale)
