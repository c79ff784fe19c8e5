"""The CUDA, cuDNN and TensorRT libraries onnxruntime-gpu loads, found in the pip wheels of the `gpu` (CUDA 13),
`gpu-cu12` (CUDA 12) or `tensorrt` extras and loaded before the first GPU session.

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

#: What the CUDA provider links to, per CUDA major version of the onnxruntime-gpu build (1.31: CUDA 13, the `gpu`
#: extra; 1.22-1.26: CUDA 12, the `gpu-cu12` extra), in load order (cuBLAS needs cuBLASLt loaded first).
CUDA_LIBS_BY_MAJOR = {
    13: ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12",
         "libcudnn.so.9"),
    12: ("libcudart.so.12", "libcublasLt.so.12", "libcublas.so.12", "libcurand.so.10", "libcufft.so.11",
         "libcudnn.so.9"),
}
#: The extra that brings each build's runtime wheels.
EXTRA_FOR_MAJOR = {13: "gpu", 12: "gpu-cu12"}
TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def cuda_version() -> str | None:
    """The CUDA version the installed onnxruntime was built with (None for a CPU-only build)."""
    try:
        from onnxruntime.capi import build_and_package_info as b
    except ImportError:
        return None
    return getattr(b, "cuda_version", None) or None


def cuda_major(version: str | None = None) -> int | None:
    """Major version of `version` (default: the installed onnxruntime's CUDA), None for a CPU build."""
    version = cuda_version() if version is None else version
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def cuda_libs(major: int | None = None) -> tuple[str, ...]:
    """The CUDA/cuDNN libraries the installed onnxruntime-gpu build (or CUDA `major`) loads."""
    major = cuda_major() if major is None else major
    return CUDA_LIBS_BY_MAJOR.get(major or 13, CUDA_LIBS_BY_MAJOR[13])


#: The current build's libraries (CUDA 13 where onnxruntime is a CPU build).
CUDA_LIBS = cuda_libs()


def wheel_libs(names, roots=None) -> dict[str, Path]:
    """Where the NVIDIA runtime wheels (`nvidia-*-cu12`, `nvidia-*` for CUDA 13, each under the `nvidia` namespace
    package) hold the libraries `names`: name -> file. `roots`: the namespace folders (default: `nvidia.__path__`)."""
    if roots is None:
        try:
            import nvidia
            roots = list(nvidia.__path__)
        except ImportError:
            return {}
    found: dict[str, Path] = {}
    for root in roots:
        for path in sorted(Path(root).glob("**/lib*/lib*.so*")):
            if path.name in names and path.name not in found:
                found[path.name] = path
    return found


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
    if cuda_version():  # what ORT's preload did not load (older ORT without it, or another wheel layout)
        names = cuda_libs()
        for name, path in sorted(wheel_libs(names).items(), key=lambda kv: names.index(kv[0])):
            if name in missing((name,)):
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    log.info("%s: %s", path, e)
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


def missing(names=None) -> dict[str, str]:
    """Libraries the dynamic loader cannot load now (after `preload`), with its reason: what a provider will miss
    (default: the installed build's CUDA libraries and TensorRT's)."""
    names = cuda_libs() + TENSORRT_LIBS if names is None else names
    out = {}
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError as e:
            out[name] = str(e)
    return out


def driver_advice(driver_cuda: tuple[int, int] | None, built: str | None) -> tuple[str | None, str]:
    """(the extra this machine's driver needs, one line saying why and whether the installed onnxruntime fits).

    `driver_cuda`: the newest CUDA the NVIDIA driver supports (NVML's nvmlSystemGetCudaDriverVersion), None without
    a driver. `built`: the CUDA version the installed onnxruntime-gpu was built for (None: a CPU build). A build for
    a newer CUDA than the driver's fails to start its provider; CUDA minor versions are compatible within a major."""
    if driver_cuda is None:
        return None, "no NVIDIA driver: GPU extras are of no use here"
    major, minor = driver_cuda
    extra = EXTRA_FOR_MAJOR.get(min(major, max(EXTRA_FOR_MAJOR))) if major >= min(EXTRA_FOR_MAJOR) else None
    if extra is None:
        return None, (f"the driver supports CUDA {major}.{minor} only: onnxruntime-gpu needs CUDA 12 or 13, "
                      "upgrade the NVIDIA driver (525+ for CUDA 12, 580+ for CUDA 13)")
    install = f'pip install -e ".[{extra}]"'
    built_major = cuda_major(built) if built else None
    if built_major is None:
        fit = f"onnxruntime here is a CPU build: {install}"
    elif built_major > major:
        fit = f"the installed onnxruntime-gpu is built for CUDA {built}, newer than the driver's: {install}"
    elif built_major < major and extra != EXTRA_FOR_MAJOR.get(built_major):
        fit = f"the installed onnxruntime-gpu (CUDA {built}) works with it; {install} gives the build for CUDA {major}"
    else:
        fit = f"the installed onnxruntime-gpu (CUDA {built}) fits"
    return extra, f"driver supports CUDA {major}.{minor}: extra `{extra}`; {fit}"


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the newest CUDA the NVIDIA driver supports, from NVML; None without a driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetCudaDriverVersion()
    except Exception:  # noqa: BLE001 - no driver, no NVML: no GPU to advise on
        return None
    return v // 1000, (v % 1000) // 10
