"""An exported graph at run time: ONNX Runtime session, providers, threads, and the metadata the graph carries.

The graph's `metadata_props` say everything the runtime needs (family, sources, rates, chunk length), so workers need
only the ONNX bytes. Asking for a GPU provider that cannot start is an error, never a silent CPU fallback.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


class ProviderError(RuntimeError):
    """The requested execution provider is not available or failed to start."""


@dataclass(frozen=True)
class GraphInfo:
    family: str
    sources: tuple[str, ...]
    sample_rate: int
    channels: int
    chunk_samples: int
    segment_samples: int
    raw: dict

    @classmethod
    def from_metadata(cls, meta: dict) -> "GraphInfo":
        try:
            return cls(
                family=meta["ripper.family"],
                sources=tuple(json.loads(meta["ripper.sources"])),
                sample_rate=int(meta["ripper.sample_rate"]),
                channels=int(meta["ripper.channels"]),
                chunk_samples=int(meta["ripper.chunk_samples"]),
                segment_samples=int(meta.get("ripper.segment_samples", meta["ripper.chunk_samples"])),
                raw=dict(meta),
            )
        except KeyError as e:
            raise ValueError(f"ONNX graph lacks ripper metadata {e}; export it with `ripper-dist export`") from None


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 'tensorrt' | 'tensorrt:0' -> (kind, device_id)."""
    kind, _, idx = device.partition(":")
    kind = kind.lower()
    if kind not in ("cpu", "cuda", "tensorrt"):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda[:N] or tensorrt[:N]")
    return kind, int(idx or 0)


def providers_for(device: str, *, trt_cache: Path | None = None, fp16: bool = False) -> list:
    kind, idx = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": idx})
    if kind == "cuda":
        return [cuda, "CPUExecutionProvider"]
    trt_opts = {"device_id": idx, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(trt_cache or Path.home() / ".cache" / "ripper-dist" / "trt")}
    return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's cpuset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def make_session(model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 *, profile: str | None = None, spin: bool = True) -> ort.InferenceSession:
    """Create a session; raise ProviderError when the requested GPU provider did not start."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or int(os.environ.get("RIPPER_DIST_THREADS", 0)) or _usable_cores()
    if not spin:  # a process sharing its cores (a Ray actor beside the driver) must not busy-wait between ops
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    kind, _ = parse_device(device)
    providers = providers_for(device)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if wanted not in ort.get_available_providers():
        raise ProviderError(f"{wanted} is not available in this onnxruntime build "
                            f"(available: {', '.join(ort.get_available_providers())}); use --device cpu")
    src = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as e:  # provider libraries missing, CUDA init failure...
        if kind != "cpu":
            raise ProviderError(f"{wanted} failed to start: {e}") from e
        raise
    if sess.get_providers()[0] != wanted:
        raise ProviderError(f"{wanted} did not start (session runs on {sess.get_providers()}); check CUDA/cuDNN "
                            "libraries and the GPU, or use --device cpu")
    return sess


def read_info(model: bytes | str | Path) -> GraphInfo:
    """Metadata only: parses the protobuf without loading external weight files or starting a session."""
    import io

    import onnx
    proto = onnx.load_model(io.BytesIO(model) if isinstance(model, bytes) else str(model), load_external_data=False)
    return GraphInfo.from_metadata({p.key: p.value for p in proto.metadata_props})


class OnnxRunner:
    """The engine's runner protocol over one ONNX Runtime session: `(B, C, chunk) -> (B, S, C, chunk)` float32."""

    def __init__(self, model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 *, profile: str | None = None, spin: bool = True):
        self.session = make_session(model, device, threads, profile=profile, spin=spin)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = GraphInfo.from_metadata(meta)
        self.chunk_samples = self.info.chunk_samples
        self.device = device
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self._output], {self._input: batch})[0]
