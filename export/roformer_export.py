"""Export a (Mel-)Band RoFormer checkpoint to one ONNX graph, checked against ONNX Runtime and the reference.

Graph: input ``mix`` float32 ``(batch, channels, chunk)``, output ``stems`` float32 ``(batch, stems, channels,
chunk)``; batch dynamic, chunk fixed (rotary tables are constants for it). STFT/ISTFT are real pairs in the graph,
band gathering and mask averaging are constant-index Gathers (no ScatterElements), attention is plain
MatMul/Softmax. Weights above the 2 GB protobuf limit go to one external data file beside the graph
(``<name>.onnx.data``); otherwise the graph is a single file.

Parity, at export time, on a seeded noise chunk: ONNX Runtime against this package's torch model and against the
reference implementation (``bs-roformer==0.3.10`` loading the same state dict, plain attention, with the DC bin zeroed
before its ISTFT when ``zero_dc`` is on, as current MSST does). Any SDR below `min_parity_db` raises `ParityError`
and leaves no graph behind.

`sdr_db`, `ParityError` and `EXPORT_VERSION` come from ``ripper_export.onnx_export``; metadata is written into the
in-memory graph before the single save (so that the external-data case is one write, renamed into place).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .onnx_export import EXPORT_VERSION, ParityError, sdr_db
from .roformer import FAMILIES, Roformer, RoformerSpec, band_bins, build_roformer, read_checkpoint
from .roformer_config import RoformerConfig, load_roformer_config

__all__ = [
    "EXPORT_VERSION",
    "ParityError",
    "export_roformer",
    "export_roformer_model",
    "build_reference",
    "sdr_db",
    "graph_op_types",
    "FORBIDDEN_OPS",
]

DEFAULT_OPSET = 17
REFERENCE_NAME = "bs-roformer==0.3.10"
#: Ops the graph must not contain (scatter: no fp16/TensorRT kernels; complex/STFT ops: not portable).
FORBIDDEN_OPS = frozenset({"ScatterElements", "ScatterND", "Scatter", "STFT", "DFT", "MelWeightMatrix"})
#: Above this many bytes of initializers the weights go to an external data file (protobuf limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _min_stem_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Worst stem's SDR for ``(B, S, C, L)`` arrays (each stem over batch, channels and time)."""
    n = min(ref.shape[-1], est.shape[-1])
    return min(sdr_db(ref[:, s, ..., :n], est[:, s, ..., :n]) for s in range(ref.shape[1]))


def graph_op_types(onnx_path: str | os.PathLike) -> set[str]:
    """Op types used by the graph (including nested subgraphs), without loading external weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops: set[str] = set()

    def walk(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)
    walk(model.graph)
    return ops


# ----------------------------------------------------------------------------------------------------------------
# the reference (bs-roformer 0.3.10)


@contextlib.contextmanager
def _istft_zero_dc():
    """Zero bin 0 of every `torch.istft` input, like MSST's ``zero_dc`` (0.3.10 has no such option)."""
    original = torch.istft

    def patched(input, *args, **kwargs):
        input = input.clone()
        input[:, 0] = 0
        return original(input, *args, **kwargs)

    torch.istft = patched
    try:
        yield
    finally:
        torch.istft = original


class _Reference(nn.Module):
    """Wraps a bs-roformer 0.3.10 model to ``(B, C, L) -> (B, S, C, L')`` with the zero_dc rule applied."""

    def __init__(self, inner: nn.Module, num_stems: int, zero_dc: bool):
        super().__init__()
        self.inner, self.num_stems, self.zero_dc = inner, num_stems, zero_dc

    @torch.no_grad()
    def forward(self, mix):
        with _istft_zero_dc() if self.zero_dc else contextlib.nullcontext():
            out = self.inner(mix)
        if out.dim() == 3:
            out = out.unsqueeze(1)
        return out


