"""The stems of one track on their way to files: model-rate blocks of the selected stems in, stem files out.

Every engine ends here (the local engine straight from the span it separates, the Ray job from a track's span parts),
so both write the same files from the same samples: resampled back to the input's rate, mono for mono inputs, the
input's exact frame count, clipping handled as `--clip-mode` says; each file appears atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .audio import StemWriter


class StemSink:
    """`write((stems, C, n))` in track order, then `close()` -> {stem: path}; `abort()` leaves no file behind."""

    def __init__(self, out_paths: dict[str, Path], *, model_rate: int, out_rate: int, frames: int,
                 input_channels: int, model_channels: int, fmt: str, subtype: str, clip: str):
        self.paths = {s: Path(p) for s, p in out_paths.items()}
        out_channels = 1 if input_channels == 1 else model_channels
        self.writers = [StemWriter(p, in_rate=model_rate, out_rate=out_rate, out_channels=out_channels,
                                   frames=frames, fmt=fmt, subtype=subtype, clip=clip) for p in self.paths.values()]
        self.samples = 0  # model-rate samples written so far

    def write(self, block: np.ndarray) -> None:
        if block.shape[0] != len(self.writers):
            raise ValueError(f"{block.shape[0]} stems in the block, {len(self.writers)} writers")
        for w, stem in zip(self.writers, block):
            w.write(stem)
        self.samples += block.shape[-1]

    def close(self) -> dict[str, Path]:
        try:
            for w in self.writers:
                w.close()
        except BaseException:
            self.abort()
            raise
        return dict(self.paths)

    @property
    def peaks(self) -> dict[str, float]:
        return {s: float(w.peak) for s, w in zip(self.paths, self.writers)}

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
