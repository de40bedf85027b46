"""Cache layout: one query row attending to a token-major or a head-major cache.

The ``layout`` section of :mod:`attention_jax.benchmarks.decode`
(``attention-jax decode --sections layout``). The cache stores ``[B, K, S, H]``
(head-major, as torch's, :mod:`attention_jax.cache`); it stored ``[B, S, K, H]``
(token-major) before this comparison decided the layout. For each variant and S,
jitted and interleaved with the floor (a ``jnp.sum`` over the same bytes):

* ``token_major_ms``: ``ops.dot_product_attention(..., implementation="decode")``
  on ``[B, S, K, H]`` (reads it as ``[B, S, K*H]`` rows, in place);
* ``token_major_einsum_ms``: the einsum path (``implementation="xla"``) on the same;
* ``head_major_ms``: :func:`head_major_attention`, the einsums of ``[B, K, S, H]``.

Only the attention over a full cache is timed (no projections, no write), so the
rows say which layout reads closer to the floor; ``max_abs_diff`` checks that
the three compute the same thing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import ops


def head_major_attention(q, k, v):
    """Attention of ``q [B, T, N, H]`` to ``k [B, K, S, H]``, ``v [B, K, S, V]``.

    Returns:
      ``[B, T, N, V]`` in ``v``'s dtype; the softmax in float32.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    qg = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits * jnp.float32(ops.default_scale(H)), axis=-1)
    out = jnp.einsum("BKGTS,BKSV->BTKGV", w.astype(v.dtype), v)
    return out.reshape(B, T, N, v.shape[-1])


def layout_row(name: str, K: int, S: int, args, dtype, timed, batched) -> dict:
    """One variant at one S: the three contenders and the floor (ms, % of the floor)."""
    N, H = args.heads, args.head_dim
    kq, kk, kv = jax.random.split(jax.random.key(S + K), 3)
    q = jax.random.normal(kq, (args.batch, 1, N, H), dtype)
    k = jax.random.normal(kk, (args.batch, S, K, H), dtype)
    v = jax.random.normal(kv, (args.batch, S, K, H), dtype)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    nbytes = 2 * k.size * k.dtype.itemsize
    floor = jax.random.uniform(kq, (nbytes // 4,), jnp.float32)
    fns = {
        "token_major": (jax.jit(lambda q, k, v: ops.dot_product_attention(
            q, k, v, implementation="decode")), (q, k, v)),
        "token_major_einsum": (jax.jit(lambda q, k, v: ops.dot_product_attention(
            q, k, v, implementation="xla")), (q, k, v)),
        "head_major": (jax.jit(head_major_attention), (q, kh, vh)),
        "floor": (jax.jit(jnp.sum), (floor,)),
    }
    cases = {n: batched(lambda f=f, a=a: f(*a), jax.block_until_ready, args.inner)
             for n, (f, a) in fns.items()}
    ms = timed(cases, args.repeats, args.inner)
    outs = [np.asarray(f(*a), np.float32) for n, (f, a) in fns.items() if n != "floor"]
    row = dict(variant=name, K=K, S=S, dtype=jnp.dtype(dtype).name, kv_bytes=nbytes,
               floor_ms=ms["floor"], max_abs_diff=float(max(np.abs(o - outs[0]).max()
                                                            for o in outs)))
    for n in ("token_major", "token_major_einsum", "head_major"):
        row[f"{n}_ms"] = ms[n]
        row[f"{n}_pct_of_floor"] = 100 * ms["floor"] / ms[n]
    return row
