"""An exported graph at run time: ONNX Runtime session, providers, threads, and the metadata the graph carries.

The graph's `metadata_props` say everything the runtime needs (family, sources, rates, chunk length), so workers need
only the ONNX bytes. Asking for a GPU provider that cannot start is an error, never a silent CPU fallback.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .device import parse_device
from .placement import usable_cores

log = logging.getLogger(__name__)

#: `--batch-size auto` on a GPU: at most this many chunks per run (htdemucs: 16 x 7.8 s; beyond that a GPU is busy
#: anyway, and a Ray batch's outputs, 16 x 44 MB, stay small in the object store). Also TensorRT's largest profile
#: batch when none is given.
AUTO_BATCH_CAP = 16


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


def providers_for(device: str, *, trt_cache: Path | None = None, fp16: bool = False,
                  trt_shapes: tuple[str, tuple[int, ...], int] | None = None) -> list:
    """ORT providers for a device. The CUDA arena grows by what is asked (not by doubling), so a batch measured to
    fit is not refused for the arena's rounding. TensorRT gets an engine + timing cache (building an engine takes
    minutes; the cache makes it once per GPU model and graph) and, given `trt_shapes` = (input name, shape of one item,
    largest batch), an optimisation profile over the dynamic batch axis so no batch size rebuilds the engine."""
    kind, idx = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": idx, "arena_extend_strategy": "kSameAsRequested"})
    if kind == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if trt_cache is None:
        from .sources import cache_dir
        trt_cache = cache_dir() / "tensorrt"
    trt_opts = {"device_id": idx, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(trt_cache), "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(trt_cache)}
    if trt_shapes is not None:
        name, item, largest = trt_shapes
        dims = "x".join(str(d) for d in item)
        trt_opts |= {"trt_profile_min_shapes": f"{name}:1x{dims}",
                     "trt_profile_opt_shapes": f"{name}:{largest}x{dims}",
                     "trt_profile_max_shapes": f"{name}:{largest}x{dims}"}
    return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]


def _trt_shapes(model: bytes | str | Path, largest: int) -> tuple[str, tuple[int, ...], int]:
    """(input name, per-item shape, largest batch) for TensorRT's profile (parses the graph once; TensorRT only)."""
    import io

    import onnx
    proto = onnx.load_model(io.BytesIO(model) if isinstance(model, bytes) else str(model), load_external_data=False)
    inp = proto.graph.input[0]
    return inp.name, tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:]), largest


def make_session(model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 *, profile: str | None = None, spin: bool = True, max_batch: int = AUTO_BATCH_CAP) -> ort.InferenceSession:
    """Create a session; raise ProviderError when the requested GPU provider did not start."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's memory pattern allocates, from the second run on, one block for the whole planned run beside the blocks
    # the arena already holds from the first: the peak nearly doubles (htdemucs 1.05 -> 1.67 GB, RoFormer vocals
    # 5.0 -> 8.2 GB) for no measured speed (docs/BENCHMARKS.md).
    opts.enable_mem_pattern = False
    opts.intra_op_num_threads = threads or usable_cores()
    if not spin:  # a process sharing its cores (a Ray actor beside the driver) must not busy-wait between ops
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    kind, _ = parse_device(device)
    if kind != "cpu":  # CUDA/cuDNN/TensorRT from the `gpu` extra's wheels, before the provider looks for them
        from .gpu_libs import preload
        preload()
    providers = providers_for(device, trt_shapes=_trt_shapes(model, max_batch) if kind == "tensorrt" else None)
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
    # The Python session keeps the serialized graph for `set_providers` (never called here) beside the weights its
    # own copy holds: for the RoFormer vocals model that is 0.9 GB held twice. The caller decides whether to keep it.
    sess._model_bytes = None
    release_freed_heap()
    return sess


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`). Building a session frees the graph's
    original weights once they are prepacked, mostly blocks under glibc's mmap threshold: whether those pages leave
    the process depends on heap fragmentation, so the RoFormer vocals session sat at 1.0 or 1.6 GB from run to run
    (docs/BENCHMARKS.md). No-op without glibc."""
    import ctypes
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's on Linux; absent elsewhere
    except (OSError, AttributeError):
        pass


def read_info(model: bytes | str | Path) -> GraphInfo:
    """Metadata only, read from the protobuf's top-level fields (`onnx_metadata`): no weights parsed, no external
    weight files loaded, no session started."""
    from .onnx_metadata import metadata_props
    return GraphInfo.from_metadata(metadata_props(model))


def batch_plan(batch_size: int | str, device: str) -> tuple[int, bool]:
    """(chunks handed to a runner per call, whether runners size their batch to the GPU) for `--batch-size`."""
    on_gpu = parse_device(device)[0] != "cpu"
    if batch_size == "auto":
        return (AUTO_BATCH_CAP, True) if on_gpu else (1, False)
    return max(1, int(batch_size)), False


