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
# # 4. Decoding with a key/value cache, and turning MHA into GQA
#
# A language model generates one token at a time. Without a cache, step $t$
# would recompute the keys and values of all $t$ previous tokens; with one, it
# computes them for the new token only, appends them to a buffer, and lets the
# new query attend to the whole buffer. The buffer holds $K (H + V)$ numbers per
# token and layer, and every step reads all of it. That read is why the number
# of key/value heads $K$ matters so much when decoding, and why MQA and GQA were
# invented.
#
# This notebook shows the cache of `attention_jax` at work, shrinks it further
# with int8 storage, converts a trained MHA layer to GQA and MQA, and looks at
# how well "uptraining" (a short extra training after the conversion) recovers
# the accuracy.

# %%
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

import attention_jax as aj
from attention_jax import convert

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "experiments").is_dir())
print(f"jax {jax.__version__} on {jax.default_backend()}; repository at {ROOT}")

# %% [markdown]
# ## The cache
#
# A GQA layer ($D = 32$, $N = 4$ query heads, $K = 2$ key/value heads, $H = 8$) with
# rotary position embeddings, so that positions matter: a token's key depends on
# where it sits, and the cache must put every token at the right place.
#
# `init_cache(batch, max_length)` returns an empty `KVCache`, a pytree of plain
# arrays: keys `[B, K, L, H]`, values `[B, K, L, V]` and the number of tokens each
# row holds. It is sized by $K$, not $N$. `decode(x, cache)` takes new tokens,
# writes their keys and values at each row's current length, and returns the
# outputs and the updated cache; nothing is hidden in the module.

# %%
D, N, K, H = 32, 4, 2, 8
B, T, L = 2, 12, 16  # batch, tokens, cache capacity
layer = aj.MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rope=10_000.0,
                              rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (B, T, D))

cache = layer.init_cache(batch_size=B, max_length=L)
print(f"k {cache.k.shape}, v {cache.v.shape}, lengths {cache.lengths.tolist()}, "
      f"{cache.nbytes} bytes ({cache.bytes_per_token} per token and row)")

# %% [markdown]
# We feed the first 8 tokens at once (the *prefill* of a prompt), then the other
# 4 one by one, as a generator would. The outputs must be those of one causal
# forward over all 12 tokens, which has no cache at all.

# %%
PROMPT = 8
y_full = layer(x, is_causal=True)  # [B, T, D], no cache

y_prompt, cache = layer.decode(x[:, :PROMPT], cache)
print(f"after the prefill: lengths {cache.lengths.tolist()}")
steps = [y_prompt]
for t in range(PROMPT, T):
    y_t, cache = layer.decode(x[:, t:t + 1], cache)
    steps.append(y_t)
    print(f"after token {t}: lengths {cache.lengths.tolist()}")
y_cached = jnp.concatenate(steps, axis=1)

err = float(jnp.max(jnp.abs(y_cached - y_full)))
print(f"prefill + {T - PROMPT} steps vs full causal forward: max |difference| = {err:.1e}")
assert err < 1e-5

# %% [markdown]
# In a real generator the step is compiled once with `nnx.jit` and the cache is
# donated (`donate_argnums`) so that XLA updates it in place. Rows of a batch may
# hold different numbers of tokens (`decode(..., valid_lengths=...)` for prompts
# of different lengths); see `attention_jax/cache.py`.
#
# ## An int8 cache
#
# `init_cache(..., dtype=jnp.int8)` stores every key and value vector (one token,
# one head) as 8-bit integers with one scale $s = \max|x| / 127$ per vector, kept
# in bfloat16, and converts back when reading. Per token that costs
# $K(H + V)$ bytes plus $2K$ scales of 2 bytes, against $2K(H + V)$ bytes in
# bfloat16 and $4K(H + V)$ in float32. For a realistic head size:

# %%
BIG_D, BIG_N, BIG_H = 1024, 16, 64
print(f"bytes per token and layer, D={BIG_D}, N={BIG_N}, H={BIG_H}")
print(f"{'':>11} " + " ".join(f"{d:>9}" for d in ("float32", "bfloat16", "int8")))
for name, kv_heads in (("MHA (K=16)", 16), ("GQA (K=4)", 4), ("MQA (K=1)", 1)):
    m = nnx.eval_shape(lambda kv_heads=kv_heads: aj.MultiHeadAttention(
        BIG_D, BIG_N, num_kv_heads=kv_heads, head_dim=BIG_H, rngs=nnx.Rngs(0)))
    sizes = [m.init_cache(1, 1, dtype).bytes_per_token
             for dtype in (jnp.float32, jnp.bfloat16, jnp.int8)]
    print(f"{name:>11} " + " ".join(f"{s:>9,}" for s in sizes))
    assert sizes[2] == kv_heads * (2 * BIG_H + 8)  # K (H + V) int8 + 2 K float32 scales

# %% [markdown]
# What does rounding to 8 bits cost? We decode the same 12 tokens through an int8
# cache and compare with the float32 cache. Each stored element is off by at
# most about half a quantisation step, $s/2$; the outputs move by a fraction of
# a percent of their size.

