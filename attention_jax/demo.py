"""The main job: MHA, GQA and MQA side by side on the default devices.

For each variant it builds the module, runs jit-compiled forward and
forward+backward passes, times one jit-compiled single-token decode step on a
KV cache holding the ``seq_len``-token prompt, checks the forward against
PyTorch (when torch is installed), runs the same module head-parallel on the
default mesh (all devices on the ``model`` axis) and prints one table row:
heads, parameters, KV-cache bytes per token, error against the reference,
sharded-vs-unsharded error, the collectives of the sharded forward and
backward, and timings. ``attention-jax demo --help`` lists its options.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import sharding
from attention_jax.cli import (
    format_collectives,
    format_column,
    print_table,
    print_text,
    progress_bar,
)
from attention_jax.modules import MultiHeadAttention

NOTES = (
    "kv_bytes_per_token: K * (H + V) * itemsize, one layer; decode_step_ms: one jit-compiled "
    "token of module.decode after a seq_len-token prefill (cache donated); sharded_err: "
    "head-parallel forward vs one device; collectives: non-trivial ops in the compiled sharded "
    "forward / forward+backward (op@mesh axes:count); times are medians."
)


# PyTorch's own CPU wheel index: a plain `pip install torch` on Linux pulls the CUDA build.
TORCH_HINT = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Shapes of the demo: ``[batch, seq_len, embed]`` inputs, ``num_heads`` query heads.

    Attributes:
      dtype: parameters, inputs and KV cache (``"float32"`` or ``"bfloat16"``).
      repeats: timed calls per forward / forward+backward median.
      decode_repeats: timed single-token decode steps per median.
    """

    batch: int = 4
    seq_len: int = 256
    embed: int = 512
    num_heads: int = 8
    variants: tuple[tuple[str, int], ...] = (("MHA", 8), ("GQA", 2), ("MQA", 1))
    repeats: int = 5
    decode_repeats: int = 20
    dtype: str = "float32"
    seed: int = 0


def time_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in milliseconds of ``fn()`` after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_step_ms(model: MultiHeadAttention, prompt: jax.Array, repeats: int) -> float:
    """Median milliseconds of one jit-compiled single-token ``model.decode`` step.

    The cache (``max_length = T + 1``) is prefilled with ``prompt`` [B, T, D]; each
    timed call decodes one token [B, 1, D] at position T, attending to T + 1
    positions, with the cache donated (updated in place). Its ``lengths`` are put
    back to T before each call, outside the timed region, so every call does the
    same work. One untimed call compiles first.
    """
    B, T, D = prompt.shape
    graphdef, state = nnx.split(model)

    def decode(state, x, cache):
        return nnx.merge(graphdef, state).decode(x, cache)

    prefill = jax.jit(decode)
    step = jax.jit(decode, donate_argnums=2)
    _, cache = prefill(state, prompt, model.init_cache(B, T + 1))
    lengths = np.asarray(cache.lengths)  # [B] == T; host copy, the device one is donated
    x_t = prompt[:, -1:]  # [B, 1, D]
    times = []
    for i in range(repeats + 1):
        cache = cache.replace(lengths=jax.block_until_ready(jnp.asarray(lengths)))
        start = time.perf_counter()
        y, cache = step(state, x_t, cache)
        jax.block_until_ready(y)
        if i:  # the first call compiles
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_reference(
    module: MultiHeadAttention, x: np.ndarray, *, is_causal: bool
) -> np.ndarray | None:
    """The module's forward computed by PyTorch (``F.linear`` + SDPA), or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    from attention_jax.interop import to_linear_weights

    w = {name: tuple(None if t is None else torch.tensor(np.array(t, np.float32))
                     for t in pair)
         for name, pair in to_linear_weights(module).items()}
    xt = torch.tensor(np.array(x, np.float32))
    B, T, _ = xt.shape
    N, K, H = module.num_heads, module.num_kv_heads, module.head_dim

    def heads(name, n):  # [B, T, n*H] -> [B, n, T, H]
        return F.linear(xt, *w[name]).view(B, T, n, -1).transpose(1, 2)

    with torch.no_grad():
        out = F.scaled_dot_product_attention(
            heads("q", N), heads("k", K), heads("v", K), is_causal=is_causal,
            scale=module.scale if module.scale is not None else H**-0.5, enable_gqa=True,
        )
        y = F.linear(out.transpose(1, 2).reshape(B, T, -1), *w["o"])
    return y.numpy()


def _jit_split(model: nnx.Module):
    """``(forward, forward_backward, state)`` jit-compiled on the module's split state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, is_causal=True)

    @jax.jit
    def forward_backward(state, x):
        def loss(state, x):
            return jnp.mean(forward(state, x) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1))(state, x)

    return forward, forward_backward, state


def run_sharded(model: MultiHeadAttention, x: jax.Array, y: jax.Array, mesh) -> dict:
    """The module head-parallel on ``mesh``: error against ``y`` and collectives."""
    hp = sharding.head_parallel(nnx.clone(model), mesh)
    forward, forward_backward, state = _jit_split(hp)
    fwd = forward.lower(state, x).compile()
    bwd = forward_backward.lower(state, x).compile()
    y_sharded = fwd(state, x)
    return {
        "sharded_err": float(np.max(np.abs(np.asarray(y_sharded) - np.asarray(y)))),
        "fwd_collectives": format_collectives(sharding.collective_summary(fwd, mesh)),
        "bwd_collectives": format_collectives(sharding.collective_summary(bwd, mesh)),
    }


