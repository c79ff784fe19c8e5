"""Export Demucs (HTDemucs) to ONNX with a parity check against upstream torch, and embed metadata.

Family-agnostic helpers reused by the other exporters: `sdr_db`, `set_metadata`, `read_metadata`, `ParityError`,
`ort_run`, `atomic_tmp_path`.

Graph contract (docs/ARCHITECTURE.md, "ONNX graph"): input `mix` float32 (batch, channels, chunk_samples), output
`stems` float32 (batch, sources, channels, chunk_samples); batch dynamic, length fixed; `ripper.*` metadata_props.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# One version for every exporter, kept on the runtime side so a cache lookup needs no torch.
from .metrics import sdr_db  # noqa: F401 - part of this module's API (parity is reported in it)
from .version import EXPORT_VERSION

__all__ = [
    "EXPORT_VERSION",
    "ParityError",
    "sdr_db",
    "set_metadata",
    "read_metadata",
    "ort_run",
    "atomic_tmp_path",
    "export_demucs",
    "htdemucs_metadata",
    "ExportSteps",
]



class ParityError(RuntimeError):
    """ONNX Runtime output disagrees with the upstream torch model (SDR below the threshold)."""

    def __init__(self, message: str, sdr: float):
        super().__init__(message)
        self.sdr = sdr




class ExportSteps:
    """Progress of an export on the terminal: `export [2/5] tracing ... (3.1 s)`, one line per step as it starts,
    so a first use that spends half a minute in export says what it is doing. `out=None` is silent."""

    def __init__(self, total: int, out=None, label: str = "export"):
        import time
        self.total, self.out, self.label, self.k = total, out, label, 0
        self._clock = time.perf_counter
        self.t0 = self._clock()

    def __call__(self, what: str) -> None:
        self.k += 1
        if self.out is not None:
            print(f"{self.label} [{self.k}/{self.total}] {what} ({self._clock() - self.t0:.1f} s)", file=self.out,
                  flush=True)

    def done(self, what: str) -> None:
        if self.out is not None:
            print(f"{self.label} done: {what} ({self._clock() - self.t0:.1f} s)", file=self.out, flush=True)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=isinstance(value, dict))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def atomic_tmp_path(out_path: str | os.PathLike, suffix: str = ".onnx") -> Path:
    """A fresh temporary file path beside `out_path` (same filesystem, so `os.replace` is atomic)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp" + suffix, dir=out_path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: a cache on a shared disk must be readable by its users
    return Path(tmp)


