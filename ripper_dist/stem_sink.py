"""The stems of one track on their way to files: model-rate blocks of the selected stems in, stem files out.

Every engine ends here (the local engine straight from the span it separates, the Ray job from a track's span parts),
so both write the same files from the same samples: resampled back to the input's rate, mono for mono inputs, the
input's exact frame count, clipping handled as `--clip-mode` says; each file appears atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .audio import StemWriter


def stem_paths(out_dir, track: str, stems, fmt: str) -> dict[str, Path]:
    """Where a track's stems go: `OUT/<track>/<stem>.<ext>` (one place, for every engine)."""
    return {s: Path(out_dir) / track / f"{s}.{fmt}" for s in stems}


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf (e.g. an fp16 overflow): the track fails instead of publishing blank stems."""


BLOCK = 1 << 16  # model-rate samples per write: the resampler sees the same blocks however the samples arrived


class StemSink:
    """`write((stems, C, n))` in track order, then `close()` -> {stem: path}; `abort()` leaves no file behind.

    Samples are passed on in fixed blocks of `BLOCK` (the rest at close): the streaming resampler's output depends
    on its input blocks in the last bits, and this way one span or many give the same bytes."""

    def __init__(self, out_paths: dict[str, Path], *, model_rate: int, out_rate: int, frames: int,
                 input_channels: int, model_channels: int, fmt: str, subtype: str, clip: str):
        self.paths = {s: Path(p) for s, p in out_paths.items()}
        out_channels = 1 if input_channels == 1 else model_channels
        self.writers = [StemWriter(p, in_rate=model_rate, out_rate=out_rate, out_channels=out_channels,
                                   frames=frames, fmt=fmt, subtype=subtype, clip=clip) for p in self.paths.values()]
        self.samples = 0  # model-rate samples received so far
        self._side: dict[str, np.ndarray] = {}  # `STEM.NAME` -> array, written as STEM.NAME.npy at close
        self._pending: list[np.ndarray] = []
        self._buffered = 0

    def write(self, block: np.ndarray) -> None:
        if block.shape[0] != len(self.writers):
            raise ValueError(f"{block.shape[0]} stems in the block, {len(self.writers)} writers")
        if not np.isfinite(block).all():
            raise NonFiniteOutputError(f"the model returned NaN or Inf samples near model-rate sample {self.samples}")
        self.samples += block.shape[-1]
        self._pending.append(block)
        self._buffered += block.shape[-1]
        if self._buffered >= BLOCK:
            data = np.concatenate(self._pending, axis=-1)
            n = data.shape[-1] - data.shape[-1] % BLOCK
            for k in range(0, n, BLOCK):
                self._write(data[..., k:k + BLOCK])
            self._pending = [data[..., n:]]
            self._buffered = data.shape[-1] - n

    def side(self, name: str, arrays: dict) -> None:
        """Arrays that are not audio, per stem (`--explain`: band masks), saved as `STEM.NAME.npy` beside the stem."""
        for stem, a in arrays.items():
            self._side[f"{stem}.{name}"] = np.asarray(a)

    def _write(self, block: np.ndarray) -> None:
        for w, stem in zip(self.writers, block):
            w.write(stem)

    def close(self) -> dict[str, Path]:
        try:
            if self._buffered:
                self._write(np.concatenate(self._pending, axis=-1))
            self._pending, self._buffered = [], 0
            for w in self.writers:
                w.close()
            extra = {}
            for key, a in self._side.items():
                stem = key.rsplit(".", 1)[0]
                dest = self.paths[stem].with_name(f"{key}.npy")
                with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                    np.save(f, a)
                extra[key] = dest
        except BaseException:
            self.abort()
            raise
        return dict(self.paths) | extra

    @property
    def peaks(self) -> dict[str, float]:
        return {s: float(w.peak) for s, w in zip(self.paths, self.writers)}

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
