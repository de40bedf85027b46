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
# # 5. Cheaper attention: linear, Linformer, head gating, block-sparse patterns
#
# Softmax attention compares every query with every key: $T \times S$ scores per
# head. The seed articles list ways around that: *linear attention* (a feature
# map instead of the softmax, linear in $T$), *Linformer* (project the keys and
# values along the sequence to a fixed length $P$), *dynamic head gating* (switch
# heads off per input) and *block-sparse / random* patterns (each query block
# sees a few key blocks only; BigBird mixes a band, global and random blocks).
#
# `attention_jax.variants` builds the first three on the projections of
# `MultiHeadAttention` (same parameters, same GQA grouping $[B, T, K, G, H]$), so a
# trained MHA layer converts to each of them. This notebook checks the identities
# that pin each variant down, then reads the study that trains them all on the
# same tasks (`experiments/variants_study.py`).

# %%
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

import attention_jax as aj
from attention_jax import masks, variants

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments").is_dir())
print(f"jax {jax.__version__} on {jax.default_backend()}; repository at {ROOT}")

# %% [markdown]
# ## Linear attention: one formula, two ways to run it
#
# With $\phi(x) = \mathrm{elu}(x) + 1$, causal linear attention is
# $\mathrm{out}_t = \phi(q_t)^\top S_t / (\phi(q_t)^\top z_t)$ with the running sums
# $S_t = \sum_{s \le t} \phi(k_s) v_s^\top$ ($[K, H, V]$ per row) and
# $z_t = \sum_{s \le t} \phi(k_s)$. Training runs it in parallel, in chunks;
# decoding carries $(S, z)$ from token to token. Both must give the same outputs,
# and the state must not grow with the length (no KV cache).

# %%
D, N, K, B, T = 32, 4, 2, 2, 12
lin = variants.LinearAttention(D, N, num_kv_heads=K, chunk_size=4, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (B, T, D))
parallel = lin(x, is_causal=True)

state = lin.init_state(B)
step = nnx.jit(lambda m, x, s: m.decode(x, s))
outs = []
for t in range(T):
    y, state = step(lin, x[:, t:t + 1], state)
    outs.append(y)
err = float(jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - parallel)))
print(f"linear attention: chunked parallel vs token-by-token recurrence, max |dy| = {err:.1e}")
print(f"state after {T} tokens: kv {state.kv.shape}, z {state.z.shape} (the same after 10^6)")
assert err < 1e-5

# %% [markdown]
# ## Linformer: identity projections give back dense attention
#
# Linformer attends to $E k$ and $F v$, with $E, F$ of shape $[P, S]$. With $P = S$
# and $E = F = I$ nothing is projected away, so the output must be ordinary
# non-causal attention. Linformer has no causal form: each projected key mixes all
# positions, the future included.

# %%
S = 16
mha = aj.MultiHeadAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(2))
lf = variants.from_mha(mha, "linformer", max_length=S, projected_length=S)
lf.e_proj[...] = jnp.eye(S)
lf.f_proj[...] = jnp.eye(S)
xs = jax.random.normal(jax.random.key(3), (B, S, D))
err = float(jnp.max(jnp.abs(lf(xs) - mha(xs))))
print(f"Linformer, identity projections vs dense attention: max |dy| = {err:.1e}")
assert err < 1e-5

# compiled scratch memory of one forward+backward at T = 1024: T x S scores vs T x P
T_long = 1024
x_long = jax.random.normal(jax.random.key(4), (1, T_long, D))
for name, layer in (
        ("dense (einsum)", aj.MultiHeadAttention(D, N, num_kv_heads=K, implementation="xla",
                                                 rngs=nnx.Rngs(0))),
        ("Linformer P=64", variants.LinformerAttention(D, N, num_kv_heads=K, max_length=T_long,
                                                       projected_length=64, rngs=nnx.Rngs(0))),
        ("linear", variants.LinearAttention(D, N, num_kv_heads=K, rngs=nnx.Rngs(0)))):
    gd, st = nnx.split(layer)
    grad = jax.jit(jax.grad(lambda st, x, gd=gd: jnp.sum(nnx.merge(gd, st)(x) ** 2)))
    mem = grad.lower(st, x_long).compile().memory_analysis()
    print(f"{name:15s} fwd+bwd temporary memory at T={T_long}: "
          f"{mem.temp_size_in_bytes / 2**20:7.1f} MiB")

