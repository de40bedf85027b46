"""Layout and tile helpers of the blockwise kernel (:mod:`attention_jax.kernels.blockwise`).

Internal layout (the matmuls of a tile are plain batched matmuls over ``[B, K]``,
with the G query heads of a key/value head folded into the row dimension)::

  q  [B, T, N, H] -> [nq, B, K, M, H]     M = block_q * G (row m is query m // G, head m % G)
  k  [B, S, K, H] -> [nk, B, K, bk, H]    bk = block_kv
  v  [B, S, K, V] -> [nk, B, K, bk, V]

A tile of scores is ``[B, K, M, bk]``, viewed elementwise as ``[B, K, bq, G, bk]``
(the layout in which masks and score_mods are evaluated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax import masks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one call; shapes are the unpadded ones."""

    T: int
    S: int
    K: int
    G: int
    block_q: int
    block_kv: int
    # q is multiplied by the scale once, before the loops (saves a pass over every
    # score tile); only where that is exact enough: float32+ or a power-of-two scale.
    prescale: bool = True

    @property
    def N(self) -> int:
        return self.K * self.G

    @property
    def nq(self) -> int:
        return -(-self.T // self.block_q)

    @property
    def nk(self) -> int:
        return -(-self.S // self.block_kv)

    @property
    def kv_padded(self) -> bool:
        return self.nk * self.block_kv != self.S


def pad_axis(x: Array, axis: int, size: int, value=0, mode: str = "constant") -> Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def block_q(q: Array, cfg: Config) -> Array:
    """``[B, T, K*G, X] -> [nq, B, K, block_q * G, X]`` (zero-padded rows)."""
    B, T, N, X = q.shape
    bq, nq = cfg.block_q, cfg.nq
    q = pad_axis(q, 1, nq * bq).reshape(B, nq, bq, cfg.K, cfg.G, X)
    return q.transpose(1, 0, 3, 2, 4, 5).reshape(nq, B, cfg.K, bq * cfg.G, X)


def unblock_q(x: Array, cfg: Config) -> Array:
    """Inverse of :func:`block_q`: ``[nq, B, K, block_q * G, X] -> [B, T, K*G, X]``."""
    nq, B, K, M, X = x.shape
    x = x.reshape(nq, B, K, cfg.block_q, cfg.G, X).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(B, nq * cfg.block_q, K * cfg.G, X)[:, : cfg.T]


def block_kv(x: Array, cfg: Config) -> Array:
    """``[B, S, K, X] -> [nk, B, K, block_kv, X]`` (zero-padded keys)."""
    B, S, K, X = x.shape
    bk, nk = cfg.block_kv, cfg.nk
    x = pad_axis(x, 1, nk * bk).reshape(B, nk, bk, K, X)
    return x.transpose(1, 0, 3, 2, 4)


def unblock_kv(x: Array, cfg: Config) -> Array:
    """``[nk, B, K, block_kv, X] -> [B, S, K, X]``."""
    nk, B, K, bk, X = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, X)[:, : cfg.S]


def group_tile(x: Array, cfg: Config, pad_value) -> Array:
    """A mask or bias broadcastable to ``[B, N, T, S]`` -> ``[B|1, K|1, Tp|1, G|1, Sp|1]``.

    Broadcast (size-1) dimensions stay size 1; full ones are padded to the
    block multiples with ``pad_value``.
    """
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    b, n, t, s = x.shape
    x = x.reshape(b, 1, 1, t, s) if n == 1 else x.reshape(b, cfg.K, cfg.G, t, s)
    x = x.transpose(0, 1, 3, 2, 4)  # [b, k, t, g, s]
    if t > 1:
        x = pad_axis(x, 2, cfg.nq * cfg.block_q, pad_value)
    if s > 1:
        x = pad_axis(x, 4, cfg.nk * cfg.block_kv, pad_value)
    return x


def ungroup_tile(dx: Array, shape: tuple[int, ...], cfg: Config) -> Array:
    """Inverse of :func:`group_tile` for the bias cotangent."""
    full = (1,) * (4 - len(shape)) + tuple(shape)
    _, _, t, s = full
    dx = dx[:, :, :t, :, :s].transpose(0, 1, 3, 2, 4)  # [b, k, g, t, s]
    return dx.reshape(shape)


def tile(x: Array | None, i, j, cfg: Config) -> Array | None:
    """The ``[.., block_q|1, G|1, block_kv|1]`` tile of a grouped mask/bias."""
    if x is None:
        return None
    if x.shape[2] > 1:
        x = lax.dynamic_slice_in_dim(x, i * cfg.block_q, cfg.block_q, axis=2)
    if x.shape[4] > 1:
        x = lax.dynamic_slice_in_dim(x, j * cfg.block_kv, cfg.block_kv, axis=4)
    return x


def padded_positions(pos: Array | None, length: int, padded: int) -> Array | None:
    """``[L]`` / ``[B, L]`` positions -> int32 ``[B|1, padded]`` (edge-padded), or None."""
    if pos is None:
        return None
    pos = jnp.asarray(pos, jnp.int32)
    pos = pos[None] if pos.ndim == 1 else pos
    return pad_axis(pos, 1, padded, mode="edge")


def tile_index(i, j, cfg: Config, B: int, q_pos, kv_pos, head_offset) -> masks.Index:
    """The :class:`attention_jax.masks.Index` of tile (i, j), in ``[B|1, K, bq, G, bk]`` layout."""
    bq, bk, K, G = cfg.block_q, cfg.block_kv, cfg.K, cfg.G
    i32 = jnp.int32
    q_idx = i * bq + lax.broadcasted_iota(i32, (1, 1, bq, 1, 1), 2)
    kv_idx = j * bk + lax.broadcasted_iota(i32, (1, 1, 1, 1, bk), 4)
    if q_pos is None:
        qp = q_idx
    else:
        qp = lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)[:, None, :, None, None]
    if kv_pos is None:
        kp = kv_idx
    else:
        kp = lax.dynamic_slice_in_dim(kv_pos, j * bk, bk, axis=1)[:, None, None, None, :]
    n = (lax.broadcasted_iota(i32, (1, K, 1, G, 1), 1) * G
         + lax.broadcasted_iota(i32, (1, K, 1, G, 1), 3))
    return masks.Index(
        b=lax.broadcasted_iota(i32, (B, 1, 1, 1, 1), 0),
        n=n + jnp.asarray(head_offset, i32), q_pos=qp, kv_pos=kp, q_idx=q_idx, kv_idx=kv_idx,
    )


def varying_axes(x: Array) -> frozenset:
    """Manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # earlier jax


def varying_like(x: Array, *refs) -> Array:
    """Marks a fresh loop carry (zeros, -inf) as varying over the manual mesh axes
    that ``refs`` vary over, so the loops type-check inside ``jax.shard_map``
    (with ``check_vma``); a no-op outside shard_map."""
    leaves = [r for r in jax.tree.leaves(refs) if hasattr(r, "dtype")]
    axes = frozenset().union(*(varying_axes(r) for r in leaves))
    missing = tuple(sorted(axes - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def sum_to(ct: Array, primal: Array) -> Array:
    """Inside ``jax.shard_map``: the cotangent of an input that is the same on every
    device (e.g. a bias shared by head shards) is the sum of the per-device
    cotangents (what autodiff does for the implicit broadcast). No-op elsewhere."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    return lax.psum(ct, extra) if extra else ct
