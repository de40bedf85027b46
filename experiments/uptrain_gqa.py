"""MHA -> GQA / MQA conversion and uptraining on multi-query associative recall.

The GQA paper (Ainslie et al., 2023) turns an MHA checkpoint into GQA by
mean-pooling the key/value heads of each group, then "uptrains" with about 5%
of the original pre-training compute. This experiment repeats that on a toy:

* task: multi-query associative recall (MQAR): ``k1 v1 k2 v2 ... kP vP`` then P
  queries (the keys in a random order); at each query the model must output the
  value paired with it. Solving it takes an induction circuit (a head that
  copies the previous token's key into each value position, and a head that
  matches the query against those), several key/value pairs in flight at once;
* model: embeddings, ``--layers`` pre-LayerNorm attention-only blocks
  (:class:`attention_jax.MultiHeadAttention` with rope, residual), a linear
  read-out; trained with optax AdamW for ``--steps`` steps as MHA (K = N);
* conversion of every layer with :mod:`attention_jax.convert` to K = N/2, N/4
  (GQA) and 1 (MQA) by ``mean``, ``first`` and ``random`` K/V initialisation;
* evaluation (loss and accuracy at the query positions, held-out batch) right
  after conversion and after uptraining for ``--uptrain-frac`` (5%) of the steps.

Writes ``uptrain_gqa.json``, ``uptrain_gqa.md`` (the table) and
``uptrain_gqa.png`` under ``--out`` (default ``experiments/results``). CPU only is
fine: the defaults run in a few minutes on 2 cores.

    python experiments/uptrain_gqa.py [--steps 3000] [--seeds 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attention_jax as aj
from attention_jax import convert

METHODS = ("mean", "first", "random")


@dataclasses.dataclass(frozen=True)
class Task:
    """MQAR: P pairs over ``num_keys`` keys and ``num_values`` values, then P queries."""

    pairs: int = 8
    num_keys: int = 32
    num_values: int = 32

    @property
    def vocab(self) -> int:
        return self.num_keys + self.num_values

    @property
    def length(self) -> int:
        return 3 * self.pairs

    def batch(self, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(tokens [B, 3P], targets [B, 3P], weights [B, 3P])``; loss only at queries."""
        kk, kv, kq = jax.random.split(key, 3)
        P = self.pairs
        keys = jax.vmap(lambda k: jax.random.permutation(k, self.num_keys)[:P])(
            jax.random.split(kk, batch_size))  # [B, P] distinct keys
        values = self.num_keys + jax.random.randint(kv, (batch_size, P), 0, self.num_values)
        order = jax.vmap(lambda k: jax.random.permutation(k, P))(
            jax.random.split(kq, batch_size))  # [B, P]
        pairs = jnp.stack([keys, values], axis=-1).reshape(batch_size, 2 * P)  # k1 v1 k2 v2 ..
        queries = jnp.take_along_axis(keys, order, axis=1)  # [B, P]
        answers = jnp.take_along_axis(values, order, axis=1)  # [B, P]
        tokens = jnp.concatenate([pairs, queries], axis=1)  # [B, 3P]
        targets = jnp.concatenate([jnp.zeros_like(pairs), answers], axis=1)
        weights = jnp.concatenate([jnp.zeros(pairs.shape), jnp.ones(queries.shape)], axis=1)
        return tokens, targets, weights


class Block(nnx.Module):
    """Pre-LN residual attention block (no MLP)."""

    def __init__(self, dim: int, heads: int, rope: float, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = aj.MultiHeadAttention(dim, heads, rope=rope, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.attn(self.norm(x), is_causal=True)


class Model(nnx.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, rope: float,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rope, rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)  # [B, T, D]
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))  # [B, T, vocab]


def loss_and_accuracy(model: Model, tokens, targets, weights) -> tuple[jax.Array, jax.Array]:
    logits = model(tokens)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    n = weights.sum()
    return (nll * weights).sum() / n, (correct * weights).sum() / n


@nnx.jit
def train_step(model: Model, opt: nnx.Optimizer, tokens, targets, weights) -> jax.Array:
    def loss_fn(model):
        return loss_and_accuracy(model, tokens, targets, weights)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


evaluate = nnx.jit(loss_and_accuracy)


def train(model: Model, task: Task, steps: int, *, lr: float, batch_size: int,
          key: jax.Array, warmup: int) -> list[float]:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, 2))
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    make_batch = jax.jit(functools.partial(task.batch, batch_size=batch_size))
    losses = []
    for i in range(steps):
        losses.append(train_step(model, opt, *make_batch(jax.random.fold_in(key, i))))
    return [float(x) for x in losses]


def convert_model(model: Model, num_kv_heads: int, method: str, seed: int) -> Model:
    new = nnx.clone(model)
    for i, block in enumerate(new.blocks):
        block.attn = convert.mha_to_gqa(block.attn, num_kv_heads, method,
                                        rngs=nnx.Rngs(params=seed * 100 + i))
    return new


