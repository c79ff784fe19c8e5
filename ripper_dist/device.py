"""Device strings (`-d/--device`): parsed once, case-insensitively, into one canonical form.

Every layer (the ONNX Runtime session, the Ray actor pool, batch sizing) reads the canonical string, so `CUDA`,
` cuda:0 ` and `cuda` mean the same everywhere, and anything else (`gpu`, `cuda:x`) is an error before work starts.
"""
from __future__ import annotations

KINDS = ("cpu", "cuda", "tensorrt")
GPU_KINDS = ("cuda", "tensorrt")


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 'TensorRT:0' ... -> (kind, device index)."""
    text = str(device).strip()
    kind, sep, idx = text.partition(":")
    kind = kind.strip().lower()
    hint = "use cpu, cuda[:N] or tensorrt[:N]"
    if kind not in KINDS:
        extra = " (NVIDIA GPUs are 'cuda')" if kind in ("gpu", "nvidia") else ""
        raise ValueError(f"unknown device {device!r}{extra}: {hint}")
    if sep:
        if not idx.strip().isdigit():
            raise ValueError(f"device {device!r}: the index after ':' must be a number: {hint}")
        if kind == "cpu":
            raise ValueError(f"device {device!r}: the CPU has no index: use cpu")
    return kind, int(idx) if sep else 0


def canonical(device: str) -> str:
    """The one spelling of a device: 'cpu', 'cuda:N' or 'tensorrt:N'."""
    kind, idx = parse_device(device)
    return kind if kind == "cpu" else f"{kind}:{idx}"


def is_gpu(device: str) -> bool:
    return parse_device(device)[0] in GPU_KINDS