def run_variant(cfg: DemoConfig, name: str, num_kv_heads: int, mesh=None) -> dict:
    """Builds one variant, checks and times it; returns its table row."""
    dtype = jnp.dtype(cfg.dtype)
    model = MultiHeadAttention(cfg.embed, cfg.num_heads, num_kv_heads=num_kv_heads,
                               param_dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    x = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.batch, cfg.seq_len, cfg.embed),
                          dtype)
    forward, forward_backward, params = _jit_split(model)
    y = forward(params, x)
    ref = torch_reference(model, np.asarray(x), is_causal=True)
    err = None if ref is None else float(np.max(np.abs(np.asarray(y) - ref)))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    sharded = {} if mesh is None else run_sharded(model, x, y, mesh)
    return {
        "variant": name,
        "N": cfg.num_heads,
        "K": num_kv_heads,
        "params": n_params,
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "max_err_vs_torch": err,
        "fwd_ms": time_call(lambda: forward(params, x), cfg.repeats),
        "fwd_bwd_ms": time_call(lambda: forward_backward(params, x), cfg.repeats),
        "decode_step_ms": decode_step_ms(model, x, cfg.decode_repeats),
        **sharded,
    }


def format_table(rows: Sequence[dict]) -> str:
    """Rows of dicts as an aligned plain-text table (the printed one is a rich table).

    Cells are formatted a column at a time (:func:`attention_jax.cli.format_column`).

    >>> print(format_table([{"variant": "MHA", "err": 1.2e-07},
    ...                     {"variant": "MQA", "err": 0.0}]))
    variant       err
    -------  --------
        MHA  1.20e-07
        MQA  0.00e+00
    """
    cols = list(rows[0])
    columns = [format_column([r[c] for r in rows]) for c in cols]
    cells = [[column[i] for column in columns] for i in range(len(rows))]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def default_mesh(num_heads: int, devices: Sequence[jax.Device]):
    """All devices on ``model`` when they divide the heads, else the largest divisor that does."""
    data, model = mesh_shape(num_heads, len(devices))
    return sharding.make_mesh(data, model, devices=devices)


def mesh_shape(num_heads: int, num_devices: int) -> tuple[int, int]:
    """``(data, model)`` of :func:`default_mesh`: ``model`` the largest divisor of both.

    >>> mesh_shape(8, 8), mesh_shape(8, 3), mesh_shape(8, 12)
    ((1, 8), (3, 1), (3, 4))
    """
    model = max(m for m in range(1, num_devices + 1)
                if num_heads % m == 0 and num_devices % m == 0)
    return num_devices // model, model


def check_config(cfg: DemoConfig, num_devices: int) -> None:
    """Raises ValueError, naming the numbers, when the devices cannot run ``cfg``.

    The head-parallel run puts the batch over the mesh's ``data`` axis, so
    ``data`` (:func:`mesh_shape`) must divide ``batch``.

    >>> check_config(DemoConfig(batch=4), 8)
    >>> check_config(DemoConfig(batch=4), 3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --batch 4 does not split over 3 devices: ... use --devices 1, 2, 4 or 8, ...
    """
    for name, value in (("batch", cfg.batch), ("seq_len", cfg.seq_len), ("embed", cfg.embed),
                        ("num_heads", cfg.num_heads), ("repeats", cfg.repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
    data, model = mesh_shape(cfg.num_heads, num_devices)
    if cfg.batch % data:
        fitting = [n for n in range(1, 2 * cfg.num_heads + cfg.batch + 1)
                   if cfg.batch % mesh_shape(cfg.num_heads, n)[0] == 0][:4]
        raise ValueError(
            f"--batch {cfg.batch} does not split over {num_devices} devices: the head-parallel "
            f"mesh is data={data} x model={model} (model divides N={cfg.num_heads} heads and "
            f"the device count), and data={data} must divide the batch; use --devices "
            f"{', '.join(map(str, fitting[:-1]))} or {fitting[-1]}, or --batch {data}, "
            f"{2 * data}, {3 * data}, ...")


def header(cfg: DemoConfig, devices: Sequence[jax.Device], mesh) -> str:
    """One line: versions, devices, shapes, head-parallel mesh."""
    return (f"jax {jax.__version__} on {len(devices)} x {devices[0].platform} "
            f"({devices[0].device_kind}); inputs [B={cfg.batch}, T={cfg.seq_len}, "
            f"D={cfg.embed}], N={cfg.num_heads}, causal, {cfg.dtype}; head-parallel mesh "
            f"{dict(mesh.shape)}")


def write_json(path: Path, cfg: DemoConfig, devices: Sequence[jax.Device], mesh,
               rows: Sequence[dict]) -> None:
    """The config, the devices and the table's rows as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "config": dataclasses.asdict(cfg), "jax": jax.__version__,
        "platform": devices[0].platform, "device": devices[0].device_kind,
        "num_devices": len(devices), "mesh": dict(mesh.shape), "rows": list(rows),
    }, indent=1) + "\n")


def run(cfg: DemoConfig = DemoConfig(), out: str | Path | None = None) -> list[dict]:
    """Runs every variant and prints the table; with ``out``, also writes ``out/demo.json``."""
    devices = jax.devices()
    check_config(cfg, len(devices))
    mesh = default_mesh(cfg.num_heads, devices)
    print_text(header(cfg, devices, mesh))
    rows = []
    with progress_bar(len(cfg.variants), "demo") as bar:
        for name, k in cfg.variants:
            bar.set_postfix_str(name)
            rows.append(run_variant(cfg, name, k, mesh))
            bar.update(1)
    print_table(rows, caption=NOTES)
    if rows[0]["max_err_vs_torch"] is None:
        print_text(f"(torch is not installed: no reference check; {TORCH_HINT})")
    if out is not None:
        path = Path(out) / "demo.json"
        write_json(path, cfg, devices, mesh, rows)
        print_text(f"wrote {path}")
    return rows
