# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. One module, three kinds of attention: MHA, GQA and MQA
#
# Multi-head attention gives every one of its $N$ query heads its own key and
# value head. Multi-query attention (MQA) keeps the $N$ query heads but lets all
# of them read a single key/value head. Grouped-query attention (GQA) sits in
# between: the query heads are split into $K$ groups of $G = N / K$ heads, and the
# heads of one group share a key/value head.
#
# In `attention_jax` these are not three classes but one, `MultiHeadAttention`,
# with a `num_kv_heads` argument $K$ that must divide $N$:
#
# | name | $K$ | query head $n$ reads key/value head |
# |------|-----|-------------------------------------|
# | MHA  | $N$ | $n$ |
# | GQA  | $1 < K < N$ | $\lfloor n / G \rfloor$ |
# | MQA  | $1$ | $0$ |
#
# With the head dimension $H$ and $j = \lfloor n/G \rfloor$, query head $n$ computes
#
# $$\operatorname{softmax}\!\big(q_n k_j^\top / \sqrt{H}\big)\, v_j ,$$
#
# and the output projection mixes the $N$ heads back into the model width $D$.
#
# This notebook builds the three variants from one seed, looks at their attention
# maps, counts what shrinking $K$ saves, and checks the results against PyTorch.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import attention_jax as aj
from attention_jax import convert, interop

print(f"jax {jax.__version__}, backend {jax.default_backend()}")

# %% [markdown]
# ## Three variants from one seed
#
# A tiny layer: width $D = 32$, $N = 4$ query heads of size $H = 8$. The three
# modules differ only in $K$. Biases are drawn at random (instead of the default
# zeros) so that the comparison with PyTorch below also checks where they go.

# %%
D, N, H = 32, 4, 8
B, T = 1, 10
VARIANTS = {"MHA": 4, "GQA": 2, "MQA": 1}  # name -> K


def build(num_kv_heads: int) -> aj.MultiHeadAttention:
    """The layer with ``num_kv_heads`` key/value heads; the same seed for every K."""
    return aj.MultiHeadAttention(
        D, N, num_kv_heads=num_kv_heads, head_dim=H,
        bias_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(0),
    )


modules = {name: build(K) for name, K in VARIANTS.items()}
x = jax.random.normal(jax.random.key(1), (B, T, D))  # one input for all three

for name, m in modules.items():
    print(f"{name}: N={m.num_heads} K={m.num_kv_heads} G={m.num_groups}  "
          f"q_kernel {m.q_kernel.shape}  k_kernel {m.k_kernel.shape}  "
          f"v_kernel {m.v_kernel.shape}  o_kernel {m.o_kernel.shape}")

# %% [markdown]
# The parameters are drawn in a fixed order (q, k, v, o), so with one seed the
# query and output projections are the same numbers in all three modules; only
# the key/value kernels differ, and only in how many heads they have.

# %%
mha, gqa, mqa = (modules[name] for name in VARIANTS)
for name in ("q_kernel", "o_kernel"):
    same = all(np.array_equal(getattr(mha, name)[...], getattr(m, name)[...])
               for m in (gqa, mqa))
    print(f"{name} identical across MHA, GQA and MQA: {same}")
    assert same

# %% [markdown]
# ## Attention maps, head by head
#
# `return_weights=True` also returns the softmax weights, shaped
# `[B, N, T, S]`: one $T \times S$ map per query head. We use causal attention, so
# every map is lower triangular (a token sees itself and the tokens before it).
#
# In MQA the four heads share one key head, yet their maps differ: each head has
# its own queries. In GQA heads 0 and 1 share key head 0 and heads 2 and 3 share
# key head 1. Sharing keys does not make heads identical; it constrains what
# they can look for.

# %%
outputs, weights = {}, {}
for name, m in modules.items():
    outputs[name], weights[name] = m(x, is_causal=True, return_weights=True)
    print(f"{name}: y {outputs[name].shape}, weights {weights[name].shape}")