def _rewrite(onnx_path: Path, metadata: Mapping[str, Any], shapes: Mapping[str, Sequence[int | str]] | None):
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({str(k): _to_str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    for value in list(model.graph.input) + list(model.graph.output):
        if shapes and value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = int(d)
    tmp = atomic_tmp_path(onnx_path)
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, onnx_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def set_metadata(onnx_path: str | os.PathLike, metadata: Mapping[str, Any], *,
                 shapes: Mapping[str, Sequence[int | str]] | None = None) -> None:
    """Set (add or replace) `metadata_props` of an ONNX file in place, atomically.

    Values are stored as strings: str as is, dict/list/tuple as JSON, bool as true/false, others with `str()`.
    `shapes` optionally (re)declares graph input/output shapes by name, ints for fixed dims and strings for
    symbolic ones, e.g. ``{"stems": ["batch", 4, 2, 343980]}`` (the legacy exporter often leaves output dims
    symbolic). External data (if any) is left untouched and stays referenced.
    """
    _rewrite(Path(onnx_path), metadata, shapes)


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, str]:
    """`metadata_props` of an ONNX file as a dict of strings."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def ort_run(onnx_path: str | os.PathLike, inputs: Mapping[str, np.ndarray], threads: int | None = None):
    """Run a graph once on ONNX Runtime's CPU provider; returns the list of outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(inputs))


def _resolve_model(model_or_package):
    """-> (upstream model in eval mode, checkpoint sha256 or None)."""
    from .safe_load import build_demucs_model, load_demucs_package, sha256_file

    if isinstance(model_or_package, torch.nn.Module):
        return model_or_package.eval(), None
    if isinstance(model_or_package, (str, os.PathLike)):
        path = Path(model_or_package)
        return build_demucs_model(load_demucs_package(path)), sha256_file(path)
    if isinstance(model_or_package, dict):
        return build_demucs_model(model_or_package), None
    raise TypeError(f"expected an HTDemucs module, a package dict or a .th path, got {type(model_or_package)}")


def htdemucs_metadata(model, chunk_samples: int, *, opset: int, parity_sdr_db: float,
                      checkpoint_sha256: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """The `ripper.*` metadata_props of an exported HTDemucs graph (all values strings)."""
    from .htdemucs import training_length

    options = {
        "opset": opset,
        "chunk_samples": int(chunk_samples),
        "exporter": "torchscript",
        "dynamic_batch": True,
        "stft": "real-dft-factorized",
        "attention": "matmul-softmax",
    }
    meta = {
        "ripper.family": "htdemucs",
        "ripper.sources": json.dumps(list(model.sources)),
        "ripper.sample_rate": str(int(model.samplerate)),
        "ripper.channels": str(int(model.audio_channels)),
        "ripper.chunk_samples": str(int(chunk_samples)),
        "ripper.segment_samples": str(training_length(model) if model.use_train_segment else int(chunk_samples)),
        "ripper.export_version": EXPORT_VERSION,
        "ripper.export_options": json.dumps(options, sort_keys=True),
        "ripper.parity_sdr_db": f"{parity_sdr_db:.2f}",
    }
    if checkpoint_sha256 is not None:
        meta["ripper.checkpoint_sha256"] = checkpoint_sha256
    for k, v in (extra or {}).items():
        meta[str(k)] = _to_str(v)
    return meta


def export_demucs(model_or_package, out_path: str | os.PathLike, *, chunk_samples: int | None = None,
                  opset: int = 17, min_parity_db: float = 60.0, metadata: dict | None = None,
                  check_batch: int = 2, explain: bool = False, progress=None) -> dict:
    """Export an HTDemucs model to `out_path` (ONNX) and return the metadata written into it.

    model_or_package: an upstream `HTDemucs` instance, a package dict (`load_demucs_package`), or a `.th` path
    (loaded safely; its sha256 becomes `ripper.checkpoint_sha256` unless `metadata` sets it).
    chunk_samples: graph length; default `int(model.segment * model.samplerate)` (a bag may have lowered
    `model.segment`); shorter chunks are padded to the training length inside the graph, as upstream does.
    The graph is traced with the legacy exporter (`dynamo=False`), input `mix` (batch dynamic), output `stems`.
    Parity: ONNX Runtime (CPU) runs one random batch of `check_batch` rows (so the dynamic batch axis is exercised);
    its first row is compared with the upstream torch forward of that row alone (the reference pass is the slowest
    part of an export; the rows are independent in the model, so one row proves the numbers). `ParityError` when the
    SDR is below `min_parity_db`. The file appears at `out_path` only after the check passed (atomic).
    progress: a file (e.g. sys.stderr) for `export [k/5] ...` lines, or None.
    explain: the explanation graph: sources `S + S.time + S.spec` (the output, then the time-branch and the
    spectral-branch terms HTDemucs sums); the output is checked as above and the sum of the two branches against it
    (`ripper.explain_sum_sdr_db`, also >= `min_parity_db`).
    """
    from .htdemucs import OnnxHTDemucs

    step = ExportSteps(5, progress)
    step("loading the model")
    model, sha = _resolve_model(model_or_package)
    wrapper = OnnxHTDemucs(model, chunk_samples, explain=explain).eval()
    chunk = wrapper.chunk_samples
    channels = wrapper.audio_channels
    out_path = Path(out_path)

    gen = torch.Generator().manual_seed(1234)
    # traced at batch 1; the check runs another batch size (default 2) so the dynamic batch axis is verified too
    trace_input = torch.randn(1, channels, chunk, generator=gen)
    check_input = torch.randn(max(1, int(check_batch)), channels, chunk, generator=gen)

    tmp = atomic_tmp_path(out_path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step("tracing the graph (torch.onnx.export)")
            torch.onnx.export(
                wrapper, (trace_input,), str(tmp),
                input_names=["mix"], output_names=["stems"],
                dynamic_axes={"mix": {0: "batch"}, "stems": {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
            step("upstream torch reference (one row)")
            ref = model(check_input[:1]).numpy()
        step(f"ONNX Runtime parity check (batch {len(check_input)})")
        est = ort_run(tmp, {"mix": check_input.numpy()})[0]
        extra = dict(metadata or {})
        n_src = len(wrapper.sources)
        if explain:
            est, time_branch, spec_branch = est[:, :n_src], est[:, n_src:2 * n_src], est[:, 2 * n_src:]
            branch_sum = sdr_db(est, time_branch + spec_branch)
            if not branch_sum >= min_parity_db:
                raise ParityError(f"time + spectral branch vs output: SDR {branch_sum:.2f} dB < {min_parity_db} dB",
                                  branch_sum)
            extra.update({"ripper.explain": "branches", "ripper.explain_sum_sdr_db": f"{branch_sum:.2f}",
                          "ripper.sources": json.dumps([*wrapper.sources, *(f"{s}.time" for s in wrapper.sources),
                                                        *(f"{s}.spec" for s in wrapper.sources)])})
        if est.shape[1:] != ref.shape[1:] or len(est) != len(check_input):
            raise ParityError(f"ONNX output shape {est.shape} != torch {ref.shape[1:]} x {len(check_input)}",
                              float("-inf"))
        sdr = sdr_db(ref, est[:1])
        if not sdr >= min_parity_db:
            raise ParityError(f"ONNX Runtime vs upstream torch: SDR {sdr:.2f} dB < {min_parity_db} dB", sdr)

        step(f"metadata and publication (parity {sdr:.1f} dB)")
        meta = htdemucs_metadata(model, chunk, opset=opset, parity_sdr_db=sdr, checkpoint_sha256=sha,
                                 extra=extra)
        set_metadata(tmp, meta, shapes={"mix": ["batch", channels, chunk],
                                        "stems": ["batch", n_src * (3 if explain else 1), channels, chunk]})
        os.replace(tmp, out_path)
        step.done(str(out_path))
    finally:
        if tmp.exists():
            tmp.unlink()
    return meta