def build_reference(family: str, model_kwargs: Mapping, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The upstream-equivalent reference model (``bs-roformer==0.3.10``) with `state` loaded strictly.

    `mlp_expansion_factor` (a current-MSST key, e.g. ZFTurbo's 4-stem BS-RoFormer states 2): 0.3.10's models do not
    take it, but its own `MaskEstimator` does, and current MSST passes it there and nowhere else; so the reference's
    mask estimators are 0.3.10's `MaskEstimator` built with it. Raises ImportError when the package is missing.
    """
    try:
        from bs_roformer import BSRoformer, MelBandRoformer
        from bs_roformer.bs_roformer import MaskEstimator as BSMaskEstimator
        from bs_roformer.mel_band_roformer import MaskEstimator as MelMaskEstimator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the parity reference needs {REFERENCE_NAME} (pip install '{REFERENCE_NAME}')") from exc
    spec = RoformerSpec.from_kwargs(family, model_kwargs)
    cls = MelBandRoformer if family == "mel_band_roformer" else BSRoformer
    kwargs = dict(
        dim=spec.dim, depth=spec.depth, stereo=spec.stereo, num_stems=spec.num_stems,
        time_transformer_depth=spec.time_transformer_depth, freq_transformer_depth=spec.freq_transformer_depth,
        dim_head=spec.dim_head, heads=spec.heads, attn_dropout=0.0, ff_dropout=0.0, flash_attn=False,
        stft_n_fft=spec.stft_n_fft, stft_hop_length=spec.stft_hop_length, stft_win_length=spec.stft_win_length,
        stft_normalized=spec.stft_normalized, mask_estimator_depth=spec.mask_estimator_depth)
    if family == "mel_band_roformer":
        kwargs.update(num_bands=spec.num_bands, sample_rate=spec.sample_rate)
    else:
        kwargs.update(freqs_per_bands=tuple(spec.freqs_per_bands))
    accepted = inspect.signature(cls).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # its constructor calls torch.stft without a window
        model = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    if spec.mlp_expansion_factor != 4:
        estimator = MelMaskEstimator if family == "mel_band_roformer" else BSMaskEstimator
        model.mask_estimators = nn.ModuleList([
            estimator(dim=spec.dim, dim_inputs=model.mask_estimators[0].dim_inputs, depth=spec.mask_estimator_depth,
                      mlp_expansion_factor=spec.mlp_expansion_factor) for _ in range(spec.num_stems)])
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return _Reference(model.float().eval(), spec.num_stems, spec.zero_dc).eval()


# ----------------------------------------------------------------------------------------------------------------
# export


def _torch_export(model: Roformer, path: Path, chunk: int, opset: int) -> None:
    model.freeze_length(chunk)
    dummy = torch.zeros(1, model.spec.channels, chunk)
    names = ["stems", "band_masks"] if model.explain else ["stems"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), input_names=["mix"], output_names=names,
            dynamic_axes={"mix": {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset_version=opset,
            do_constant_folding=True, dynamo=False)


def _initializer_bytes(proto) -> int:
    total = 0
    for t in proto.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += 4 * max(len(t.float_data), len(t.int64_data) * 2, len(t.int32_data))
    return total


def _save_with_metadata(src: Path, dst: Path, meta: Mapping[str, str], external_threshold: int) -> bool:
    """Copy the graph at `src` to `dst` with `meta` as metadata_props; external data above the threshold.

    Returns whether external data was used. The `.onnx` file appears atomically (renamed into place last).
    """
    import onnx

    proto = onnx.load(str(src), load_external_data=True)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    external = _initializer_bytes(proto) > external_threshold
    data_name = dst.name + ".data"
    if external:
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        # onnx writes the data file next to `tmp` under `data_name`: already the final name.
    else:
        onnx.save_model(proto, str(tmp))
        stale = dst.parent / data_name
        if stale.exists():
            stale.unlink()
    os.replace(tmp, dst)
    return external


def _ort_run(path: Path, mix: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    out = sess.run(["stems"], {"mix": mix})[0]
    return out, time.perf_counter() - t0


def export_roformer_model(model: Roformer, out_path: str | os.PathLike, *, chunk_samples: int,
                          sources: list[str] | None = None, reference: nn.Module | None = None,
                          min_parity_db: float = 60.0,
                          metadata: Mapping[str, str] | None = None, opset: int = DEFAULT_OPSET,
                          parity_batch: int = 1, seed: int = 0,
                          external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """Export an already built `Roformer`; see `export_roformer` (this is its config-free core)."""
    out_path = Path(out_path)
    spec = model.spec
    if chunk_samples <= spec.stft_n_fft // 2:
        raise ValueError(f"chunk_samples {chunk_samples} too short for n_fft {spec.stft_n_fft}")
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    mix = (0.3 * torch.randn(parity_batch, spec.channels, chunk_samples, generator=gen)).clamp(-1, 1)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="roformer-export-", dir=out_path.parent if out_path.parent.exists()
                                     else None) as tmpdir:
        tmp = Path(tmpdir) / "model.onnx"
        t0 = time.perf_counter()
        _torch_export(model, tmp, chunk_samples, opset)
        timings["export_s"] = time.perf_counter() - t0
        forbidden = graph_op_types(tmp) & FORBIDDEN_OPS
        if forbidden:
            raise RuntimeError(f"exported graph contains forbidden ops {sorted(forbidden)}")

        est, timings["ort_s"] = _ort_run(tmp, mix.numpy())
        t0 = time.perf_counter()
        with torch.no_grad():
            ours = model(mix)
            if model.explain:  # the band masks are the model's own values: the stems carry the parity check
                ours, torch_masks = ours[0], ours[1].numpy()
            ours = ours.numpy()
        timings["torch_s"] = time.perf_counter() - t0
        if est.shape != ours.shape:
            raise ParityError(f"ONNX output shape {est.shape} != torch {ours.shape}", float("nan"))
        parity_torch = _min_stem_sdr(ours, est)
        parity_ref = torch_vs_ref = None
        if reference is not None:
            t0 = time.perf_counter()
            ref = reference(mix).numpy()
            timings["reference_s"] = time.perf_counter() - t0
            parity_ref = _min_stem_sdr(ref, est)
            torch_vs_ref = _min_stem_sdr(ref, ours)
        worst = min(x for x in (parity_torch, parity_ref) if x is not None)
        if worst < min_parity_db:
            raise ParityError(
                f"parity below {min_parity_db} dB: ORT vs torch {parity_torch:.1f} dB"
                + (f", ORT vs {REFERENCE_NAME} {parity_ref:.1f} dB" if parity_ref is not None else ""), worst)

        explain = {}
        if model.explain:
            import onnxruntime as ort
            got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(
                ["band_masks"], {"mix": mix.numpy()})[0]
            mask_sdr = _min_stem_sdr(torch_masks, got)
            if not mask_sdr >= min_parity_db:
                raise ParityError(f"band masks: ORT vs torch {mask_sdr:.1f} dB < {min_parity_db} dB", mask_sdr)
            explain = {"ripper.explain": "band_masks", "ripper.explain_masks_sdr_db": f"{mask_sdr:.2f}",
                       "ripper.band_bins": json.dumps([[int(b[0]), int(b[-1])] for b in band_bins(spec)])}
        meta = {
            **explain,
            "ripper.family": spec.family,
            "ripper.sources": json.dumps(list(sources or [f"stem{i}" for i in range(spec.num_stems)])),
            "ripper.sample_rate": str(spec.sample_rate),
            "ripper.channels": str(spec.channels),
            "ripper.chunk_samples": str(chunk_samples),
            "ripper.export_version": EXPORT_VERSION,
            "ripper.export_options": json.dumps({"family": spec.family, "chunk_samples": chunk_samples,
                                                 "opset": opset, "export_version": EXPORT_VERSION},
                                                sort_keys=True),
            "ripper.parity_sdr_db": f"{worst:.2f}",
            "ripper.parity_sdr_db_torch": f"{parity_torch:.2f}",
            "ripper.parity_reference": REFERENCE_NAME if reference is not None else "",
            "ripper.zero_dc": json.dumps(spec.zero_dc),
            "ripper.stft": json.dumps({"n_fft": spec.stft_n_fft, "hop_length": spec.stft_hop_length,
                                       "win_length": spec.stft_win_length, "normalized": spec.stft_normalized}),
        }
        for key, value in (metadata or {}).items():
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        external = _save_with_metadata(tmp, out_path, meta, external_data_threshold)

    return {
        "path": out_path,
        "external_data": (out_path.parent / (out_path.name + ".data")) if external else None,
        "parity_sdr_db": worst,
        "parity_sdr_db_torch": parity_torch,
        "parity_sdr_db_reference": parity_ref,
        "torch_vs_reference_sdr_db": torch_vs_ref,
        "timings": timings,
        "metadata": meta,
    }


def export_roformer(config_path: str | os.PathLike, checkpoint_path: str | os.PathLike,
                    out_path: str | os.PathLike, *, family: str | None, min_parity_db: float = 60.0,
                    metadata: Mapping[str, str] | None = None, opset: int = DEFAULT_OPSET,
                    check_reference: bool = True, chunk_samples: int | None = None,
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, explain: bool = False) -> dict:
    """Checkpoint + YAML config -> ONNX graph at `out_path`, parity-checked, with ``ripper.*`` metadata.

    `family`: ``mel_band_roformer`` or ``bs_roformer`` (None: guessed from the config's model keys).
    `metadata`: extra/overriding keys (e.g. ``ripper.checkpoint_sha256``, ``ripper.export_options``).
    `check_reference`: compare against ``bs-roformer==0.3.10`` too (the default; ImportError if it is missing).
    `chunk_samples`: graph length (default: the config's chunk size).
    `explain`: a second output `band_masks` (B, stems, bands, frames): each band's mask magnitude per STFT frame
    (`--explain`), checked against torch like the stems; `ripper.band_bins` holds each band's first and last bin.

    Returns a dict: path, external_data (path or None), parity_sdr_db (the worst of ORT-vs-torch and
    ORT-vs-reference), parity_sdr_db_torch, parity_sdr_db_reference, torch_vs_reference_sdr_db, timings, metadata,
    config (`RoformerConfig`). Raises `ParityError` below `min_parity_db`.
    """
    cfg: RoformerConfig = load_roformer_config(config_path)
    family = family or cfg.family
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    if cfg.family is not None and cfg.family != family:
        raise ValueError(f"config looks like {cfg.family} (model keys) but family={family!r} was requested")
    state = read_checkpoint(checkpoint_path)
    model = build_roformer(family, cfg.model, state)
    model.explain = bool(explain)
    sources = list(cfg.sources)
    if len(sources) != model.spec.num_stems:
        raise ValueError(f"config names {sources} for a model with {model.spec.num_stems} stems")
    del state
    # The reference loads our model's state dict: same tensors, prefixes already stripped, float32.
    reference = build_reference(family, cfg.model, model.state_dict()) if check_reference else None

    from .safe_load import sha256_file

    meta = {
        "ripper.sample_rate": str(cfg.sample_rate),
        "ripper.num_overlap": str(cfg.num_overlap),
        "ripper.batch_size": str(cfg.batch_size),
        "ripper.instruments": json.dumps(list(cfg.instruments)),
        "ripper.target_instrument": cfg.target_instrument or "",
        "ripper.checkpoint_sha256": sha256_file(checkpoint_path),
        "ripper.checkpoint_name": Path(checkpoint_path).name,
    }
    meta.update(metadata or {})
    result = export_roformer_model(
        model, out_path, chunk_samples=chunk_samples or cfg.chunk_size, sources=sources, reference=reference,
        min_parity_db=min_parity_db, metadata=meta, opset=opset, external_data_threshold=external_data_threshold)
    result["config"] = cfg
    return result
