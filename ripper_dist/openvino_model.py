"""An exported graph run by OpenVINO on the CPU: the same ONNX file, the same runner protocol as `OnnxRunner`.

OpenVINO's CPU plugin compiles the ONNX graph into its own kernels (oneDNN, fused convolutions and attention
blocks); on htdemucs it is faster than ONNX Runtime on some CPUs and slower on others, so `cpu_backend` picks by
measurement. Precision is pinned to f32: on CPUs with AMX/AVX-512 bf16 OpenVINO otherwise runs bf16 by default
(about 50 dB from f32 on htdemucs), which would break the parity the export guarantees.

A bf16 graph (`--precision bf16`, export_cache.bf16_graph) is the fp32 graph plus the list of MatMuls to feed bf16
(`ripper.bf16_matmuls`): Converts to bf16 are inserted before those MatMuls' inputs, and back to f32 after them,
when the graph is compiled, still under the f32 hint, so the plugin runs just those MatMuls on its bf16 units and
everything else (STFT/ISTFT, norms, reductions, softmax) in f32. Its own bf16 mode cannot be limited that way
(ripper_export.bf16).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from .onnx_model import GraphInfo, read_info
from .placement import usable_cores

log = logging.getLogger(__name__)


#: CPU flags (/proc/cpuinfo) of the bf16 units `--precision bf16` needs: AVX-512 BF16 or AMX BF16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def bf16_problem(device: str = "cpu", flags: set[str] | None = None) -> str | None:
    """Why `--precision bf16` cannot run here (None: it can). bf16 is OpenVINO on the CPU's bf16 units: without
    them the plugin would emulate bf16, slower than f32. `flags`: injected by tests (default: this CPU's)."""
    if device != "cpu":
        return f"bf16 runs on the CPU (OpenVINO) only, not --device {device}: use fp16 on GPUs"
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in BF16_FLAGS):
        return "this CPU has no bf16 units (AVX512_BF16 or AMX): use fp32"
    if not available():
        return "bf16 runs on OpenVINO, a dependency of ripper-dist that is missing here: pip install openvino"
    return None


def cpu_config(threads: int | None = None) -> dict:
    """OpenVINO's CPU compile settings for every graph we run: f32 pinned (its bf16 default on AMX CPUs leaves htdemucs
    about 50 dB from f32), one latency stream on the cores this process may use."""
    return {"INFERENCE_NUM_THREADS": int(threads or usable_cores()), "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def available() -> bool:
    """Whether the `openvino` package imports (a dependency where OpenVINO ships wheels: x86-64 and arm64)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def apply_bf16(model, outputs: list[str]) -> int:
    """Feed the MatMuls whose output tensor is named in `outputs` with bf16 inputs (f32 out): Converts around them,
    in place. Returns how many were changed."""
    import openvino.opset13 as ops
    wanted, done = set(outputs), 0
    for op in list(model.get_ordered_ops()):
        if op.get_type_name() != "MatMul" or not set(op.output(0).get_names()) & wanted:
            continue
        consumers = list(op.output(0).get_target_inputs())
        for i in range(2):
            op.input(i).replace_source_output(ops.convert(op.input_value(i), "bf16").output(0))
        op.validate_and_infer_types()
        back = ops.convert(op.output(0), "f32")
        for c in consumers:
            c.replace_source_output(back.output(0))
        done += 1
    model.validate_nodes_and_infer_types()
    return done


def bf16_model(core, data: bytes, outputs: list[str]):
    """The ONNX graph `data` read by OpenVINO with `apply_bf16`; ValueError when not every listed MatMul is found
    (a runner must not silently run a graph other than the one checked against fp32)."""
    model = core.read_model(data)
    found = apply_bf16(model, outputs)
    if found != len(outputs):
        raise ValueError(f"bf16 graph: {found} of its {len(outputs)} bf16 MatMuls found by OpenVINO")
    return model


class OpenVinoRunner:
    """`(B, C, chunk) -> (B, S, C, chunk)` float32 with OpenVINO's CPU plugin.

    One compiled model per batch size (static shapes let the plugin pick its blocked layouts once), at most two: a
    full batch and a track's last, shorter one. CPU only: `fit_to_gpu` leaves the batch as it is.
    """

    backend = "openvino"
    on_gpu = False
    calibration = None

    def __init__(self, model: bytes | str | Path, device: str = "cpu", threads: int | None = None,
                 *, max_batch: int | None = None):
        import openvino as ov
        if device != "cpu":
            raise ValueError(f"the OpenVINO backend runs on the CPU only (asked for {device})")
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.info: GraphInfo = read_info(data)
        self.chunk_samples = self.info.chunk_samples
        self.device, self.max_batch = device, max_batch
        self._core = ov.Core()
        self.precision = self.info.raw.get("ripper.precision", "fp32")
        if self.precision == "bf16":
            if (why := bf16_problem(device)) is not None:  # e.g. a Ray node unlike the driver that checked it
                raise ValueError(f"bf16 graph: {why}")
            self._model = bf16_model(self._core, data, json.loads(self.info.raw["ripper.bf16_matmuls"]))
        else:
            self._model = self._core.read_model(data)
        self._input = self._model.inputs[0].get_any_name()
        self._config = cpu_config(threads)
        self._compiled: dict[int, object] = {}
        self._request(max_batch or 1)  # compiled now, as ONNX Runtime optimises its graph when the session is made

    def _request(self, batch: int):
        req = self._compiled.get(batch)
        if req is None:
            while len(self._compiled) >= 2:
                self._compiled.pop(next(iter(self._compiled)))
            m = self._model.clone()
            m.reshape({self._input: [batch, self.info.channels, self.chunk_samples]})
            req = self._compiled[batch] = self._core.compile_model(m, "CPU", self._config).create_infer_request()
        return req

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.max_batch or len(batch)
        parts = []
        for k in range(0, len(batch), step):
            piece = batch[k:k + step]
            req = self._request(len(piece))
            req.infer({0: piece})
            parts.append(np.array(req.get_output_tensor(0).data, copy=True))  # the request reuses its buffer
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run_explained(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An explanation graph's two outputs, `stems` and `band_masks` (as `OnnxRunner.run_explained`)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.max_batch or len(batch)
        stems, masks = [], []
        for k in range(0, len(batch), step):
            piece = batch[k:k + step]
            req = self._request(len(piece))
            req.infer({0: piece})
            stems.append(np.array(req.get_tensor("stems").data, copy=True))
            masks.append(np.array(req.get_tensor("band_masks").data, copy=True))
        return np.concatenate(stems), np.concatenate(masks)

    def fit_to_gpu(self, cap: int = 1, free_bytes=None) -> int:
        return self.max_batch or 1
