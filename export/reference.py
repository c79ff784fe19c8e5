"""Upstream reference outputs for parity checks: the `demucs` package itself, on the same checkpoint files.

Rate conversion uses soxr as ripper-dist does, so a comparison measures the model path and the chunking rather than
two different resamplers (upstream resamples with julius).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from .onnx_export import sdr_db  # noqa: F401  (re-exported: parity is reported in these units)


def upstream_stems(audio_path: Path, *, repo: Path, name: str, shifts: int = 0, overlap: float = 0.25) -> dict:
    """stem -> (frames, channels) at the file's rate, as `demucs` computes them (float, no clipping).

    Rate conversion uses soxr like ripper-dist does, so the comparison measures the model path and the chunking,
    not two different resamplers.
    """
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    model = get_model(name, repo=Path(repo))
    x, sr = sf.read(audio_path, always_2d=True, dtype="float32")
    mix = x if sr == model.samplerate else soxr.resample(x, sr, model.samplerate, quality="VHQ")
    if mix.shape[1] == 1:
        mix = np.repeat(mix, 2, axis=1)
    wav = torch.from_numpy(np.ascontiguousarray(mix.T))
    ref = wav.mean(0)
    wav = (wav - ref.mean()) / (ref.std() + 1e-8)
    with torch.no_grad():
        out = apply_model(model, wav[None], shifts=shifts, split=True, overlap=overlap, progress=False)[0]
    out = out * (ref.std() + 1e-8) + ref.mean()
    result = {}
    for s, stem in zip(model.sources, out.numpy()):
        y = stem.T
        if sr != model.samplerate:
            y = soxr.resample(np.ascontiguousarray(y), model.samplerate, sr, quality="VHQ")
            y = y[:x.shape[0]]
            if y.shape[0] < x.shape[0]:
                y = np.pad(y, ((0, x.shape[0] - y.shape[0]), (0, 0)))
        if x.shape[1] == 1:
            y = y.mean(axis=1, keepdims=True)
        result[s] = y
    return result