# %%
cache8 = layer.init_cache(batch_size=B, max_length=L, dtype=jnp.int8)
y8, cache8 = layer.decode(x[:, :PROMPT], cache8)
steps8 = [y8]
for t in range(PROMPT, T):
    y_t, cache8 = layer.decode(x[:, t:t + 1], cache8)
    steps8.append(y_t)
y_int8 = jnp.concatenate(steps8, axis=1)

k_back = aj.cache.dequantize_int8(cache8.k, cache8.k_scale)[:, :, :T]  # [B, K, T, H]
k_err = jnp.abs(k_back - cache.k[:, :, :T])
half_step = cache8.k_scale[:, :, :T, None].astype(jnp.float32) / 2
print(f"cache bytes: float32 {cache.nbytes}, int8 {cache8.nbytes} "
      f"({cache8.nbytes / cache.nbytes:.0%})")
print(f"stored keys: max error {float(k_err.max()):.1e}; "
      f"max error / half step {float((k_err / half_step).max()):.2f}")
out_err = float(jnp.max(jnp.abs(y_int8 - y_cached)))
out_scale = float(jnp.max(jnp.abs(y_cached)))
print(f"outputs: max |int8 - float32| = {out_err:.1e} (outputs up to {out_scale:.2f}, "
      f"{out_err / out_scale:.2%})")
assert 0 < out_err < 0.01 * out_scale  # quantised (not exact), and close
assert float((k_err / half_step).max()) < 1.05  # half a step, bf16-rounded scales

# %% [markdown]
# ## From MHA to GQA and MQA
#
# Training a GQA model from scratch is one option. The GQA paper (Ainslie et al.,
# 2023) proposed a cheaper one: take a trained MHA checkpoint, merge its
# key/value heads group by group, and train a little more. `attention_jax.convert`
# does the merge:
#
# * `convert.mha_to_gqa(module, K, method)`: query heads $jG \dots jG + G - 1$ share
#   the new key/value head $j$, built from the $G$ old heads of that group by
#   `"mean"` (average of their kernels and biases, the paper's choice),
#   `"first"` (keep the first) or `"random"` (a fresh head; the baseline);
# * `convert.mha_to_mqa(module, method)`: the same with $K = 1$;
# * `convert.gqa_to_mha(module)`: the reverse, exact, by repeating each head.
#
# The query and output projections are copied unchanged.

# %%
mha = aj.MultiHeadAttention(D, N, head_dim=H, rope=10_000.0, rngs=nnx.Rngs(2))
y_mha = mha(x, is_causal=True)
change = {}
for target, K_new in (("GQA", 2), ("MQA", 1)):
    for method in ("mean", "first", "random"):
        new = convert.mha_to_gqa(mha, K_new, method, rngs=nnx.Rngs(3))
        rel = float(jnp.linalg.norm(new(x, is_causal=True) - y_mha) / jnp.linalg.norm(y_mha))
        print(f"{target} K={new.num_kv_heads} by {method:6s}: k_kernel {new.k_kernel.shape}, "
              f"relative change of the output {rel:.2f}")
        change[target, method] = rel
    assert change[target, "mean"] < change[target, "random"]

gqa = convert.mha_to_gqa(mha, 2)
back = convert.gqa_to_mha(gqa)
err = float(jnp.max(jnp.abs(back(x, is_causal=True) - gqa(x, is_causal=True))))
print(f"gqa_to_mha(mha_to_gqa(mha)): K={back.num_kv_heads}, max |difference from the GQA| "
      f"= {err:.1e}")
assert err < 1e-5

# %% [markdown]
# On this untrained layer the heads of a group have nothing in common, so every
# merge changes the output a lot; the mean changes it least, a fresh head most.
# Whether the merged heads are a good starting point for further training is
# what the uptraining experiment measures.
#
# ## Uptraining: the committed experiment
#
# `experiments/uptrain_gqa.py` trains a small attention-only model (two layers,
# $N = 8$ heads with rope) on *multi-query associative recall*: the input lists
# key/value token pairs, then asks for the keys again in a random order, and at
# each query the model must output the paired value. Solving it takes an
# induction circuit: heads that copy each key next to its value, and heads that
# match a query against those keys. After training as MHA, every layer is
# converted to $K = 4, 2, 1$ by each method, evaluated, trained for another 5%
# of the original steps ("uptrained") and evaluated again. The results are
# committed in `experiments/results/uptrain_gqa.json`:

# %%
RESULTS = ROOT / "experiments" / "results" / "uptrain_gqa.json"
result = json.loads(RESULTS.read_text())
print("keys:", sorted(result), "| config:", {k: v for k, v in result["config"].items()
                                               if k != "out"})
print("a row:", {k: v for k, v in result["rows"][1].items() if k != "curve"})