def run(args) -> dict:
    task = Task(args.pairs, args.num_keys, args.num_values)
    eval_batch = task.batch(jax.random.key(10_000), args.eval_batch)
    up_steps = max(1, round(args.uptrain_frac * args.steps))
    kvs = sorted({args.heads // 2, args.heads // 4, 1}, reverse=True)
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        model = Model(task.vocab, args.dim, args.heads, args.layers, args.rope,
                      rngs=nnx.Rngs(seed))
        curve = train(model, task, args.steps, lr=args.lr, batch_size=args.batch,
                      key=jax.random.key(seed + 1), warmup=args.steps // 20)
        loss, acc = map(float, evaluate(model, *eval_batch))
        print(f"seed {seed}: MHA trained {args.steps} steps in {time.perf_counter() - t0:.0f}s: "
              f"loss {loss:.3f} acc {acc:.3f}", flush=True)
        rows.append(dict(seed=seed, K=args.heads, method="-", loss_0=loss, acc_0=acc,
                         loss_up=loss, acc_up=acc, curve=curve[::10]))
        # MHA, trained further for the same budget: the control for "uptraining helps".
        ctrl = nnx.clone(model)
        train(ctrl, task, up_steps, lr=args.lr * args.uptrain_lr_scale,
              batch_size=args.batch, key=jax.random.key(seed + 777), warmup=up_steps // 10)
        rows[-1]["loss_up"], rows[-1]["acc_up"] = map(float, evaluate(ctrl, *eval_batch))
        for K in kvs:
            for method in METHODS:
                m = convert_model(model, K, method, seed)
                l0, a0 = map(float, evaluate(m, *eval_batch))
                train(m, task, up_steps, lr=args.lr * args.uptrain_lr_scale,
                      batch_size=args.batch, key=jax.random.key(seed + 777),
                      warmup=up_steps // 10)
                l1, a1 = map(float, evaluate(m, *eval_batch))
                rows.append(dict(seed=seed, K=K, method=method, loss_0=l0, acc_0=a0,
                                 loss_up=l1, acc_up=a1))
                print(f"  K={K:2d} {method:6s}: converted loss {l0:.3f} acc {a0:.3f} -> "
                      f"uptrained ({up_steps} steps) loss {l1:.3f} acc {a1:.3f}", flush=True)
    config = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}
    return dict(config=config, uptrain_steps=up_steps, rows=rows)


def summarize(result: dict) -> str:
    """Markdown table, mean over seeds."""
    rows = result["rows"]
    keys = sorted({(r["K"], r["method"]) for r in rows}, key=lambda km: (-km[0], km[1]))
    cfg = result["config"]
    lines = [
        f"MQAR ({cfg['pairs']} pairs, {cfg['num_keys']} keys, {cfg['num_values']} values), "
        f"{cfg['layers']} attention-only layers, D={cfg['dim']}, N={cfg['heads']}; "
        f"MHA trained {cfg['steps']} steps, uptraining {result['uptrain_steps']} steps "
        f"({cfg['uptrain_frac']:.0%}); mean over {cfg['seeds']} seed(s); chance accuracy "
        f"{1 / cfg['num_values']:.3f}.",
        "",
        "| K | init | loss after conversion | acc after conversion | "
        "loss after uptraining | acc after uptraining |",
        "|---|---|---|---|---|---|",
    ]
    for K, method in keys:
        sel = [r for r in rows if r["K"] == K and r["method"] == method]
        mean = {f: np.mean([r[f] for r in sel]) for f in ("loss_0", "acc_0", "loss_up", "acc_up")}
        name = "MHA (trained on, control)" if method == "-" else method
        lines.append(f"| {K} | {name} | {mean['loss_0']:.3f} | {mean['acc_0']:.3f} | "
                     f"{mean['loss_up']:.3f} | {mean['acc_up']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["method"] != "-"]
    mha_acc = np.mean([r["acc_0"] for r in result["rows"] if r["method"] == "-"])
    kvs = sorted({r["K"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, field, title in ((axes[0], "acc_0", "right after conversion"),
                             (axes[1], "acc_up", "after uptraining")):
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            acc = [np.mean([r[field] for r in rows if r["K"] == K and r["method"] == method])
                   for K in kvs]
            ax.bar(np.arange(len(kvs)) + i * width, acc, width, label=method)
        ax.axhline(mha_acc, color="k", ls="--", label="MHA")
        ax.set_xticks(np.arange(len(kvs)) + width, [f"K={K}" for K in kvs])
        ax.set_title(title)
        ax.set_ylabel("query accuracy")
    axes[0].legend()
    fig.suptitle("MHA -> GQA/MQA on associative recall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--uptrain-frac", type=float, default=0.05)
    p.add_argument("--uptrain-lr-scale", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--num-keys", type=int, default=32)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rope", type=float, default=10_000.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=2048)
    p.add_argument("--out", type=pathlib.Path,
                   default=pathlib.Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uptrain_gqa.json").write_text(json.dumps(result, indent=1))
    table = summarize(result)
    (args.out / "uptrain_gqa.md").write_text(table)
    plot(result, args.out / "uptrain_gqa.png")
    print(table)


if __name__ == "__main__":
    main()
