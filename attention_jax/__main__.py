"""``python -m attention_jax`` / ``attention-jax``: the main job.

Fake CPU devices are requested before JAX starts (they change nothing on a
machine with an accelerator, whose devices stay the default).
"""

from __future__ import annotations

import argparse

from attention_jax.runtime import use_fake_cpu_devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-jax",
        description="Run MHA, GQA and MQA side by side: check against PyTorch, time, tabulate.",
    )
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices when there is no accelerator (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length T")
    parser.add_argument("--batch", type=int, default=4, help="batch size B")
    args = parser.parse_args(argv)
    use_fake_cpu_devices(args.devices)

    from attention_jax import demo

    demo.run(demo.DemoConfig(batch=args.batch, seq_len=args.seq_len))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
