"""The stems of one track on their way to files: model-rate blocks of the selected stems in, stem files out.

Every engine ends here (the local engine straight from the span it separates, the Ray job from a track's span parts),
so both write the same files from the same samples: resampled back to the input's rate, mono for mono inputs, the
input's exact frame count, clipping handled as `--clip-mode` says; each file appears atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .audio import StemWriter, resampled_length
from .encoders import output_rate


DEFAULT_TEMPLATE = "{model}/{track}/{stem}.{ext}"
TEMPLATE_FIELDS = ("track", "trackext", "stem", "ext", "model")


def check_template(template: str) -> None:
    """Raise ValueError unless `template` names every stem and track apart and stays inside OUT."""
    import string
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"--filename {template!r}: {e}") from None
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(f"--filename {template!r}: unknown field(s) {unknown}; use {{{'}, {'.join(TEMPLATE_FIELDS)}}}")
    if "stem" not in fields or "track" not in fields:
        raise ValueError(f"--filename {template!r}: needs {{track}} and {{stem}} (else files overwrite each other)")
    if Path(template).is_absolute() or ".." in Path(template).parts:
        raise ValueError(f"--filename {template!r}: must be a relative path inside the output folder")


@dataclass(frozen=True)
class StemLayout:
    """Where stems go, in one place for every engine: `root / template`, by default `OUT/<model>/<track>/<stem>.<ext>`
    (as demucs), so two models separating into one folder never overwrite each other."""

    root: Path
    model: str
    ext: str
    template: str = DEFAULT_TEMPLATE

    def paths(self, track: str, stems, input_path=None) -> dict[str, Path]:
        trackext = Path(input_path).suffix.lstrip(".") if input_path is not None else ""
        return {s: Path(self.root) / self.template.format(track=track, trackext=trackext, stem=s, ext=self.ext,
                                                          model=self.model) for s in stems}

    def folders(self, tracks, stems, inputs=None) -> set[Path]:
        """The folders a set of tracks writes into (to clean temporary files left by a killed run)."""
        inputs = inputs or [None] * len(tracks)
        return {p.parent for t, i in zip(tracks, inputs) for p in self.paths(t, stems, i).values()}


@dataclass(frozen=True)
class StemOutput:
    """How stems are encoded: format, subtype (None: the format's default), clip mode, bitrate (kbps, mp3/m4a) and
    sample rate (None: the input's, as demucs)."""

    fmt: str = "wav"
    subtype: str | None = None
    clip: str = "rescale"
    bitrate: int | None = None
    sample_rate: int | None = None

    def rate(self, input_rate: int) -> int:
        return output_rate(self.fmt, self.sample_rate or input_rate)


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf (e.g. an fp16 overflow): the track fails instead of publishing blank stems."""


BLOCK = 1 << 16  # model-rate samples per write: the resampler sees the same blocks however the samples arrived


class StemSink:
    """`write((stems, C, n))` in track order, then `close()` -> {stem: path}; `abort()` leaves no file behind.

    Samples are passed on in fixed blocks of `BLOCK` (the rest at close): the streaming resampler's output depends
    on its input blocks in the last bits, and this way one span or many give the same bytes."""

    def __init__(self, out_paths: dict[str, Path], *, model_rate: int, in_rate: int, frames: int,
                 input_channels: int, model_channels: int, output: StemOutput):
        """frames: the input's frame count at `in_rate` (the stems get as many, at the output rate)."""
        self.paths = {s: Path(p) for s, p in out_paths.items()}
        self.out_rate = output.rate(in_rate)
        self.out_channels = 1 if input_channels == 1 else model_channels
        out_frames = frames if self.out_rate == in_rate else resampled_length(frames, in_rate, self.out_rate)
        self.writers = [StemWriter(p, in_rate=model_rate, out_rate=self.out_rate, out_channels=self.out_channels,
                                   frames=out_frames, fmt=output.fmt, subtype=output.subtype, clip=output.clip,
                                   bitrate=output.bitrate) for p in self.paths.values()]
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
                stem, name = key.rsplit(".", 1)
                dest = self.paths[stem].with_name(f"{self.paths[stem].stem}.{name}.npy")  # beside it, as it is named
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

    def row_fields(self) -> dict:
        """What the metadata row records about the written stems (after `close()`): output rate and channels, each
        stem's peak in dBFS (before clipping) and the gain `--clip-mode rescale` applied (1.0: none)."""
        db = lambda peak: round(20 * np.log10(peak), 2) if peak > 0 else None  # noqa: E731
        return {"out_sample_rate": self.out_rate, "out_channels": self.out_channels,
                "stem_peak_dbfs": {s: db(w.peak) for s, w in zip(self.paths, self.writers)},
                "stem_gain": {s: float(w.gain) for s, w in zip(self.paths, self.writers)}}

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
