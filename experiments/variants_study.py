"""What each cheaper attention buys on this machine: the seed articles' variants side by side.

One layer of each variant (same projections, D=32, N=4 query heads, K=2 kv heads,
bidirectional), inside embeddings + sinusoidal positions -> attention (residual)
-> LayerNorm -> read-out, trained with the same budget (AdamW, same steps and
batch per length) on two synthetic tasks at T in {512, 2048, 8192}:

* ``recall`` (long range): multi-query associative recall with the pairs as
  single tokens: P pair tokens ``(key, value)`` at random positions in the first
  half of a sequence of noise tokens, P query tokens (keys) at the end; the
  answer is the value paired with the query, so a query must find one token
  anywhere in the sequence (chance 1/8);
* ``local``: the same recall, but each query comes 1..32 tokens after its pair
  (one pair per segment of T/4 tokens), so a band of neighbours suffices (chance
  1/8). Both tasks share the vocabulary, hence one compiled program per variant.

Variants: ``dense`` (``MultiHeadAttention``, ``implementation="blockwise"``),
``window`` (a band of one 128-token block each side), ``random`` (2 random key
blocks per query block and head), ``bigbird`` (band + 1 global + 1 random block),
``linformer`` (P = 64), ``linear`` (elu + 1), ``gated`` (hard head gates,
straight-through, with a penalty on the mean gate). The block patterns are
:class:`attention_jax.masks.BlockSparse` when that exists; they are passed as mask
objects when :func:`attention_jax.ops.dot_product_attention` takes them, else as
their dense ``[1, N, T, S]`` boolean array (same outputs, no skipped tiles),
which the JSON records as ``mask_mode``. Without ``BlockSparse`` the window is
the dense :func:`attention_jax.masks.sliding_window_mask` made two-sided and the
random / BigBird rows are left out.

Per (variant, T): accuracy and loss on a held-out batch after training;
forward+backward time of the attention layer alone (median) and the compiled
program's temporary memory (``memory_analysis().temp_size_in_bytes``); for
``gated`` the fraction of heads active and the inference forward time with only
the active heads (:func:`attention_jax.variants.select_heads`) against all heads.
The machine is shared (``uptime`` is recorded): timings are indicative.

    python experiments/variants_study.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attention_jax as aj
from attention_jax import masks, variants

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "out" / "variants"
BLOCK = 128  # block size of the sparse patterns (tokens)
D, N, K = 32, 4, 2
VARIANTS = ("dense", "window", "random", "bigbird", "linformer", "linear", "gated")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget at one length (the same for every variant)."""

    T: int
    steps: int
    batch: int
    eval_batch: int


# The 2-core machine is shared: at 2048 and 8192 the budget only measures the cost
# (and whether anything is learnt that fast); the accuracy comparison is at 512.
FULL = (Budget(512, 200, 8, 64), Budget(2048, 40, 2, 8), Budget(8192, 5, 1, 2))
QUICK = (Budget(256, 4, 2, 4),)  # a smoke run: every variant compiles and runs


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------

PAIRS, KEYS, VALUES, NOISE = 8, 8, 8, 16
RECALL_VOCAB = KEYS * VALUES + KEYS + NOISE + 1  # pair, query, noise tokens and a blank


