"""The CUDA, cuDNN and TensorRT libraries onnxruntime-gpu loads, found in the pip wheels of the `gpu`/`tensorrt`
extras and loaded before the first GPU session.

onnxruntime-gpu does not depend on these wheels (a machine may have a system CUDA instead), and its provider
libraries find them only when they are on the loader's path or already loaded: `onnxruntime.preload_dlls()` loads
the CUDA and cuDNN ones from the `nvidia` wheels; TensorRT's `tensorrt_libs` wheel is loaded here. Both are no-ops
where the wheels are absent (a system install is then used, or the provider reports what is missing).
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: What the CUDA and TensorRT providers of the installed onnxruntime-gpu (1.31, CUDA 13) link to.
CUDA_LIBS = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
             "libcudnn.so.9")
TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def cuda_version() -> str | None:
    """The CUDA version the installed onnxruntime was built with (None for a CPU-only build)."""
    try:
        from onnxruntime.capi import build_and_package_info as b
    except ImportError:
        return None
    return getattr(b, "cuda_version", None) or None


@functools.cache
def preload() -> list[str]:
    """Load the GPU libraries from the pip wheels once per process; returns the TensorRT files loaded (the CUDA
    ones are onnxruntime's business and it prints what failed)."""
    import onnxruntime as ort
    if cuda_version() and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - a failed preload is reported by the provider that needs it
            log.info("onnxruntime.preload_dlls: %s", e)
    loaded = []
    try:
        import tensorrt_libs
        root = Path(tensorrt_libs.__file__).parent
    except ImportError:
        return loaded
    for name in TENSORRT_LIBS:
        path = root / name
        if path.exists():
            try:
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                loaded.append(name)
            except OSError as e:
                log.info("%s: %s", path, e)
    return loaded


def missing(names=CUDA_LIBS + TENSORRT_LIBS) -> dict[str, str]:
    """Libraries the dynamic loader cannot load now (after `preload`), with its reason: what a provider will miss."""
    out = {}
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            out[name] = str(e)
    return out
