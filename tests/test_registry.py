"""The backend table: the same answer whatever was imported first, user backends added."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import ops

PROBE = "print(o.default_implementation(), o.available_implementations())"


def _probe(imports: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", f"{imports}; {PROBE}"], capture_output=True, text=True,
        check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    return out.stdout.strip()


def test_default_does_not_depend_on_import_order():
    alone = _probe("import attention_jax.ops as o")
    after_package = _probe("import attention_jax; import attention_jax.ops as o")
    assert alone == after_package
    assert alone.startswith("auto (") and "'blockwise'" in alone and "'decode'" in alone


def test_builtin_names_cannot_be_replaced():
    with pytest.raises(ValueError, match="'blockwise' is built in"):
        ops.register_implementation("blockwise", ops.attention_core)


def test_user_backend_is_dispatched_to(monkeypatch):
    calls = []

    def mine(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        calls.append(q.shape)
        return ops.attention_core(q, k, v, mask, bias, is_causal=is_causal, scale=scale)

    monkeypatch.setitem(ops._USER_IMPLEMENTATIONS, "mine", mine)
    q = jnp.ones((1, 3, 2, 4))
    out = ops.dot_product_attention(q, q, q, implementation="mine")
    assert calls == [(1, 3, 2, 4)]
    np.testing.assert_array_equal(out, ops.attention_core(q, q, q))
    assert "mine" in ops.available_implementations()


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown implementation 'flash'; available: \('xla'"):
        ops.dot_product_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)),
                                  jnp.ones((1, 2, 1, 4)), implementation="flash")