def recall_batch(key, batch: int, T: int):
    """``(tokens, targets, weights)`` ``[B, T]``: pair tokens early, queries at the end."""
    kp, kk, kv, kn, ko = jax.random.split(key, 5)
    pos = jax.vmap(lambda k: jax.random.permutation(k, T // 2)[:PAIRS])(
        jax.random.split(kp, batch))  # [B, P] distinct positions in the first half
    keys = jax.vmap(lambda k: jax.random.permutation(k, KEYS)[:PAIRS])(
        jax.random.split(kk, batch))  # [B, P] distinct keys
    vals = jax.random.randint(kv, (batch, PAIRS), 0, VALUES)
    order = jax.vmap(lambda k: jax.random.permutation(k, PAIRS))(jax.random.split(ko, batch))
    tokens = jnp.full((batch, T), KEYS * VALUES + KEYS, jnp.int32)  # blanks
    kb, kn = jax.random.split(kn)
    tokens = jnp.where(jax.random.bernoulli(kb, 0.5, (batch, T)),  # half noise tokens
                       KEYS * VALUES + KEYS + jax.random.randint(kn, (batch, T), 0, NOISE), tokens)
    rows = jnp.arange(batch)[:, None]
    tokens = tokens.at[rows, pos].set(keys * VALUES + vals)
    queries = jnp.take_along_axis(keys, order, axis=1)
    tokens = tokens.at[:, T - PAIRS:].set(KEYS * VALUES + queries)
    targets = jnp.zeros((batch, T), jnp.int32).at[:, T - PAIRS:].set(
        jnp.take_along_axis(vals, order, axis=1))
    weights = jnp.zeros((batch, T)).at[:, T - PAIRS:].set(1.0)
    return tokens, targets, weights


GAP = 32  # the local task's largest distance from a pair to its query


def local_batch(key, batch: int, T: int):
    """Recall at short range: each query comes 1..GAP tokens after its pair.

    The P pairs sit one per segment of ``T / P`` tokens, each followed by its query
    (keys distinct, so there is one right answer); tokens in between are blanks
    and noise, as in :func:`recall_batch`.
    """
    kp, kg, kk, kv, kn, kb = jax.random.split(key, 6)
    seg = T // PAIRS
    pos = jnp.arange(PAIRS) * seg + jax.random.randint(kp, (batch, PAIRS), 0, seg - GAP)
    qpos = pos + jax.random.randint(kg, (batch, PAIRS), 1, GAP + 1)
    keys = jax.vmap(lambda k: jax.random.permutation(k, KEYS)[:PAIRS])(
        jax.random.split(kk, batch))
    vals = jax.random.randint(kv, (batch, PAIRS), 0, VALUES)
    tokens = jnp.full((batch, T), KEYS * VALUES + KEYS, jnp.int32)
    tokens = jnp.where(jax.random.bernoulli(kb, 0.5, (batch, T)),
                       KEYS * VALUES + KEYS + jax.random.randint(kn, (batch, T), 0, NOISE), tokens)
    rows = jnp.arange(batch)[:, None]
    tokens = tokens.at[rows, pos].set(keys * VALUES + vals).at[rows, qpos].set(
        KEYS * VALUES + keys)
    targets = jnp.zeros((batch, T), jnp.int32).at[rows, qpos].set(vals)
    weights = jnp.zeros((batch, T)).at[rows, qpos].set(1.0)
    return tokens, targets, weights


TASKS = {"recall": (recall_batch, 1 / VALUES), "local": (local_batch, 1 / VALUES)}


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------


def _takes_mask_objects() -> bool:
    """Whether ``ops.dot_product_attention`` accepts ``masks.BlockSparse`` objects."""
    if not hasattr(masks, "BlockSparse"):
        return False
    try:
        q = jnp.ones((1, 4, 1, 4))
        aj.dot_product_attention(q, q, q, mask=masks.BlockSparse(np.ones((1, 1), bool), 4, 4),
                                 implementation="blockwise")
        return True
    except (AttributeError, TypeError, ValueError):
        return False


def block_pattern(variant: str, T: int):
    """The mask of a masked variant, as a ``BlockSparse`` (or a dense array without it)."""
    nb = max(1, T // BLOCK)
    if not hasattr(masks, "BlockSparse"):
        if variant != "window":
            return None
        w = BLOCK * 2  # a band of about the blocks' width, two-sided
        return masks.sliding_window_mask(T, window=w) | masks.sliding_window_mask(
            T, window=w, offset=w - 1)
    bs = masks.BlockSparse
    if variant == "window":
        return bs.local_global(nb, nb, BLOCK, window=2, num_global=0)
    if variant == "random":
        return bs.random(nb, nb, BLOCK, num_random=min(2, nb), num_heads=N, seed=0)
    return bs.bigbird(1, 1, 1, num_q_blocks=nb, num_kv_blocks=nb, block_q=BLOCK, num_heads=N,
                      seed=0)


def density(mask, T: int) -> float:
    if mask is None:
        return 1.0
    if hasattr(mask, "array"):
        return float(np.asarray(mask.array).mean())
    return float(np.asarray(mask).mean())


def as_argument(mask, T: int, objects: bool):
    """What is passed to the module: the object, or its dense ``[1, N|1, T, T]`` array."""
    if mask is None or objects or not hasattr(mask, "dense"):
        return mask
    return mask.dense(1, N, T, T)


ROPE = 10_000.0  # on q and k of every softmax variant (linear attention has no logits to rotate)


def make_attention(variant: str, T: int, rngs: nnx.Rngs) -> nnx.Module:
    if variant == "linear":
        return variants.LinearAttention(D, N, num_kv_heads=K, rngs=rngs)
    common = dict(num_kv_heads=K, rope=ROPE, rngs=rngs)
    if variant == "linformer":
        return variants.LinformerAttention(D, N, max_length=T, projected_length=min(64, T),
                                           **common)
    if variant == "gated":
        return variants.HeadGatedAttention(D, N, hard=True, implementation="blockwise", **common)
    return aj.MultiHeadAttention(D, N, implementation="blockwise", **common)


def sinusoid(T: int, dim: int) -> np.ndarray:
    pos = np.arange(T)[:, None]
    freq = np.exp(-math.log(10_000.0) * np.arange(0, dim, 2) / dim)[None]
    return np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1).astype(np.float32)


class Net(nnx.Module):
    """Factored embeddings (a pair token is its key's plus its value's embedding, a
    query token its key's plus a query marker, so a key matches itself), fixed
    sinusoidal positions, one attention layer (residual), LayerNorm, read-out."""

    def __init__(self, variant: str, vocab: int, T: int, rngs: nnx.Rngs):
        self.variant = variant
        self.keys = nnx.Embed(KEYS, D, rngs=rngs)
        self.values = nnx.Embed(VALUES, D, rngs=rngs)
        self.other = nnx.Embed(NOISE + 2, D, rngs=rngs)  # noise, blank, query marker
        self.pos = nnx.Variable(jnp.asarray(sinusoid(T, D)))  # fixed, not trained
        self.attn = make_attention(variant, T, rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.out = nnx.Linear(D, vocab, rngs=rngs)

    def embed(self, tokens):
        pair, query = tokens < KEYS * VALUES, (tokens >= KEYS * VALUES) & (
            tokens < KEYS * VALUES + KEYS)
        key = jnp.where(pair, tokens // VALUES, tokens - KEYS * VALUES) % KEYS
        other = jnp.where(query, NOISE + 1, jnp.clip(tokens - KEYS * VALUES - KEYS, 0, NOISE))
        e = jnp.where((pair | query)[..., None], self.keys(key), 0.0)
        e = e + jnp.where(pair[..., None], self.values(tokens % VALUES), self.other(other))
        return e + self.pos[...][None, :tokens.shape[1]]  # [B, T, D]

    def __call__(self, tokens, mask=None):
        x = self.embed(tokens)
        aux = jnp.zeros(())
        if self.variant == "gated":
            aux = self.attn.head_gates(x).mean()
        y = self.attn(x) if mask is None else self.attn(x, mask=mask)
        return self.out(self.norm(x + y)), aux


GATE_PENALTY = 0.05
LR = 1e-2


def loss_fn(model, tokens, targets, weights, mask):
    logits, aux = model(tokens, mask)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    n = weights.sum()
    loss = (nll * weights).sum() / n
    return loss + GATE_PENALTY * aux, (loss, (correct * weights).sum() / n)


@nnx.jit
def train_step(model, opt, tokens, targets, weights, mask):
    grads = nnx.grad(lambda m: loss_fn(m, tokens, targets, weights, mask)[0])(model)
    opt.update(model, grads)


evaluate = nnx.jit(lambda m, *a: loss_fn(m, *a)[1])


# ---------------------------------------------------------------------------
# Cost of the attention layer alone
# ---------------------------------------------------------------------------


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def layer_cost(attn: nnx.Module, x, mask, reps: int) -> dict:
    """Forward+backward time and temporary memory of ``sum(attn(x)^2)`` w.r.t. params and x."""
    graphdef, state = nnx.split(attn)

    def loss(state, x, mask):
        m = nnx.merge(graphdef, state)
        y = m(x) if mask is None else m(x, mask=mask)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = fn.lower(state, x, mask).compile()
    mem = compiled.memory_analysis()
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    return dict(fwd_bwd_ms=median_ms(compiled, state, x, mask, reps=reps), temp_bytes=temp)


def gated_inference(attn: variants.HeadGatedAttention, x, reps: int) -> dict:
    """Fraction of heads active on ``x`` and forward time with the active heads only."""
    params = attn.param_values()
    gates = variants.hard_gates(attn.head_gates(x), attn.threshold)
    active = np.asarray(gates) > 0
    selection = variants.select_heads(active, attn.num_kv_heads)
    fwd = functools.partial(variants.gated_attention_forward, implementation="blockwise")
    full = jax.jit(lambda p, x, g: fwd(p, x, x, x, g))
    some = jax.jit(lambda p, x, g: fwd(p, x, x, x, g, selection=selection))
    err = float(jnp.max(jnp.abs(full(params, x, gates) - some(params, x, gates))))
    times = {"all": [], "active": []}
    for _ in range(reps):  # interleaved, so that load changes hit both alike
        for key, fn in (("all", full), ("active", some)):
            times[key].append(median_ms(fn, params, x, gates, reps=1))
    computed = sum(len(r) for r in selection[1])
    return dict(active_fraction=float(active.mean()), heads_computed=computed,
                forward_all_ms=float(np.median(times["all"])),
                forward_active_ms=float(np.median(times["active"])), max_abs_diff=err)


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False
                              ).stdout.strip()
    except OSError:
        return "unknown"


def run(budgets=FULL, names=VARIANTS, reps: int = 3, log=print) -> dict:
    objects = _takes_mask_objects()
    rows = []
    t_start = time.perf_counter()
    for b in budgets:
        for name in names:
            pattern = block_pattern(name, b.T) if name in ("window", "random", "bigbird") else None
            if name in ("random", "bigbird") and pattern is None:
                continue
            mask = as_argument(pattern, b.T, objects)
            row = dict(variant=name, T=b.T, steps=b.steps, batch=b.batch,
                       density=density(pattern, b.T))
            for task, (make_batch, chance) in TASKS.items():
                t0 = time.perf_counter()
                model = Net(name, RECALL_VOCAB, b.T, nnx.Rngs(0))
                opt = nnx.Optimizer(model, optax.adamw(LR, weight_decay=0.01), wrt=nnx.Param)
                batch_fn = jax.jit(functools.partial(make_batch, batch=b.batch, T=b.T))
                for i in range(b.steps):
                    train_step(model, opt, *batch_fn(jax.random.key(i)), mask)
                ev = make_batch(jax.random.key(10_000), b.eval_batch, b.T)
                loss, acc = map(float, evaluate(model, *ev, mask))
                row[f"{task}_acc"], row[f"{task}_loss"] = acc, loss
                row[f"{task}_chance"] = chance
                row[f"{task}_train_s"] = time.perf_counter() - t0
                if name == "gated" and task == "recall":
                    x = model.embed(ev[0][:1])
                    row.update(gated_inference(model.attn, x, reps))
            x = jax.random.normal(jax.random.key(1), (1, b.T, D))
            row.update(layer_cost(make_attention(name, b.T, nnx.Rngs(0)), x, mask, reps))
            rows.append(row)
            log(f"T={b.T:5d} {name:9s} recall {row['recall_acc']:.3f} local "
                f"{row['local_acc']:.3f} fwd+bwd {row['fwd_bwd_ms']:8.1f} ms temp "
                f"{(row['temp_bytes'] or 0) / 2**20:7.1f} MiB  "
                f"({time.perf_counter() - t_start:.0f} s)")
    return dict(uptime=uptime(), mask_mode="object" if objects else "dense",
                block_sparse=hasattr(masks, "BlockSparse"), block=BLOCK,
                model=dict(D=D, N=N, K=K, layers=1, gate_penalty=GATE_PENALTY),
                budgets=[dataclasses.asdict(b) for b in budgets],
                devices=str(jax.devices()[0].platform), rows=rows,
                note="shared machine: timings are indicative, compare within a run")


def _by(rows, name, T):
    return next((r for r in rows if r["variant"] == name and r["T"] == T), None)


def verdict(result: dict) -> list[str]:
    """Sentences the numbers of this run support (computed, not written in advance)."""
    rows = result["rows"]
    Ts = sorted({r["T"] for r in rows})
    lines = []
    for T in Ts:
        dense = _by(rows, "dense", T)
        here = [r for r in rows if r["T"] == T]
        best = max(here, key=lambda r: r["recall_acc"])
        fast = min(here, key=lambda r: r["fwd_bwd_ms"])
        parts = [f"**T={T}**: best recall accuracy {best['recall_acc']:.2f} ({best['variant']})"]
        if dense:
            parts.append(f"dense {dense['recall_acc']:.2f} recall / {dense['local_acc']:.2f} "
                         f"local")
            parts.append(f"fastest fwd+bwd {fast['variant']} at "
                         f"{dense['fwd_bwd_ms'] / fast['fwd_bwd_ms']:.1f}x dense's speed")
            near = [r["variant"] for r in here if r is not dense
                    and r["recall_acc"] >= dense["recall_acc"] - 0.05
                    and r["fwd_bwd_ms"] < 0.8 * dense["fwd_bwd_ms"]]
            parts.append("cheaper than dense by >20% with recall within 0.05 of it: "
                         + (", ".join(near) if near else "none"))
        lines.append("; ".join(parts) + ".")
    g = [r for r in rows if r["variant"] == "gated" and "active_fraction" in r]
    for r in g:
        lines.append(
            f"Gated at T={r['T']}: {r['active_fraction']:.0%} of the heads active, "
            f"{r['heads_computed']}/{N} computed; inference forward "
            f"{r['forward_active_ms']:.1f} ms vs {r['forward_all_ms']:.1f} ms with all heads.")
    if result["mask_mode"] == "dense":
        lines.append("Block patterns ran as dense boolean masks (ops did not take mask objects "
                     "at run time): their accuracy is the pattern's, their time is dense "
                     "attention's plus the mask; tile skipping is not measured here.")
    return lines


def summarize(result: dict) -> str:
    cfg = result["model"]
    head = (f"One bidirectional attention layer per variant, D={cfg['D']}, N={cfg['N']}, "
            f"K={cfg['K']}; budgets (T: steps x batch): "
            + ", ".join(f"{b['T']}: {b['steps']} x {b['batch']}" for b in result["budgets"])
            + f". Chance: recall {1 / VALUES:.3f}, local {1 / VALUES:.3f}. "
            f"Block masks: {result['mask_mode']}. Machine shared with other jobs "
            f"(`{result['uptime']}`): timings are indicative.")
    lines = [head, "",
             "| T | variant | density | recall acc | local acc | fwd+bwd ms | temp MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        temp = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['T']} | {r['variant']} | {r['density']:.2f} | {r['recall_acc']:.3f}"
                     f" | {r['local_acc']:.3f} | {r['fwd_bwd_ms']:.1f} | {temp} |")
    lines += ["", "Verdict (from these numbers):", ""]
    lines += [f"- {s}" for s in verdict(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("fwd_bwd_ms", "fwd+bwd of the layer (ms)", True),
              ("temp_bytes", "compiled temporary memory (bytes)", True),
              ("recall_acc", "recall accuracy (long range)", False),
              ("local_acc", "local recall accuracy (gap <= 32)", False))
    for ax, (field, title, log) in zip(axes, panels, strict=True):
        for n in names:
            pts = sorted((r["T"], r[field]) for r in rows if r["variant"] == n
                         and r[field] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=n)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("Attention variants on CPU (shared machine: timings indicative)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="T=256, 4 steps: a smoke run, compile-bound (~1.5 min CPU time)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="variants_study", help="file stem of the outputs")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    names = tuple(n for n in args.variants.split(",") if n)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    result = run(QUICK if args.quick else FULL, names, reps=1 if args.quick else 3)
    result["quick"] = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    table = summarize(result)
    stem.with_suffix(".md").write_text(table)
    plot(result, stem.with_suffix(".png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
