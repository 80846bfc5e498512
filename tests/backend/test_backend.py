"""Backend registry, resolution rules and their error reasons; the scoped configuration."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import aslcal
from aslcal import BackendUnavailableError, InputError, config_context, get_config
from aslcal.backend import (
    array_namespace,
    available_backends,
    get_backend,
    is_cupy_array,
    resolve_backend,
    resolve_dtype,
    to_host,
)
from aslcal.backend import _registry


class FakeCupyArray:
    """Stands in for cupy.ndarray: is_cupy_array looks the class up in sys.modules."""

    shape = (3,)
    dtype = np.dtype(np.float32)

    def get(self):
        return np.arange(3, dtype=np.float32)


@pytest.fixture
def fake_cupy(monkeypatch):
    mod = types.ModuleType("cupy")
    mod.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


def test_registry_lists_three_backends_with_reasons():
    av = available_backends()
    assert set(av) == {"numpy", "numba", "cuda"}
    assert av["numpy"][0] is True
    assert av["numba"][0] is True  # numba is a core dependency
    for ok, reason in av.values():
        assert isinstance(reason, str) and len(reason) > 10


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setattr(_registry, "_check_cuda", lambda: (False, "no CUDA GPU or driver found (test)"))
    monkeypatch.setitem(_registry._REGISTRY, "cuda", _registry.Backend("cuda", "x", _registry._check_cuda))
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable: no CUDA GPU or driver found"):
        resolve_backend("cuda")


def test_unknown_backend_name_is_input_error():
    with pytest.raises(InputError, match="backend='gpu'"):
        resolve_backend("gpu")
    with pytest.raises(InputError, match="expected one of"):
        get_backend("opencl")


def test_auto_picks_numba_for_host_data_without_gpu(monkeypatch):
    monkeypatch.setattr(_registry, "_check_cuda", lambda: (False, "no GPU (test)"))
    assert resolve_backend("auto", np.zeros(3), n_items=10**7).name == "numba"


def test_auto_picks_cuda_only_for_large_problems_when_a_gpu_exists(monkeypatch):
    monkeypatch.setattr(_registry, "_check_cuda", lambda: (True, "fake GPU"))
    monkeypatch.setattr(_registry, "cudasim_enabled", lambda: False)
    monkeypatch.setitem(_registry._REGISTRY, "cuda", _registry.Backend("cuda", "x", lambda: (True, "fake GPU")))
    assert resolve_backend("auto", np.zeros(3), n_items=_registry.AUTO_CUDA_MIN_VOXELS).name == "cuda"
    assert resolve_backend("auto", np.zeros(3), n_items=_registry.AUTO_CUDA_MIN_VOXELS - 1).name == "numba"


def test_gpu_data_forces_cuda_and_refuses_cpu_backends(fake_cupy, monkeypatch):
    arr = FakeCupyArray()
    assert is_cupy_array(arr)
    monkeypatch.setitem(_registry._REGISTRY, "cuda", _registry.Backend("cuda", "x", lambda: (True, "fake GPU")))
    assert resolve_backend("auto", arr).name == "cuda"
    with pytest.raises(InputError, match="runs on the CPU but the data are a CuPy"):
        resolve_backend("numba", arr)


def test_gpu_data_without_cuda_backend_is_an_error(fake_cupy, monkeypatch):
    monkeypatch.setitem(_registry._REGISTRY, "cuda", _registry.Backend("cuda", "x", lambda: (False, "numba-cuda missing")))
    with pytest.raises(BackendUnavailableError, match="numba-cuda missing"):
        resolve_backend("auto", FakeCupyArray())


def test_is_cupy_array_never_imports_cupy(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert is_cupy_array(np.zeros(2)) is False
    assert "cupy" not in sys.modules


def test_to_host_copies_device_arrays(fake_cupy):
    np.testing.assert_array_equal(to_host(FakeCupyArray()), [0, 1, 2])
    x = np.ones(2)
    assert to_host(x) is x


def test_array_namespace_refuses_mixed_devices(fake_cupy):
    with pytest.raises(InputError, match="different devices"):
        array_namespace(np.zeros(2), FakeCupyArray())
    xp = array_namespace(np.zeros(2), None, 3.0)
    assert xp.asarray([1.0]).dtype == np.float64


def test_resolve_dtype_auto_follows_device():
    assert resolve_dtype("auto", get_backend("numba")) == np.float64
    assert resolve_dtype("auto", get_backend("cuda")) == np.float32
    assert resolve_dtype("float32", get_backend("numba")) == np.float32
    with pytest.raises(InputError, match="dtype='int8'"):
        resolve_dtype("int8", get_backend("numba"))


def test_config_context_is_scoped_and_validated():
    before = dict(get_config())
    with config_context(backend="numpy", dtype="float32") as cfg:
        assert cfg["backend"] == "numpy" and get_config()["dtype"] == "float32"
        assert resolve_backend(None).name == "numpy"
        with config_context(dtype=np.float64):
            assert get_config()["dtype"] == "float64"
        assert get_config()["dtype"] == "float32"
    assert dict(get_config()) == before
    with pytest.raises(InputError, match="backend='tpu'"):
        with config_context(backend="tpu"):
            pass
    with pytest.raises(InputError, match="unknown configuration key"):
        aslcal.set_config(colour="blue")


def test_environment_defaults(monkeypatch):
    from aslcal import config

    monkeypatch.setenv("ASLCAL_BACKEND", "numba")
    monkeypatch.setenv("ASLCAL_DTYPE", "float32")
    assert config._from_env()["backend"] == "numba"
    assert config._from_env()["dtype"] == "float32"
    monkeypatch.setenv("ASLCAL_BACKEND", "quantum")
    with pytest.raises(InputError, match="ASLCAL_BACKEND"):
        config._from_env()
