"""Demucs bags in numpy (no torch, no ONNX): plan, batched execution, `separate_array`; helpers for the span tests."""
from __future__ import annotations

import numpy as np
from ripper_export.metrics import sdr_db as sdr
import pytest
import soundfile as sf
import soxr

from ripper_dist.audio import read_audio
from ripper_dist.engine import DemucsBag, separate_array

SOURCES = ["drums", "bass", "other", "vocals"]
CHUNK = 4096


class NumpyRunner:
    """A deterministic nonlinear, position-dependent 'model' following the runner protocol."""

    def __init__(self, seed=0, chunk_samples=CHUNK, fail=False):
        rng = np.random.default_rng(seed)
        self.chunk_samples = chunk_samples
        self.gain = rng.uniform(0.5, 2.0, (len(SOURCES), 1, 1)).astype(np.float32)
        self.tilt = rng.uniform(-0.5, 0.5, (len(SOURCES), 1, 1)).astype(np.float32)
        self.calls = 0
        self.fail = fail

    def __call__(self, batch):
        assert batch.dtype == np.float32 and batch.ndim == 3 and batch.shape[-1] == self.chunk_samples
        if self.fail:
            raise RuntimeError("runner exploded")
        self.calls += 1
        pos = np.linspace(0, 1, self.chunk_samples, dtype=np.float32)
        x = batch[:, None]                                          # (B, 1, C, T)
        y = np.tanh(x * self.gain) * (1 + self.tilt * pos) + 0.1 * x.mean(-1, keepdims=True)
        return y.astype(np.float32)


def make_bag(n_models=1, weights=None, **kw):
    return DemucsBag([NumpyRunner(seed=i) for i in range(n_models)], weights, CHUNK, SOURCES, 44100, 2, **kw)




def write_input(path, sr, channels, seconds=0.6, seed=0, **kw):
    rng = np.random.default_rng(seed)
    n = int(sr * seconds) + 11
    t = np.arange(n) / sr
    x = np.stack([0.4 * np.sin(2 * np.pi * (200 + 90 * c) * t) + 0.05 * rng.standard_normal(n)
                  for c in range(channels)], 1)
    sf.write(path, x.astype(np.float32), sr, **kw)
    return n


def expected_stems(bag, path, out_sr, frames, mono=False, **kw):
    """separate_array on the whole file at the model rate, then each stem resampled at once to the file's rate."""
    est = separate_array(bag, read_audio(path, 44100, 2), **kw)
    out = {}
    for i, s in enumerate(SOURCES):
        stem = est[i].mean(0, keepdims=True) if mono else est[i]
        y = soxr.resample(np.ascontiguousarray(stem.T), 44100, out_sr, quality="VHQ") if out_sr != 44100 else stem.T
        y = y[:frames]
        out[s] = np.clip(np.pad(y, ((0, frames - y.shape[0]), (0, 0))), -1, 1)
    return out


def test_separate_array_progress_and_validation():
    mix = np.random.default_rng(0).standard_normal((2, 10001)).astype(np.float32) * 0.2
    seen = []
    out = separate_array(make_bag(), mix, progress=seen.append, batch_size=2)
    assert out.shape == (4, 2, 10001) and sum(seen) == 10001 and len(seen) > 1
    with pytest.raises(ValueError):
        separate_array(make_bag(), mix[:1])
    with pytest.raises(ValueError):
        DemucsBag([NumpyRunner()], [[1, 1]], CHUNK, SOURCES)          # weights shape
    with pytest.raises(ValueError):
        DemucsBag([NumpyRunner()], None, CHUNK + 1, SOURCES)          # segment longer than the graph
    with pytest.raises(ValueError):
        separate_array(make_bag(), mix, batch_size=0)
