"""Batch sizing for GPUs: device index mapping, the fitting rule, calibration and the out-of-memory test."""
import sys
import types

import pytest

from ripper_dist.gpu_memory import calibrate, fit_batch, gpu_memory, is_out_of_memory, physical_device


def test_physical_device_follows_cuda_visible_devices():
    assert physical_device(0, "") == 0 and physical_device(1, "") == 1
    assert physical_device(0, "3,1") == 3 and physical_device(1, "3,1") == 1
    assert physical_device(0, "GPU-8a1f,GPU-77") == "GPU-8a1f"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        physical_device(2, "3,1")


def test_fit_batch():
    gib, mib = 1 << 30, 1 << 20
    assert fit_batch(10 * gib, 1 * gib, cap=64) == 2 + (int(10 * gib * 0.85) - 512 * mib) // gib
    assert fit_batch(10 * gib, 1 * gib, cap=4) == 4
    assert fit_batch(100 * mib, 1 * gib, cap=64) == 2  # two already ran
    assert fit_batch(10 * gib, 0, cap=8) == 8  # memory does not grow with the batch
    with pytest.raises(ValueError):
        fit_batch(1, 1, cap=0)


def test_calibrate_runs_one_then_two_and_reads_the_difference():
    runs, free = [], [20 << 30]

    def run(b):
        runs.append(b)
        free[0] = (20 << 30) - (2 << 30) - b * (1 << 30)
    batch, m = calibrate(run, lambda: free[0], cap=32)
    assert runs == [1, 2] and m["per_item"] == 1 << 30 and m["first_item"] == 3 << 30
    assert batch == fit_batch(16 << 30, 1 << 30, cap=32)
    assert calibrate(run, lambda: 0, cap=1)[0] == 1


def test_out_of_memory_messages():
    assert is_out_of_memory(RuntimeError("CUDA failure 2: out of memory ; GPU=0"))
    assert is_out_of_memory(RuntimeError("BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer"))
    assert not is_out_of_memory(RuntimeError("Invalid rank for input: mix"))


def test_gpu_memory_reads_nvml_for_the_visible_device(monkeypatch):
    """NVML is asked for the physical GPU behind cuda:N (by UUID when CUDA_VISIBLE_DEVICES names UUIDs)."""
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or i,
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or u,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(free=5, total=9))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert gpu_memory(0) == (5, 9) and ("index", 2) in calls and calls[-1] == "shutdown"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ab")
    assert gpu_memory(0) == (5, 9) and ("uuid", "GPU-ab") in calls
