"""The ``dots`` section of the attention benchmark: the blockwise kernel's matmuls alone.

``attention-jax bench --sections dots``. A forward + backward pass of the blockwise
kernel (:mod:`attention_jax.kernels.block_loops`) does seven matrix products per
(query block, key block) tile, each batched over ``[B, K]``: two in the forward
pass (``q k^T``, ``p v``) and five in the backward pass, in its keys-by-queries
layout (``k q^T``, ``p^T do``, ``v do^T``, ``ds^T q``, ``k^T ds^T``). This section
times each product alone at the kernel's own tile shapes (the core section's
B=4, T=S=1024, N=K=8, H=64 and :func:`attention_jax.kernels.blockwise.default_block_sizes`):
one call computes one tile's product, in JAX (a jitted einsum) and in PyTorch
(``torch.matmul``, same threads), both allocating their output, interleaved with
the two complete forward + backward passes (``"auto"`` and
``F.scaled_dot_product_attention``). A product's time is its median call times the
number of tiles (the kernel runs each product once per tile). Inside the kernel's
loops a product may run faster or slower than alone (operands in cache, or copied
out of the blocks first): the section bounds the gap, it does not decompose it.
(A loop of the same product over the same operands measured about 3x faster in
JAX than distinct operands: a dot library may keep what it packed, so one call
per tile it is.)

It answers one question: how much of the gap between our forward + backward and
torch's is the matrix products themselves (XLA:CPU's dot library against torch's)
rather than what the kernel does around them. Rows: per product, JAX ms, torch
ms and their ratio; ``sum``: the seven added up; ``fwd+bwd``: the whole passes.
Each product's JAX and torch results are compared (``max_abs_diff``): the two
sides compute the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.benchmarks.attention_cases import (
    _ready,
    interleaved,
    jax_core_cases,
    random_qkv,
    torch_core_cases,
)
from attention_jax.kernels import blockwise

# name: (einsum of the kernel, operand letters), M = block_q * G rows, S = block_kv keys.
PRODUCTS = {
    "fwd q k^T": ("BKMH,BKSH->BKMS", "MH", "SH"),
    "fwd p v": ("BKMS,BKSH->BKMH", "MS", "SH"),
    "bwd k q^T": ("BKSH,BKMH->BKSM", "SH", "MH"),
    "bwd p^T do": ("BKSM,BKMH->BKSH", "SM", "MH"),
    "bwd v do^T": ("BKSH,BKMH->BKSM", "SH", "MH"),
    "bwd ds^T q": ("BKSM,BKMH->BKSH", "SM", "MH"),
    "bwd k^T ds^T": ("BKHS,BKSM->BKHM", "HS", "SM"),
}


def tile_operands(B, K, M, S, H, seed=0):
    """Random float32 operands of every product, ``{name: (a, b)}`` (NumPy)."""
    r = np.random.default_rng(seed)
    size = {"M": M, "S": S, "H": H}

    def arr(dims):
        return r.standard_normal((B, K, *(size[d] for d in dims))).astype(np.float32)

    return {name: (arr(a), arr(b)) for name, (_, a, b) in PRODUCTS.items()}


def jax_product(spec: str):
    """The product as a jitted ``(a, b) -> a . b`` (one tile)."""
    return jax.jit(lambda a, b: jnp.einsum(spec, a, b))


def torch_product(spec: str, a: np.ndarray, b: np.ndarray):
    """``run``: the same product of ``a`` and ``b`` with ``torch.matmul`` (one tile)."""
    import torch

    lhs, rhs = spec.split("->")[0].split(",")
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x).reshape(-1, *x.shape[2:]))
              for x in (a, b))
    if rhs[-1] == lhs[-1]:  # both contract their last letter: A @ B^T
        tb = tb.transpose(-1, -2)
    return lambda: torch.matmul(ta, tb)


def section_dots(args, bar):
    """The section (see the module docstring); ``args.shapes["core"]`` gives the shape."""
    import torch  # noqa: F401 (the torch side; fails here, not mid-section, without it)

    B, T, N, K, H = (args.shapes["core"][d] for d in "BTNKH")
    bq, bk = blockwise.default_block_sizes(T, T)
    tiles = -(-T // bq) * -(-T // bk)
    M = bq * (N // K)
    ops_ = tile_operands(B, K, M, bk, H)
    cases, checks = {}, {}
    for name, (spec, _, _) in PRODUCTS.items():
        a, b = ops_[name]
        fn, ja, jb = jax_product(spec), jnp.asarray(a), jnp.asarray(b)
        cases[f"jax {name}"] = lambda fn=fn, ja=ja, jb=jb: _ready(fn(ja, jb))
        cases[f"torch {name}"] = run = torch_product(spec, a, b)
        checks[name] = (lambda fn=fn, ja=ja, jb=jb: np.asarray(fn(ja, jb)),
                        lambda run=run: run().numpy())
    q, k, v = random_qkv(B, T, T, N, K, H)
    _, cases["jax fwd+bwd"] = jax_core_cases("auto", q, k, v, False)
    _, cases["torch fwd+bwd"] = torch_core_cases(q, k, v, False)
    res = interleaved(cases, args.reps, bar)
    rows = []
    for name, (spec, _, _) in PRODUCTS.items():  # one call is one tile: times the tiles
        j, t = (tiles * res[f"{side} {name}"]["median_ms"] for side in ("jax", "torch"))
        jax_out = checks[name][0]()
        torch_out = checks[name][1]().reshape(jax_out.shape)
        rows.append({"product": name, "einsum": spec, "jax_ms": j, "torch_ms": t,
                     "jax_over_torch": j / t,
                     "gflop_s_jax": 2 * B * K * M * bk * H * tiles / (j * 1e6),
                     "max_abs_diff": float(np.max(np.abs(jax_out - torch_out)))})
    js, ts = sum(r["jax_ms"] for r in rows), sum(r["torch_ms"] for r in rows)
    rows.append({"product": "sum", "jax_ms": js, "torch_ms": ts, "jax_over_torch": js / ts})
    jw, tw = res["jax fwd+bwd"]["median_ms"], res["torch fwd+bwd"]["median_ms"]
    rows.append({"product": "fwd+bwd", "jax_ms": jw, "torch_ms": tw, "jax_over_torch": jw / tw})
    return {"shape": dict(B=B, T=T, S=T, N=N, K=K, H=H, block_q=bq, block_kv=bk, tiles=tiles,
                          dtype="float32"),
            "rows": rows, "jax_dots_over_torch_fwd_bwd": js / tw,
            "results": {n: {k_: v_ for k_, v_ in r.items() if k_ != "all_ms"}
                        for n, r in res.items()}}


def dots_steps(args) -> int:
    return args.reps


def dots_table(result) -> list[dict]:
    """The section's rows for the terminal table."""
    return [{"product": r["product"], "jax ms": r["jax_ms"], "torch ms": r["torch_ms"],
             "jax / torch": r["jax_over_torch"],
             "GFLOP/s jax": r.get("gflop_s_jax", float("nan"))} for r in result["rows"]]
