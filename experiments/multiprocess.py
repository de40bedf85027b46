"""Head-parallel attention across processes: 2 local processes x 4 CPU devices.

Each process joins a cluster through :func:`attention_jax.distributed.initialize`
(coordinator bound to 127.0.0.1 only, gloo CPU collectives), builds the same
module from the same seed, splits it over a ``(data, model)`` mesh spanning all
8 devices of both processes, and runs the sharded forward and backward under
``jax.jit``. Process 0 gathers the results and writes them; the launcher
compares them with the same module run in one process on one device.

    python experiments/multiprocess.py                  # launch 2 x 4, compare, print
    python experiments/multiprocess.py --mesh 2 4 --heads 8 2
    python experiments/multiprocess.py --checkpoint DIR # also: one SGD step, then each
                                                        # process saves its shards to DIR
    python experiments/multiprocess.py --context 4 --mesh 1 2   # (data, model, context)

With ``--context C`` the mesh is ``(data, model, C)`` and its ``context`` axis crosses
the processes: the devices are ordered so that every context group holds devices of
every process (:func:`context_device_order`), so each ring step (and the all-gather)
goes between processes. The workers run the module with each of ``--strategies``
(ring, all-gather) in ``--layout`` (zigzag by default: inputs reordered with
``to_layout``, outputs back), forward and gradients, against the same one-process,
one-device reference.

With ``--checkpoint`` the workers take one SGD-with-momentum step on the sharded
model and save parameters and optimizer state with
:func:`attention_jax.checkpoint.save` (each process writes the shards it holds);
the launcher restores that checkpoint in its own single process (onto a
``(1, n)`` mesh of its devices) and compares it with the same step taken
unsharded.

On a GPU cluster the worker part is what each host runs (one process per host,
``initialize()`` with the launcher's settings); see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPE = {"batch": 4, "seq_len": 8, "embed": 32}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(heads: tuple[int, int], seq_len: int | None = None):
    """The module and inputs every process builds identically (same seeds)."""
    from flax import nnx

    from attention_jax import MultiHeadAttention

    N, K = heads
    module = MultiHeadAttention(SHAPE["embed"], N, num_kv_heads=K, head_dim=8,
                                bias_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(0))
    T = SHAPE["seq_len"] if seq_len is None else seq_len
    x = np.random.default_rng(0).standard_normal(
        (SHAPE["batch"], T, SHAPE["embed"])).astype(np.float32)
    return module, x


def _loss(model, x):
    import jax.numpy as jnp

    return jnp.mean(model(x, is_causal=True) ** 2)


def _forward_and_grads(model, x):
    """``(y, loss, grads w.r.t. params, grad w.r.t. x)`` as host numpy arrays."""
    import jax
    from flax import nnx

    from attention_jax import distributed

    def step(model, x):
        y = model(x, is_causal=True)
        loss, (g_model, g_x) = nnx.value_and_grad(_loss, argnums=(0, 1))(model, x)
        return y, loss, nnx.state(g_model, nnx.Param), g_x

    y, loss, grads, g_x = nnx.jit(step)(model, x)
    host = distributed.gather_to_host
    flat = {"/".join(str(k) for k in path): host(v[...])
            for path, v in nnx.to_flat_state(grads)}
    # the head-parallel wrapper nests the module's params under "module/"
    flat = {k.removeprefix("module/"): v for k, v in flat.items()}
    return host(y), float(jax.device_get(loss)), flat, host(g_x)


LEARNING_RATE, MOMENTUM = 0.1, 0.9


def _optimizer(model):
    import optax
    from flax import nnx

    return nnx.Optimizer(model, optax.sgd(LEARNING_RATE, momentum=MOMENTUM), wrt=nnx.Param)


def _sgd_step(model, optimizer, x) -> None:
    """One jit-compiled optimizer step on ``_loss`` (in place)."""
    from flax import nnx

    @nnx.jit
    def step(model, optimizer, x):
        optimizer.update(model, nnx.grad(_loss)(model, x))

    step(model, optimizer, x)


def _params_and_opt(model, optimizer) -> dict[str, np.ndarray]:
    """Parameters and optimizer state as host arrays, keyed by path (``module/`` stripped)."""
    from flax import nnx

    from attention_jax import distributed

    flat = {}
    for prefix, state in (("param", nnx.state(model, nnx.Param)),
                          ("opt", nnx.state(optimizer))):
        for path, v in nnx.to_flat_state(state):
            key = "/".join(str(k) for k in path if k != "module")
            flat[f"{prefix}:{key}"] = distributed.gather_to_host(v[...])
    return flat


CONTEXT_SEQ_LEN = 16  # the sequence split over the context axis (zigzag: 2 chunks a device)


def context_device_order(devices) -> list:
    """``devices`` reordered so that consecutive runs hold one device of each process in
    turn (process 0's first, process 1's first, ..., process 0's second, ...): the last
    mesh axis (``context``) then crosses the processes whenever it is >= 2."""
    by_process: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    columns = list(by_process.values())
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"processes hold different device counts: {[len(c) for c in columns]}")
    return [col[i] for i in range(len(columns[0])) for col in columns]


def _context_worker(info, mesh_shape, context: int, heads, strategies, layout: str,
                    out: str) -> None:
    """Each strategy's forward and gradients on a ``(data, model, context)`` mesh whose
    context axis crosses the processes; process 0 writes them (natural token order)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from attention_jax import sharding
    from attention_jax.parallel import context as cp

    mesh = sharding.make_mesh(*mesh_shape, context=context,
                              devices=context_device_order(jax.devices()))
    groups = np.moveaxis(np.vectorize(lambda d: d.process_index)(mesh.devices), -1, 0)
    spans = bool(np.all(groups.reshape(context, -1).min(0) != groups.reshape(context, -1).max(0)))
    perm = cp.layout_permutation(CONTEXT_SEQ_LEN, context, layout)
    back = np.argsort(perm)
    saved = {}
    for strategy in strategies:
        module, x_host = _build(heads, CONTEXT_SEQ_LEN)
        model = sharding.head_parallel(module, mesh, context_strategy=strategy,
                                       context_layout=layout)
        x_l = np.ascontiguousarray(x_host[:, perm])  # the layout's token order
        x = jax.make_array_from_callback(x_l.shape, NamedSharding(mesh, P("data", "context")),
                                         lambda idx, x_l=x_l: x_l[idx])
        y, loss, grads, g_x = _forward_and_grads(model, x)
        saved.update({f"{strategy}:y": y[:, back], f"{strategy}:loss": loss,
                      f"{strategy}:g_x": g_x[:, back],
                      **{f"{strategy}:grad:{k}": v for k, v in grads.items()}})
    if info.process_index == 0:
        np.savez(out, **saved, process_count=info.process_count,
                 global_devices=info.global_device_count, local_devices=info.local_device_count,
                 context_spans_processes=spans)


def worker(process_id: int, num_processes: int, port: int, cpu_devices: int,
           mesh_shape: tuple[int, int], heads: tuple[int, int], out: str,
           checkpoint_dir: str | None = None, context: int | None = None,
           strategies=("ring", "all_gather"), layout: str = "zigzag") -> None:
    """One process of the cluster."""
    from attention_jax import distributed

    address = f"127.0.0.1:{port}"
    info = distributed.initialize(address, num_processes, process_id,
                                  cpu_devices=cpu_devices, coordinator_bind_address=address)
    if context is not None:
        _context_worker(info, mesh_shape, context, heads, strategies, layout, out)
        distributed.shutdown()
        return
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from attention_jax import sharding

    mesh = sharding.make_mesh(*mesh_shape)
    module, x_host = _build(heads)
    model = sharding.head_parallel(module, mesh)
    x = jax.make_array_from_callback(x_host.shape, NamedSharding(mesh, P("data")),
                                     lambda idx: x_host[idx])
    y, loss, grads, g_x = _forward_and_grads(model, x)
    if info.process_index == 0:
        np.savez(out, y=y, loss=loss, g_x=g_x, **{f"grad:{k}": v for k, v in grads.items()},
                 process_count=info.process_count, global_devices=info.global_device_count,
                 local_devices=info.local_device_count)
    if checkpoint_dir is not None:
        from attention_jax import checkpoint

        optimizer = _optimizer(model)
        _sgd_step(model, optimizer, x)
        # every process calls save; each writes the shards its devices hold
        checkpoint.save(checkpoint_dir, model, optimizer, step=1)
    distributed.shutdown()


def single_process(heads: tuple[int, int], seq_len: int | None = None
                   ) -> dict[str, np.ndarray]:
    """The same computation on one device, unsharded."""
    module, x = _build(heads, seq_len)
    y, loss, grads, g_x = _forward_and_grads(module, x)
    return {"y": y, "loss": loss, "g_x": g_x, **{f"grad:{k}": v for k, v in grads.items()}}


def restore_here(checkpoint_dir: str, heads: tuple[int, int]) -> dict[str, np.ndarray]:
    """Restores the workers' checkpoint in this process, onto a ``(1, n)`` mesh of its devices."""
    import jax

    from attention_jax import checkpoint, sharding

    module, _ = _build(heads)
    n = len(jax.devices())
    N, K = heads
    if N % n == 0 and (K % n == 0 or n % K == 0):
        module = sharding.head_parallel(module, sharding.make_mesh(1, n))
    optimizer = _optimizer(module)
    step = checkpoint.restore(checkpoint_dir, module, optimizer)
    return {"step": np.asarray(step), **_params_and_opt(module, optimizer)}


def single_process_step(heads: tuple[int, int]) -> dict[str, np.ndarray]:
    """The workers' optimizer step taken on one device, unsharded."""
    module, x = _build(heads)
    optimizer = _optimizer(module)
    _sgd_step(module, optimizer, x)
    return _params_and_opt(module, optimizer)


def launch(num_processes: int = 2, cpu_devices: int = 4, mesh_shape=(2, 4), heads=(8, 2),
           timeout: float = 240.0, checkpoint_dir: str | None = None,
           context: int | None = None, strategies=("ring", "all_gather"),
           layout: str = "zigzag") -> dict:
    """Starts the workers on loopback, waits, and compares with one process.

    Args:
      checkpoint_dir: when given, the workers also take an optimizer step and
        save it there; this process restores it and compares (``checkpoint_err``).
      context: when given, the mesh is ``(*mesh_shape, context)`` with the context
        axis across the processes, run with each of ``strategies`` in ``layout``
        (errors keyed ``"<strategy>:<name>"``); no checkpoint then.

    Returns:
      ``{"max_abs_err": {name: err}, "loss": ..., "process_count": ..., ...}``
      (and ``"checkpoint_err": {name: err}`` with ``checkpoint_dir``;
      ``"context_spans_processes"`` with ``context``).
    """
    if context is not None and checkpoint_dir is not None:
        raise ValueError("checkpoint_dir is not taken with context (one or the other)")
    from attention_jax import runtime

    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the workers choose their device count
    env["XLA_FLAGS"] = runtime.without_device_count(env.get("XLA_FLAGS", ""))
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.npz")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(i), "--num-processes",
                 str(num_processes), "--port", str(port), "--cpu-devices", str(cpu_devices),
                 "--mesh", *map(str, mesh_shape), "--heads", *map(str, heads), "--out", out,
                 *([] if checkpoint_dir is None else ["--checkpoint", str(checkpoint_dir)]),
                 *([] if context is None else ["--context", str(context), "--layout", layout,
                                               "--strategies", *strategies])],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for i in range(num_processes)
        ]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:
                p.kill()
        if any(p.returncode for p in procs):
            raise RuntimeError("a worker failed:\n" + "\n".join(log[-3000:] for log in logs))
        got = dict(np.load(out))
    extra = {}
    if context is None:
        ref = single_process(heads)
        errs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
    else:
        one = single_process(heads, CONTEXT_SEQ_LEN)
        ref = {f"{s}:{k}": v for s in strategies for k, v in one.items()}
        errs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
        loss_key = f"{strategies[0]}:loss"
        got["loss"], ref["loss"] = got[loss_key], ref[loss_key]
        extra.update(context=context, strategies=list(strategies), layout=layout,
                     context_spans_processes=bool(got["context_spans_processes"]))
    if checkpoint_dir is not None:
        restored, expected = restore_here(str(checkpoint_dir), heads), single_process_step(heads)
        if set(restored) - {"step"} != set(expected):
            raise RuntimeError(f"restored {sorted(restored)} but expected {sorted(expected)}")
        extra["checkpoint_step"] = int(restored["step"])
        extra["checkpoint_err"] = {k: float(np.max(np.abs(restored[k] - expected[k])))
                                   for k in expected}
    return {**extra, "mesh": list(mesh_shape), "heads": list(heads),
            "process_count": int(got["process_count"]),
            "global_devices": int(got["global_devices"]),
            "local_devices": int(got["local_devices"]),
            "loss": float(got["loss"]), "loss_single": float(ref["loss"]),
            "max_abs_err": errs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--cpu-devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--mesh", type=int, nargs=2, default=(2, 4), metavar=("DATA", "MODEL"))
    parser.add_argument("--heads", type=int, nargs=2, default=(8, 2), metavar=("N", "K"))
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="also take an SGD step, save it from every process to DIR, "
                             "restore it here and compare")
    parser.add_argument("--context", type=int, default=None, metavar="C",
                        help="a (data, model, C) mesh, its context axis across the processes")
    parser.add_argument("--strategies", nargs="+", choices=("ring", "all_gather"),
                        default=("ring", "all_gather"), help="with --context")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag",
                        help="with --context")
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.num_processes, args.port, args.cpu_devices,
               tuple(args.mesh), tuple(args.heads), args.out, args.checkpoint, args.context,
               tuple(args.strategies), args.layout)
        return
    result = launch(args.num_processes, args.cpu_devices, tuple(args.mesh), tuple(args.heads),
                    checkpoint_dir=args.checkpoint, context=args.context,
                    strategies=tuple(args.strategies), layout=args.layout)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
