"""The ``dots`` benchmark section at ``--tiny``: its rows, checked against themselves.

Times mean nothing here (toy shapes, a shared machine); the tests check that every
product of the blockwise kernel is there with the tile count of the kernel's own
blocks, that JAX and torch compute the same product, and that the sums and ratios
are the numbers they are made of.
"""

import json

import numpy as np
import pytest

from attention_jax.benchmarks import attention, attention_dots
from attention_jax.kernels import blockwise


@pytest.fixture(scope="module")
def dots(tmp_path_factory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench_dots")
    attention.main(["--sections", "dots", "--tiny", "--no-plot", "--out", str(out)])
    return json.loads((out / "bench_attention_cpu.json").read_text())["dots"]


def test_every_product_of_the_kernel_at_its_tiles(dots):
    shape = dots["shape"]
    bq, bk = blockwise.default_block_sizes(shape["T"], shape["S"])
    assert (shape["block_q"], shape["block_kv"]) == (bq, bk)
    assert shape["tiles"] == -(-shape["T"] // bq) * -(-shape["S"] // bk)
    rows = {r["product"]: r for r in dots["rows"]}
    assert list(rows) == [*attention_dots.PRODUCTS, "sum", "fwd+bwd"]
    for name in attention_dots.PRODUCTS:
        r = rows[name]
        assert r["max_abs_diff"] < 1e-3, (name, r["max_abs_diff"])  # the same product
        assert r["jax_ms"] > 0 and r["torch_ms"] > 0
        assert r["jax_over_torch"] == pytest.approx(r["jax_ms"] / r["torch_ms"])
        # one call is one tile
        median = dots["results"][f"jax {name}"]["median_ms"]
        assert r["jax_ms"] == pytest.approx(shape["tiles"] * median)
    products = [rows[n] for n in attention_dots.PRODUCTS]
    for side in ("jax_ms", "torch_ms"):
        assert rows["sum"][side] == pytest.approx(sum(r[side] for r in products))
    assert dots["jax_dots_over_torch_fwd_bwd"] == pytest.approx(
        rows["sum"]["jax_ms"] / rows["fwd+bwd"]["torch_ms"])


def test_products_are_the_kernels_contractions():
    """Each product's einsum agrees with numpy on its operands (letters as documented)."""
    ops = attention_dots.tile_operands(1, 2, 6, 10, 4)
    for name, (spec, a_dims, b_dims) in attention_dots.PRODUCTS.items():
        a, b = ops[name]
        size = {"M": 6, "S": 10, "H": 4}
        assert a.shape[2:] == tuple(size[d] for d in a_dims), name
        assert b.shape[2:] == tuple(size[d] for d in b_dims), name
        got = np.asarray(attention_dots.jax_product(spec)(a, b))
        np.testing.assert_allclose(got, np.einsum(spec.replace("BK", "bk").lower(), a, b),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        torch_got = attention_dots.torch_product(spec, a, b)().numpy()
        np.testing.assert_allclose(torch_got.reshape(got.shape), got, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
