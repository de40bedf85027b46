"""experiments/mask_matrix.py at tiny size: every supported cell within tolerance,
every refusal naming its backend, and a broken backend caught.

The script compares each backend's forward and gradients with the dense einsum
reference (``mask=m.dense(...)``, ``implementation="xla"``) for every mask object,
combination, score_mod and sinks; here it runs at T=24, S=40 (GQA, float32).
"""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from attention_jax import masks as M
from attention_jax import ops

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "mask_matrix.py"


def _load():
    spec = importlib.util.spec_from_file_location("mask_matrix_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mm = _load()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("mask_matrix")
    res = mm.main(["--tiny", "--out", str(out)])
    assert json.loads((out / "mask_matrix.json").read_text())["rows"] == json.loads(
        json.dumps(res["rows"]))
    md = (out / "mask_matrix.md").read_text()
    assert md.count("\n| 24 | 40 |") == len(res["rows"])
    return res


def _extras(case):
    _, kind, sinks = mm.cases(2, 4, 24, 40, 8)[case]
    return kind is not None or sinks


def test_every_supported_cell_is_within_tolerance(result):
    rows = result["rows"]
    assert len(rows) == len(mm.cases(2, 4, 24, 40, 8)) >= 20
    for row in rows:
        assert set(row["cells"]) == set(mm.BACKENDS), row["case"]
        for backend, c in row["cells"].items():
            where = f"{row['case']} / {backend}: {c}"
            assert c["status"] in ("ok", "refused"), where
            if c["status"] == "ok":
                assert c["finite"], where
                assert c["fwd_err"] <= mm.FWD_TOL, where
                assert c["grad_err"] <= mm.GRAD_TOL, where
                assert set(c["grad_abs_errs"]) >= {"q", "k", "v"}, where


def test_refusals_name_the_backend_and_happen_only_where_expected(result):
    cpu = jax.default_backend() == "cpu"
    for row in result["rows"]:
        cells = row["cells"]
        for backend in ("xla", "blockwise", "auto"):  # they take everything
            assert cells[backend]["status"] == "ok", (row["case"], backend)
        expect_decode = "refused" if _extras(row["case"]) else "ok"
        assert cells["decode"]["status"] == expect_decode, row["case"]
        if expect_decode == "refused":
            assert "'decode'" in cells["decode"]["message"]
        if cpu:  # float32 besides: cuDNN takes bf16 / fp16 only
            assert cells["cudnn"]["status"] == "refused", row["case"]
        for backend, c in cells.items():
            if c["status"] == "refused":
                assert backend in c["message"], (row["case"], backend, c["message"])


def test_blockwise_cells_skip_tiles_and_gradients_cover_sinks_and_slopes(result):
    by_case = {r["case"]: r["cells"] for r in result["rows"]}
    for case in ("Causal()", "Segments & Causal()", "FromFunction(s <= t) & SlidingWindow",
                 "BlockSparse.strided (causal)"):
        tiles = by_case[case]["blockwise"]["tiles"]
        assert tiles["skipped"] > 0 and tiles["computed"] > 0, (case, tiles)
    errs = by_case["Chunked & Causal() + alibi + sinks"]["blockwise"]["grad_abs_errs"]
    assert set(errs) == {"q", "k", "v", "sinks", "slopes"}
    assert by_case["Causal()"]["auto"]["picked"] in ("xla", "blockwise", "decode")


def test_a_backend_that_ignores_the_mask_is_caught():
    """The check can fail: a registered backend that drops the mask is out of tolerance."""
    def ignores_mask(q, k, v, mask=None, bias=None, *, is_causal=False, scale=None):
        return ops.attention_core(q, k, v, None, bias, scale=scale)

    ops.register_implementation("mask_matrix_ignores_mask", ignores_mask)
    B, N, K, H, [(T, S)], block, _ = mm.SIZES["tiny"]
    args, cot = mm._inputs(B, N, K, H, T, S)
    mask = M.Causal()
    ref = mm.evaluate("reference", mask, None, False, args, cot, block)
    c = mm.cell("mask_matrix_ignores_mask", mask, None, False, args, cot, block, ref)
    assert c["status"] == "ok" and c["fwd_err"] > 100 * mm.FWD_TOL
    good = mm.cell("xla", mask, None, False, args, cot, block, ref)
    assert good["fwd_err"] <= mm.FWD_TOL
