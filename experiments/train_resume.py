"""Trains a head-parallel attention layer with checkpoints; resumes from the latest one.

A toy regression (``y = attention(x)`` towards a fixed random target map) on a
``(data, model)`` mesh of fake CPU devices. The batch of step ``s`` is drawn
from ``numpy.random.default_rng(s)``, so any run that reaches step ``s``
trains on the same data, whatever mesh it runs on and wherever it resumed.

Prints one JSON object per line on stdout:
``{"step": s, "loss": l}`` after each training step (``l`` the loss *before*
step ``s``'s update), ``{"checkpoint": s}`` once checkpoint ``s`` is on disk,
``{"resumed": s, "mesh": [d, m]}`` when a run starts from checkpoint ``s``.

With ``--hang-after k`` the run stops making progress right after writing
checkpoint ``k`` (it sleeps), so a test can SIGKILL it at a known point.

    python experiments/train_resume.py --dir /tmp/ckpt --mesh 2,4 --steps 6 --every 2
    python experiments/train_resume.py --dir /tmp/ckpt --mesh 1,8 --steps 6 --every 2
"""

from __future__ import annotations

from attention_jax.runtime import use_fake_cpu_devices

use_fake_cpu_devices(8)  # before anything starts JAX

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from attention_jax import MultiHeadAttention, checkpoint  # noqa: E402
from attention_jax import sharding as sh  # noqa: E402

B, T, D, N, K, H = 4, 4, 16, 8, 2, 4  # batch, length, width, heads, kv heads, head dim
LEARNING_RATE, MOMENTUM = 0.1, 0.9


def build(mesh: jax.sharding.Mesh | None, *, seed: int = 0, num_heads: int = N,
          num_kv_heads: int = K):
    """``(model, optimizer)``: the layer (head-parallel on ``mesh``, plain if None) and SGD.

    The parameters come from ``numpy.random.default_rng(seed)`` (non-zero biases).
    """
    rng = np.random.default_rng(seed)

    def init(std=None):
        def f(key, shape, dtype):
            del key
            scale = 1.0 / np.sqrt(shape[0]) if std is None else std
            return jnp.asarray(rng.standard_normal(shape) * scale, dtype)
        return f

    model = MultiHeadAttention(D, num_heads, num_kv_heads=num_kv_heads, head_dim=H,
                               kernel_init=init(), bias_init=init(0.1), rngs=nnx.Rngs(0))
    if mesh is not None:
        model = sh.head_parallel(model, mesh)
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    """``(x, y)``: f32[B, T, D] inputs and targets of training step ``step`` (1-based)."""
    target_map = np.random.default_rng(12345).standard_normal((D, D)) / np.sqrt(D)
    x = np.random.default_rng(step).standard_normal((B, T, D))
    return jnp.asarray(x, jnp.float32), jnp.asarray(np.tanh(x @ target_map), jnp.float32)


def _loss(model, x, y):
    return jnp.mean((model(x, is_causal=True) - y) ** 2)


def sgd_step(model, optimizer, x, y) -> jax.Array:
    """One SGD step in place; returns the loss before the update."""
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


train_step = nnx.jit(sgd_step)


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def run(directory: str | None, mesh_shape: tuple[int, int], steps: int, every: int,
        hang_after: int | None = None) -> list[float]:
    """Trains to ``steps`` on a ``mesh_shape`` mesh, resuming from ``directory``'s latest
    checkpoint if any and saving every ``every`` steps. Returns this run's losses."""
    model, optimizer = build(sh.make_mesh(*mesh_shape))
    start = 0
    if directory is not None and checkpoint.latest_step(directory) is not None:
        start = checkpoint.restore(directory, model, optimizer)
        _emit(resumed=start, mesh=list(mesh_shape))
    losses = []
    for step in range(start + 1, steps + 1):
        loss = float(train_step(model, optimizer, *batch(step)))
        losses.append(loss)
        _emit(step=step, loss=loss)
        if directory is not None and every and step % every == 0:
            checkpoint.save(directory, model, optimizer, step=step)
            _emit(checkpoint=step)
            if step == hang_after:
                while True:  # wait to be killed
                    time.sleep(60)
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="checkpoint directory (none: no checkpoints)")
    parser.add_argument("--mesh", default="2,4", help="data,model mesh shape (default 2,4)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every k steps")
    parser.add_argument("--hang-after", type=int, default=None,
                        help="sleep forever after writing this checkpoint step")
    args = parser.parse_args(argv)
    data, model = (int(a) for a in args.mesh.split(","))
    run(args.dir, (data, model), args.steps, args.every, args.hang_after)


if __name__ == "__main__":
    sys.exit(main())
