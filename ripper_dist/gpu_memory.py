"""How many chunks fit on a GPU at once: measured on the device itself, backed off on out-of-memory.

A static estimate from the graph is unreliable (the ONNX shape inference cannot see through the graph's computed pads,
and ORT's CUDA arena, cuDNN workspaces and kernel choice add their own), so the runner *measures*: it runs a batch of
one and a batch of two, reads the device's free memory (NVML) after each, and takes the difference as the memory one
more chunk costs. The batch is then what the remaining free memory holds, with headroom, up to a cap. If a batch
still fails to allocate (another process took memory meanwhile), the runner halves the batch and retries.

NVML counts devices physically, while CUDA (and ORT's `device_id`) counts those in `CUDA_VISIBLE_DEVICES`, which Ray
sets per actor; `physical_device` maps one to the other.
"""
from __future__ import annotations

import os
from typing import Callable

#: Messages with which ORT's CUDA/TensorRT providers report an allocation failure.
_OOM_MARKERS = ("failed to allocate memory", "out of memory", "cudaerrormemoryallocation",
                "cuda_error_out_of_memory", "bfcarena", "cudnn_status_alloc_failed")


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return any(m in text for m in _OOM_MARKERS)


def physical_device(device_id: int, visible: str | None = None) -> str | int:
    """NVML handle key (index or UUID) of the `device_id`-th GPU this process sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return device_id
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if device_id >= len(entries):
        raise ValueError(f"cuda:{device_id} is not among CUDA_VISIBLE_DEVICES={visible}")
    entry = entries[device_id]
    return int(entry) if entry.isdigit() else entry


def nvml_handle(pynvml, device_id: int):
    """NVML handle of the `device_id`-th visible GPU (NVML must be initialised)."""
    key = physical_device(device_id)
    return pynvml.nvmlDeviceGetHandleByIndex(key) if isinstance(key, int) else pynvml.nvmlDeviceGetHandleByUUID(key)


def gpu_memory(device_id: int = 0) -> tuple[int, int]:
    """(free, total) bytes on the `device_id`-th visible GPU, read with NVML (nvidia-ml-py)."""
    import pynvml
    pynvml.nvmlInit()
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(nvml_handle(pynvml, device_id))
        return int(info.free), int(info.total)
    finally:
        pynvml.nvmlShutdown()


def fit_batch(free_after_two: int, per_item: int, *, cap: int, headroom: float = 0.15,
              reserve: int = 512 << 20) -> int:
    """Largest batch that fits: two items already run, plus what the remaining free memory holds.

    `headroom` (a fraction of the free memory) and `reserve` (bytes) are kept free for fragmentation, other arenas
    (cuDNN/cuBLAS workspaces grow with the batch too) and the host-device copies.
    """
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if per_item <= 0:  # nothing grew with the batch: memory is not what limits it
        return cap
    spare = max(0, int(free_after_two * (1 - headroom)) - reserve)
    return max(1, min(cap, 2 + spare // per_item))


def calibrate(run: Callable[[int], object], free_bytes: Callable[[], int], *, cap: int) -> tuple[int, dict]:
    """Measure the memory one more chunk costs and return (batch, measurements).

    `run(b)` runs a batch of `b` chunks on the device; `free_bytes()` reads the device's free memory. The arena keeps
    what a run allocated, so the free memory after each run is the footprint of the largest batch so far. Where the
    arena cannot reuse the batch-of-one blocks for the batch of two, the difference overstates one chunk's cost (up
    to 2x): the batch errs small, never into an out-of-memory.
    """
    if cap <= 1:
        return 1, {"cap": cap}
    before = free_bytes()
    run(1)
    after_one = free_bytes()
    run(2)
    after_two = free_bytes()
    per_item = after_one - after_two
    batch = fit_batch(after_two, per_item, cap=cap)
    return batch, {"free_before": before, "free_after_one": after_one, "free_after_two": after_two,
                   "per_item": per_item, "first_item": before - after_one, "batch": batch, "cap": cap}