# %% [markdown]
# ## Head gating
#
# A gate per batch row and head, $g = \sigma(\bar x W_g + b_g)$ from the mean of the
# input over the sequence. Soft gates scale each head's output; hard gates are
# $1[g > \text{threshold}]$ with a straight-through gradient. Converted from an MHA,
# the gates start on (bias 2, $\sigma(2) = 0.88 > 0.5$), so the gated layer *is* the
# MHA, bit for bit. With gates off, an eager call computes only the heads that are
# on in some row; under `jit` the gates are traced, so every head is computed and
# the inactive ones are multiplied by zero.

# %%
gated = variants.from_mha(mha, "gated", hard=True)
err = float(jnp.max(jnp.abs(gated(xs) - mha(xs))))
print(f"gated, all gates on vs MultiHeadAttention: max |dy| = {err}")
assert err == 0.0

gates = jnp.array([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.8, 0.1]])  # row 0: head 0, row 1: head 2
active = np.asarray(gates) > gated.threshold
kv_heads, q_heads = variants.select_heads(active, gated.num_kv_heads)
print(f"active heads per row {active.astype(int).tolist()}: compute kv heads {kv_heads}, "
      f"query heads {q_heads} (of {N})")
eager = gated(xs, gates=gates)
traced = nnx.jit(lambda m, x, g: m(x, gates=g))(gated, xs, gates)
print(f"eager (active heads only) vs jit (all heads, masked): max |dy| = "
      f"{float(jnp.max(jnp.abs(eager - traced))):.1e}")

# %% [markdown]
# ## Block-sparse patterns
#
# The mask engine's `BlockSparse` layouts (True = the query block sees the key
# block): a band, random blocks drawn per head from a seed, and BigBird (band +
# global + random). The fraction of True blocks is the fraction of the score
# matrix a block-skipping kernel computes.

# %%
if hasattr(masks, "BlockSparse"):
    nb = 16
    layouts = {
        "window": masks.BlockSparse.local_global(nb, nb, 128, window=2, num_global=0),
        "random (head 0)": masks.BlockSparse.random(nb, nb, 128, num_random=2, num_heads=N),
        "bigbird (head 0)": masks.BlockSparse.bigbird(1, 1, 1, num_q_blocks=nb,
                                                      num_kv_blocks=nb, block_q=128,
                                                      num_heads=N),
    }
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, (name, m) in zip(axes, layouts.items(), strict=True):
        ax.imshow(m.array[0], cmap="Blues")
        ax.set_title(f"{name}: density {m.array.mean():.2f}", fontsize=10)
        ax.set_xlabel("key block")
    axes[0].set_ylabel("query block")
    plt.tight_layout()
    plt.show()
else:
    print("attention_jax.masks.BlockSparse is not available in this version")

# %% [markdown]
# ## The study
#
# `experiments/variants_study.py` trains one layer of each variant on a long-range
# task (associative recall: the answer to a query sits anywhere in the sequence)
# and a local one (output the previous token), with the same budget, at
# $T \in \{512, 2048, 8192\}$, and measures each layer's forward+backward time and
# compiled temporary memory. The committed CPU run is read here; regenerate it with
# `python experiments/variants_study.py --out experiments/results --name variants_study_cpu`
# (about ten minutes), or `--quick` for a one-minute smoke run.

# %%
path = ROOT / "experiments" / "results" / "variants_study_cpu.json"
if path.exists():
    study = json.loads(path.read_text())
    display(Markdown((path.with_suffix(".md")).read_text()))
    rows = study["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["T"])
        axes[0].plot([r["T"] for r in mine], [r["fwd_bwd_ms"] for r in mine], "o-", label=name)
        axes[1].plot([r["T"] for r in mine], [r["recall_acc"] for r in mine], "o-", label=name)
    for ax, title in zip(axes, ("fwd+bwd ms (shared CPU)", "recall accuracy"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    print(f"study run: {study['uptime']}")
else:
    print(f"no committed study at {path}")