class OnnxRunner:
    """The engine's runner protocol over one ONNX Runtime session: `(B, C, chunk) -> (B, S, C, chunk)` float32.

    On a GPU the runner uses I/O binding: input and output live in device buffers allocated once per batch shape and
    reused, so a run is one host-to-device copy in, one device-to-host copy out, and no per-run allocation of the
    (hundreds of MB) output. A batch larger than `max_batch` is run in pieces; on a GPU, a piece that fails to
    allocate halves `max_batch` and is retried, so a batch never dies of memory while one chunk still fits.
    """

    backend = "ort"

    def __init__(self, model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 *, profile: str | None = None, spin: bool = True, bind: bool | None = None,
                 max_batch: int | None = None):
        kind, idx = parse_device(device)
        self.session = make_session(model, device, threads, profile=profile, spin=spin, max_batch=max_batch or AUTO_BATCH_CAP)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info = GraphInfo.from_metadata(meta)
        self.chunk_samples = self.info.chunk_samples
        self.device = device
        self.on_gpu = kind != "cpu"
        self.max_batch = max_batch
        self.calibration: dict | None = None
        self._device = ("cuda", idx) if self.on_gpu else ("cpu", 0)
        self._bind = self.on_gpu if bind is None else bind
        self._input = self.session.get_inputs()[0].name
        out = self.session.get_outputs()[0]
        self._output = out.name
        self._out_item = tuple(out.shape[1:]) if all(isinstance(d, int) for d in out.shape[1:]) else None
        self._bound: dict[int, tuple] = {}  # batch size -> (binding, input OrtValue, output OrtValue)

    accepts_run_options = True  # `watchdog.GuardedRunner` passes RunOptions it can terminate from another thread

    def __call__(self, batch: np.ndarray, run_options=None) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts, k = [], 0
        while k < len(batch):
            piece = batch[k:k + (self.max_batch or len(batch))]
            try:
                parts.append(self._run(piece) if run_options is None else self._run(piece, run_options))
            except Exception as e:  # noqa: BLE001 - only an allocation failure on a GPU is retried
                from .gpu_memory import is_out_of_memory
                if not (self.on_gpu and len(piece) > 1 and is_out_of_memory(e)):
                    raise
                self._bound.clear()
                self.max_batch = max(1, len(piece) // 2)
                log.warning("%s: a batch of %d chunks did not fit in GPU memory; batches of %d from now on",
                            self.device, len(piece), self.max_batch)
                continue
            k += len(piece)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run_explained(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An explanation graph's two outputs, `stems` and `band_masks` (no I/O binding: `--explain` is a look
        inside, not the fast path)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.max_batch or len(batch)
        outs = [self.session.run(["stems", "band_masks"], {self._input: batch[k:k + step]})
                for k in range(0, len(batch), step)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def _run(self, batch: np.ndarray, run_options=None) -> np.ndarray:
        if not self._bind or self._out_item is None:
            return self.session.run([self._output], {self._input: batch}, run_options)[0]
        slot = self._bound.get(len(batch))
        if slot is None:
            while len(self._bound) >= 2:  # a full batch and a track's last, shorter one
                self._bound.pop(next(iter(self._bound)))
            kind, idx = self._device
            x = ort.OrtValue.ortvalue_from_shape_and_type(batch.shape, np.float32, kind, idx)
            y = ort.OrtValue.ortvalue_from_shape_and_type((len(batch),) + self._out_item, np.float32, kind, idx)
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self._input, x)
            binding.bind_ortvalue_output(self._output, y)
            slot = self._bound[len(batch)] = (binding, x, y)
        binding, x, y = slot
        x.update_inplace(batch)
        self.session.run_with_iobinding(binding, run_options)
        out = y.numpy()
        return out if self.on_gpu else out.copy()  # a CPU OrtValue's array is the reused buffer itself

    def fit_to_gpu(self, cap: int = AUTO_BATCH_CAP, free_bytes=None) -> int:
        """Set `max_batch` to what this GPU's free memory holds (see gpu_memory); returns it. CPU: unchanged."""
        if not self.on_gpu:
            return self.max_batch or 1
        from .gpu_memory import calibrate, gpu_memory
        free_bytes = free_bytes or (lambda: gpu_memory(self._device[1])[0])
        probe = np.zeros((1, self.info.channels, self.chunk_samples), np.float32)
        self.max_batch = None
        batch, self.calibration = calibrate(lambda b: self._run(np.repeat(probe, b, axis=0)), free_bytes, cap=cap)
        self._bound.clear()
        self.max_batch = batch
        # Run the chosen batch once (backing off if it does not fit), so this session's arena holds its full size
        # before the next session on the same GPU (a bag's other models) measures what is left.
        self(np.repeat(probe, batch, axis=0))
        self.calibration["batch"] = self.max_batch
        log.info("%s: %s", self.device, self.calibration)
        return batch


def fit_runners(runners, cap: int) -> int:
    """`--batch-size auto` on a GPU: each ONNX Runtime runner measures what fits (one after another, so each sees
    what the previous ones left); returns the largest batch, the one to feed them (each splits to its own)."""
    return max((r.fit_to_gpu(cap) for r in runners if isinstance(r, OnnxRunner)), default=cap)
