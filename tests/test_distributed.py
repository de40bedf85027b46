"""More than one process: 2 local processes x 4 CPU devices equal one process."""

import importlib.util
import pathlib

import pytest

from attention_jax import distributed

ATOL_F32 = 1e-5

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "multiprocess.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("multiprocess_experiment", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_equal_one(tmp_path):
    """Forward and gradients across 2 processes, then a checkpoint written by both.

    The workers take one SGD-with-momentum step and each saves its own shards;
    this process (8 devices, mesh (1, 8)) restores them and must find the same
    parameters and momentum as the step taken on one device.
    """
    result = _experiment().launch(num_processes=2, cpu_devices=4, mesh_shape=(2, 4),
                                  heads=(8, 2), checkpoint_dir=tmp_path / "ckpt")
    assert result["checkpoint_step"] == 1
    restored = result["checkpoint_err"]
    assert {"param:q_kernel", "param:k_kernel", "param:o_bias", "opt:step"} <= set(restored)
    assert any(k.startswith("opt:opt_state") and "q_kernel" in k for k in restored), restored
    for name, err in restored.items():
        assert err < ATOL_F32, (name, err)
    assert (result["process_count"], result["global_devices"], result["local_devices"]) == (2, 8, 4)
    # forward output, loss, input gradient and every parameter gradient
    names = set(result["max_abs_err"])
    assert {"y", "loss", "g_x", "grad:q_kernel", "grad:k_kernel", "grad:v_kernel",
            "grad:o_kernel", "grad:o_bias"} <= names
    for name, err in result["max_abs_err"].items():
        assert err < ATOL_F32, (name, err)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coordinator_address": "127.0.0.1:1234"},
         "needs num_processes and process_id; got num_processes=None, process_id=None"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
         r"process_id must be in \[0, 2\); got 2"),
    ],
)
def test_initialize_errors_name_the_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_process_info_single_process():
    info = distributed.process_info()
    assert info.process_count == 1 and info.process_index == 0
    assert info.global_device_count == info.local_device_count == 8