def load_script(path: Path, name: str):
    """Imports a script file as a module (``experiments/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


uptrain = load_script(ROOT / "experiments" / "uptrain_gqa.py", "experiments_uptrain_gqa")
display(Markdown(uptrain.summarize(result)))

# %% [markdown]
# The first row (`-`) is the MHA model itself, with its training curve (the loss
# every 10 steps). The other rows are the conversions:

# %%
rows = result["rows"]
base = next(r for r in rows if r["method"] == "-")
conv = [r for r in rows if r["method"] != "-"]
kvs = sorted({r["K"] for r in conv}, reverse=True)
methods = list(uptrain.METHODS)
chance = 1 / result["config"]["num_values"]

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
axes[0].plot(10 * np.arange(len(base["curve"])), base["curve"], color="k")
axes[0].set_yscale("log")
axes[0].set_xlabel("training step")
axes[0].set_ylabel("training loss (query positions)")
axes[0].set_title(f"MHA training ({result['config']['steps']} steps)")
width = 0.8 / len(methods)
for ax, field, title in ((axes[1], "acc_0", "right after conversion"),
                         (axes[2], "acc_up", f"after {result['uptrain_steps']} uptraining steps")):
    for i, method in enumerate(methods):
        acc = [np.mean([r[field] for r in conv if r["K"] == kv and r["method"] == method])
               for kv in kvs]
        ax.bar(np.arange(len(kvs)) + i * width, acc, width, label=method)
    ax.axhline(base["acc_0"], color="k", ls="--", label="MHA")
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xticks(np.arange(len(kvs)) + width * (len(methods) - 1) / 2,
                  [f"K={kv}" for kv in kvs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("query accuracy")
    ax.set_title(title)
axes[1].legend(fontsize=8)
fig.suptitle(f"MHA (N={result['config']['heads']}) -> GQA / MQA on associative recall")
fig.tight_layout()
plt.show()

# %% [markdown]
# Right after conversion every model has lost most of its accuracy: the recall
# circuit depends on the individual heads' keys and values, and merging heads
# changes them. The short uptraining separates the methods. Mean pooling
# recovers most of the accuracy at $K = 4$ and a good part at $K = 2$, while
# fresh key/value heads stay near chance in the same budget: the averaged heads
# are a far better starting point than random ones. With a single key/value
# head (MQA) even mean pooling stays far below MHA after this budget. The checks
# below hold these statements to the committed numbers.

# %%
def acc_up(kv: int, method: str) -> float:
    return float(np.mean([r["acc_up"] for r in conv if r["K"] == kv and r["method"] == method]))


for kv in kvs:
    print(f"K={kv}: after uptraining, mean {acc_up(kv, 'mean'):.3f}, "
          f"first {acc_up(kv, 'first'):.3f}, random {acc_up(kv, 'random'):.3f}")
    assert acc_up(kv, "mean") > max(acc_up(kv, "first"), acc_up(kv, "random"))
assert all(r["acc_0"] < 0.5 * base["acc_0"] for r in conv)
assert all(acc_up(kv, "random") < 5 * chance for kv in kvs)
assert acc_up(max(kvs), "mean") > 0.8 > acc_up(1, "mean")

# %% [markdown]
# ## A small live run
#
# The committed run takes minutes. Here is a miniature of it that takes
# seconds, with the experiment's own model and training loop: 4 pairs, one
# narrow model, 150 training steps as MHA, then a conversion to $K = 2$ by
# `"mean"` and by `"random"` and 30 uptraining steps each. It is far too short to
# learn the task well; watch where the two uptraining curves start.

# %%
task = uptrain.Task(pairs=4, num_keys=16, num_values=16)
model = uptrain.Model(task.vocab, 32, 4, 2, 10_000.0, rngs=nnx.Rngs(0))
pre_curve = uptrain.train(model, task, 150, lr=3e-3, batch_size=32,
                          key=jax.random.key(1), warmup=15)
eval_batch = task.batch(jax.random.key(10_000), 512)
loss, acc = map(float, uptrain.evaluate(model, *eval_batch))
print(f"MHA after 150 steps: loss {loss:.3f}, accuracy {acc:.3f} "
      f"(chance {1 / task.num_values:.3f})")

up_curves = {}
for method in ("mean", "random"):
    converted = uptrain.convert_model(model, 2, method, seed=0)
    l0, a0 = map(float, uptrain.evaluate(converted, *eval_batch))
    up_curves[method] = uptrain.train(converted, task, 30, lr=1e-3, batch_size=32,
                                      key=jax.random.key(777), warmup=3)
    l1, a1 = map(float, uptrain.evaluate(converted, *eval_batch))
    print(f"K=2 by {method:6s}: converted loss {l0:.3f} acc {a0:.3f} -> "
          f"uptrained loss {l1:.3f} acc {a1:.3f}")
assert all(np.isfinite(c).all() for c in (pre_curve, *up_curves.values()))

fig, ax = plt.subplots(figsize=(7, 3.4))
ax.plot(range(len(pre_curve)), pre_curve, color="k", label="MHA training")
for method, curve in up_curves.items():
    ax.plot(range(len(pre_curve), len(pre_curve) + len(curve)), curve,
            label=f"K=2, {method} init")
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.legend()
ax.set_title("live miniature: MHA, then conversion to GQA and uptraining")
fig.tight_layout()
plt.show()
