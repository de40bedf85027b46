"""``python -m attention_jax`` / ``attention-jax``: the command line.

With no arguments it runs the main job (:mod:`attention_jax.demo`) on 8 fake CPU
devices when there is no accelerator; ``attention-jax --help`` lists the
subcommands (demo, bench, decode, shard). The parser is :mod:`attention_jax.cli`.
"""

from __future__ import annotations

from attention_jax.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
