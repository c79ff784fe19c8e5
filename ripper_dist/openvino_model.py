"""An exported graph run by OpenVINO on the CPU: the same ONNX file, the same runner protocol as `OnnxRunner`.

OpenVINO's CPU plugin compiles the ONNX graph into its own kernels (oneDNN, fused convolutions and attention
blocks); on htdemucs it is faster than ONNX Runtime on some CPUs and slower on others, so `cpu_backend` picks by
measurement. Precision is pinned to f32: on CPUs with AMX/AVX-512 bf16 OpenVINO otherwise runs bf16 by default
(about 50 dB from f32 on htdemucs), which would break the parity the export guarantees.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .onnx_model import GraphInfo, _usable_cores, read_info

log = logging.getLogger(__name__)


def cpu_config(threads: int | None = None) -> dict:
    """OpenVINO's CPU compile settings for every graph we run: f32 pinned (its bf16 default on AMX CPUs leaves htdemucs
    about 50 dB from f32), one latency stream on the cores this process may use."""
    return {"INFERENCE_NUM_THREADS": int(threads or _usable_cores()), "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def available() -> bool:
    """Whether the `openvino` package imports (it is an optional dependency: `pip install -e ".[openvino]"`)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


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
