"""Test helpers: synthetic audio, and the upstream reference (re-exported from ripper_export.reference)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from ripper_export.reference import sdr_db, upstream_stems  # noqa: F401


def write_tone(path: Path, seconds: float, sr: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    sig = 0.3 * np.sin(2 * np.pi * 110 * t) + 0.1 * rng.standard_normal(n)
    x = np.stack([sig * (1 + 0.2 * c) + 0.05 * rng.standard_normal(n) for c in range(channels)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_24" if path.suffix == ".flac" else "FLOAT")
    return path
