"""Two processes x 4 CPU devices with the context axis across them equal one process.

The experiment (``experiments/multiprocess.py --context 4 --mesh 1 2``) orders the
8 devices so that every context group of the ``(1, 2, 4)`` mesh holds devices of
both processes: ring steps and the all-gather go between processes.
"""

import dataclasses
import importlib.util
import pathlib

ATOL_F32 = 1e-5

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "multiprocess.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("multiprocess_experiment_context", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class _Device:
    id: int
    process_index: int


def test_context_device_order_interleaves_the_processes():
    devices = [_Device(i, i // 4) for i in (7, 0, 1, 2, 3, 4, 5, 6)]
    order = _experiment().context_device_order(devices)
    assert [d.id for d in order] == [0, 4, 1, 5, 2, 6, 3, 7]
    for start in range(0, 8, 2):  # any run of 2 (so any context group >= 2) crosses
        assert {d.process_index for d in order[start:start + 2]} == {0, 1}


def test_two_processes_with_context_across_them_equal_one():
    """Ring and all-gather (zigzag), forward, loss, input and every parameter gradient."""
    result = _experiment().launch(num_processes=2, cpu_devices=4, mesh_shape=(1, 2),
                                  heads=(8, 2), context=4)
    assert (result["process_count"], result["global_devices"], result["local_devices"]) == (2, 8, 4)
    assert result["context_spans_processes"] is True
    assert result["layout"] == "zigzag" and result["context"] == 4
    errs = result["max_abs_err"]
    for strategy in ("ring", "all_gather"):
        assert {f"{strategy}:{k}" for k in ("y", "loss", "g_x", "grad:q_kernel", "grad:k_kernel",
                                             "grad:v_kernel", "grad:o_kernel", "grad:o_bias")
                } <= set(errs)
    for name, err in errs.items():
        assert err < ATOL_F32, (name, err)