fig, axes = plt.subplots(len(VARIANTS), N, figsize=(2.4 * N, 2.4 * len(VARIANTS)))
for row, (name, w) in enumerate(weights.items()):
    K = VARIANTS[name]
    for n in range(N):
        ax = axes[row, n]
        ax.imshow(np.asarray(w[0, n]), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"{name} head {n} (kv {n // (N // K)})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[row, 0].set_ylabel("query position")
for ax in axes[-1]:
    ax.set_xlabel("key position")
fig.suptitle("Causal attention weights per query head (same input, same seed)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each row of a map is a probability distribution over the keys it may see:

# %%
for name, w in weights.items():
    row_sums = np.asarray(w.sum(axis=-1))
    print(f"{name}: rows sum to 1 within {np.max(np.abs(row_sums - 1)):.1e}")
    assert np.allclose(row_sums, 1.0, atol=1e-5)

# %% [markdown]
# ## GQA is MHA with repeated key/value heads
#
# Since query head $n$ reads key/value head $\lfloor n/G \rfloor$, a GQA layer computes
# exactly what an MHA layer computes whose key/value heads are copies:
# `convert.gqa_to_mha` builds that MHA by repeating each key/value head $G$ times.
# The outputs agree to rounding; the cost, as the next section shows, does not.

# %%
for name in ("GQA", "MQA"):
    as_mha = convert.gqa_to_mha(modules[name])
    err = float(jnp.max(jnp.abs(as_mha(x, is_causal=True) - outputs[name])))
    print(f"{name} -> MHA with K={as_mha.num_kv_heads}: max |difference| = {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ## What shrinking K saves
#
# Two numbers change with $K$: the parameters of the key and value projections
# ($D \cdot K \cdot H$ each) and the key/value cache that decoding keeps for every
# token seen so far: $K (H + V)$ numbers per token and layer
# (`module.kv_bytes_per_token(dtype)`). The second one is why GQA exists: while
# generating, every step reads the whole cache, and that read, not arithmetic,
# is what limits the speed.
#
# We count for a layer of the size of a 7-billion-parameter model ($D = 4096$,
# $N = 32$, $H = 128$). `nnx.eval_shape` builds the module abstractly: shapes
# only, no memory, no random numbers.

# %%
BIG = dict(D=4096, N=32, H=128)
LAYERS, CONTEXT = 32, 8192
rows = []
for K in (32, 8, 4, 1):
    m = nnx.eval_shape(lambda K=K: aj.MultiHeadAttention(
        BIG["D"], BIG["N"], num_kv_heads=K, head_dim=BIG["H"], use_bias=False,
        rngs=nnx.Rngs(0)))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    kv = m.kv_bytes_per_token(jnp.bfloat16)
    rows.append((K, params, kv, kv * LAYERS * CONTEXT / 2**30))

print(f"layer D={BIG['D']}, N={BIG['N']}, H={BIG['H']}; cache in bfloat16")
print(f"{'K':>3} {'params/layer':>13} {'KV bytes/token/layer':>21} "
      f"{f'cache GiB ({LAYERS} layers x {CONTEXT} tokens)':>36}")
for K, params, kv, gib in rows:
    print(f"{K:>3} {params:>13,} {kv:>21,} {gib:>36.2f}")

# The cache shrinks exactly by K / N; K = 8 removes 3/8 of the layer's parameters.
assert all(kv * BIG["N"] == rows[0][2] * K for K, _, kv, _ in rows)
assert (rows[0][1] - rows[1][1]) * 8 == rows[0][1] * 3

# %%
labels = [f"K={K}" for K, *_ in rows]
fig, (ax_p, ax_c) = plt.subplots(1, 2, figsize=(9, 3.2))
ax_p.bar(labels, [p / 1e6 for _, p, _, _ in rows], color="tab:blue")
ax_p.set_ylabel("parameters per layer (millions)")
ax_p.set_title("parameters")
ax_c.bar(labels, [kv / 1024 for _, _, kv, _ in rows], color="tab:orange")
ax_c.set_ylabel("KiB per token per layer (bf16)")
ax_c.set_title("key/value cache")
fig.suptitle(f"N={BIG['N']} query heads, K key/value heads")
fig.tight_layout()
plt.show()

# %% [markdown]
# The key and value projections are half of an MHA layer's parameters. Going
# from MHA ($K = 32$) to $K = 8$ removes three quarters of them, hence three
# eighths of the layer, since the query and output projections stay; the cache,
# though, is divided by four, and MQA divides it by 32.
#
# ## The same numbers as PyTorch
#
# Two live checks, if PyTorch is installed:
#
# 1. MHA against `torch.nn.MultiheadAttention`. `interop.to_torch` builds the torch
#    layer holding our weights; we compare outputs and per-head weights.
# 2. All three variants against a reference written with torch's own primitives:
#    `nn.functional.linear` projections (weights taken out by
#    `interop.to_linear_weights`, in torch's `[out, in]` layout) and
#    `nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`, which
#    pairs query head $n$ with key/value head $\lfloor n / G \rfloor$ as we do.

# %%
try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None
    print("PyTorch is not installed: the live comparison is skipped (pip install torch).")

TOL = 1e-5  # float32, these sizes

# %%
if torch is not None:
    torch_mha = interop.to_torch(mha).eval()
    xt = torch.from_numpy(np.array(x))  # a writable copy
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        y_t, w_t = torch_mha(xt, xt, xt, attn_mask=blocked, need_weights=True,
                             average_attn_weights=False)
    err_y = float(np.max(np.abs(y_t.numpy() - np.asarray(outputs["MHA"]))))
    err_w = float(np.max(np.abs(w_t.numpy() - np.asarray(weights["MHA"]))))
    print(f"MHA vs torch.nn.MultiheadAttention: max |dy| = {err_y:.1e}, "
          f"max |d weights| = {err_w:.1e}")
    assert err_y < TOL and err_w < TOL


# %%
def torch_reference(module: aj.MultiHeadAttention, x: np.ndarray):
    """Causal self-attention in torch from the module's weights: ``[B, T, D] -> [B, T, D]``."""
    w = {p: (torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b))
         for p, (a, b) in interop.to_linear_weights(module).items()}
    xt = torch.from_numpy(np.array(x))
    Bx, Tx, _ = xt.shape
    Nm, Km, Hm, Vm = module.num_heads, module.num_kv_heads, module.head_dim, module.v_head_dim
    q = F.linear(xt, *w["q"]).view(Bx, Tx, Nm, Hm).transpose(1, 2)  # [B, N, T, H]
    k = F.linear(xt, *w["k"]).view(Bx, Tx, Km, Hm).transpose(1, 2)  # [B, K, T, H]
    v = F.linear(xt, *w["v"]).view(Bx, Tx, Km, Vm).transpose(1, 2)  # [B, K, T, V]
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.linear(o.transpose(1, 2).reshape(Bx, Tx, Nm * Vm), *w["o"])  # [B, T, D]


if torch is not None:
    with torch.no_grad():
        for name, m in modules.items():
            err = float(np.max(np.abs(torch_reference(m, x).numpy() - np.asarray(outputs[name]))))
            print(f"{name} (K={m.num_kv_heads}) vs torch SDPA(enable_gqa=True): "
                  f"max |dy| = {err:.1e}")
            assert err < TOL

# %% [markdown]
# All differences are at the level of float32 rounding. The tests in `tests/`
# check the same equivalences over many more shapes, masks, dtypes and
# gradients; this notebook shows them once, on numbers you can look at.
