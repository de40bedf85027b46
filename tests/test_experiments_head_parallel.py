"""Smoke test of the head-parallel benchmark (``attention-jax shard``): tiny shapes, 8 fake
CPU devices; and of ``experiments/head_parallel.py``, the thin script over it."""

import functools
import importlib.util
import json
import pathlib
import sys

import pytest

from attention_jax.benchmarks import head_parallel

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "head_parallel.py"

ATOL_FWD_F32 = 1e-5  # max |y_sharded - y_one_device|, float32, tiny shapes
ATOL_GRAD_F32 = 1e-4  # max over every parameter gradient and the input gradient
MESH = (2, 4)  # data x model
VARIANTS = (("MHA", 8, 8), ("MQA", 8, 1))  # kv heads split / replicated over model


def _load():
    return head_parallel


@functools.cache
def _load_script():
    """The thin script as a module (what notebook 02 does)."""
    spec = importlib.util.spec_from_file_location("experiments_head_parallel", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_script_reexports_the_benchmark():
    script = _load_script()
    for name in ("Config", "build", "programs", "run_sharded", "run_baseline", "reference_for",
                 "table_rows", "FAKE_NOTE", "expected_baseline_transfers", "baseline_forward",
                 "main"):
        assert getattr(script, name) is getattr(head_parallel, name), name


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    exp = _load()
    out = tmp_path_factory.mktemp("hp")
    cfg = exp.Config(batch=4, seq_len=4, embed=16, head_dim=4, meshes=(MESH,),
                     variants=VARIANTS, repeats=1, out=str(out), plot=True)
    return exp.run(cfg), out


def _rows(result, layout):
    return [r for r in result[0]["rows"] if (r["layout"] == "shard_map") == (layout == "shard")]


def test_sharded_rows_match_one_device(result):
    rows = _rows(result, "shard")
    assert [(r["variant"], r["N"], r["K"]) for r in rows] == list(VARIANTS)
    for r in rows:
        assert r["mesh"] == "2x4"
        assert 0 <= r["err_fwd"] < ATOL_FWD_F32, r
        assert 0 <= r["err_grad"] < ATOL_GRAD_F32, r
    # K=8 splits over model=4; K=1 is replicated (model % K == 0)
    assert [r["kv_layout"] for r in rows] == ["split", "replicated"]


def test_collectives_one_all_reduce_forward(result):
    for r in _rows(result, "shard"):
        assert r["fwd_collectives"] == {"all-reduce@model": 1}, r
        assert r["bwd_collectives"] == {"all-reduce@model": 1, "all-reduce@data": 1}, r
        assert r["transfers_per_call"] == 0


def test_q_kernel_split_over_model(result):
    D, H, model = 16, 4, MESH[1]
    for r in _rows(result, "shard"):
        total = D * r["N"] * H * 4  # float32 [D, N, H]
        assert r["q_kernel_bytes_total"] == total
        assert r["q_kernel_bytes_per_device"] == total // model
        assert r["param_bytes_per_device"] < r["param_bytes_total"]


def test_baseline_transfers_counted(result):
    rows = _rows(result, "baseline")
    assert len(rows) == len(VARIANTS)
    B, T, D, H = 4, 4, 16, 4
    # 8 heads on 8 devices: heads 1..7 leave device 0; each gets x, q/k/v kernels and
    # biases (7 puts) and sends its output back (1 put).
    per_head_bytes = 4 * (B * T * D + 3 * (D * H + H) + B * T * H)
    for r in rows:
        assert r["transfers_per_call"] == 7 * 8
        assert r["transfer_bytes_per_call"] == 7 * per_head_bytes
        assert 0 <= r["err_fwd"] < ATOL_FWD_F32, r
        assert r["step_ms"] is None and r["fwd_collectives"] == {}


def test_table_and_files(result):
    res, out = result
    assert "device_put loop" in res["table"]
    assert "all-reduce@model:1, all-reduce@data:1" in res["table"]  # fixed order: model first
    saved = json.loads((out / "head_parallel.json").read_text())
    assert len(saved["rows"]) == 2 * len(VARIANTS)
    if (out / "head_parallel.png").exists():  # absent only without matplotlib
        assert (out / "head_parallel.png").stat().st_size > 1000


def test_cli_parses_meshes():
    exp = _load()
    assert exp._mesh_arg("2x4") == (2, 4)
    with pytest.raises(Exception, match="2x4"):
        exp._mesh_arg("24")


@pytest.mark.parametrize(("n", "expected"), [
    (8, ((1, 8), (2, 4), (4, 2), (8, 1))),  # the default config's MESHES
    (2, ((1, 2), (2, 1))),
    (16, ((2, 8), (4, 4), (8, 2))),  # model <= N = 8, data <= batch = 8
    (3, ()),  # 3 divides neither the batch nor the heads
])
def test_mesh_shapes_of_a_device_count(n, expected):
    exp = _load()
    assert exp.mesh_shapes(n, exp.Config()) == expected


def test_default_meshes_on_eight_devices():
    exp = _load()
    assert exp.default_meshes(exp.Config()) == exp.MESHES
    one_variant = exp.Config(batch=4, variants=(("MQA", 8, 1),))
    assert exp.mesh_shapes(8, one_variant) == ((1, 8), (2, 4), (4, 2))
