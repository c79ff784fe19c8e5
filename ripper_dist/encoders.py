"""Output formats: which can be written here, and an encoder for each, all through maintained libraries.

WAV, FLAC, Ogg Vorbis, Ogg Opus and MP3 go through soundfile (libsndfile: MP3 needs libsndfile >= 1.1, which the
soundfile wheels bundle); M4A (AAC) through PyAV (FFmpeg's encoder; a core dependency, which also decodes the inputs libsndfile cannot). No encoder is written here:
this module only maps `--format/--subtype/--bitrate` onto those libraries and says clearly when one is missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OutputFormat:
    name: str                   # --format and the file extension
    container: str              # soundfile format, or "M4A" (PyAV)
    subtypes: tuple[str, ...]   # first = default
    lossy: bool = False
    rates: tuple[int, ...] = ()  # sample rates the codec takes (empty: any); others are resampled to the last


FORMATS = {f.name: f for f in (
    OutputFormat("wav", "WAV", ("PCM_16", "PCM_24", "FLOAT")),
    OutputFormat("flac", "FLAC", ("PCM_16", "PCM_24")),
    OutputFormat("mp3", "MP3", ("MPEG_LAYER_III",), lossy=True),
    OutputFormat("ogg", "OGG", ("VORBIS",), lossy=True),
    OutputFormat("opus", "OGG", ("OPUS",), lossy=True, rates=(8000, 12000, 16000, 24000, 48000)),
    OutputFormat("m4a", "M4A", ("AAC",), lossy=True),
)}
BITRATE_FORMATS = ("mp3", "m4a")
DEFAULT_BITRATE = 320  # kbps, demucs' --mp3-bitrate default


def unavailable(fmt: str) -> str | None:
    """Why `fmt` cannot be written on this installation, or None when it can."""
    f = FORMATS[fmt]
    if f.container == "M4A":
        try:
            import av  # noqa: F401
        except ImportError:
            return "m4a needs PyAV, a dependency of ripper-dist that is missing here: pip install av"
        return None
    import soundfile as sf
    if f.container not in sf.available_formats() or f.subtypes[0] not in sf.available_subtypes(f.container):
        return (f"{fmt} is not supported by this libsndfile ({sf.__libsndfile_version__}); "
                f"available: {', '.join(available())}")
    return None


def available() -> list[str]:
    return [n for n in FORMATS if n != "m4a" and unavailable(n) is None] + (["m4a"] if unavailable("m4a") is None
                                                                             else [])


def output_rate(fmt: str, rate: int) -> int:
    """The rate a stem is written at: `rate`, unless the codec cannot hold it (Opus: 48 kHz)."""
    rates = FORMATS[fmt].rates
    return rate if not rates or rate in rates else rates[-1]


def _mp3_compression(kbps: int, rate: int) -> float:
    """libsndfile's MP3 compression level for a constant bitrate: it maps [0, 1] linearly onto the MPEG version's
    bitrate range (MPEG-1 at >= 32 kHz: 320..32 kbps; MPEG-2: 160..8; MPEG-2.5: 64..8)."""
    hi, lo = (320, 32) if rate >= 32000 else (160, 8) if rate >= 16000 else (64, 8)
    return float(min(max((hi - kbps) / (hi - lo), 0.0), 1.0))


def open_encoder(path: Path, fmt: str, subtype: str, rate: int, channels: int, bitrate: int | None = None, *,
                 container: str | None = None):
    """An object with `write(frames)` ((n, channels): int16/int32 for PCM, float32 in [-1, 1] otherwise) and
    `close()`, writing `path` in `fmt` (whatever its file name says). container: the soundfile format to use instead
    of the format's own (RF64 for a WAV too long for RIFF)."""
    f = FORMATS[fmt]
    if f.container == "M4A":
        return AacEncoder(path, rate, channels, bitrate or DEFAULT_BITRATE)
    import soundfile as sf
    kwargs = {}
    if fmt == "mp3":
        kwargs = dict(compression_level=_mp3_compression(bitrate or DEFAULT_BITRATE, rate),
                      bitrate_mode="CONSTANT")
    return sf.SoundFile(str(path), mode="w", samplerate=rate, channels=channels, format=container or f.container,
                        subtype=subtype, **kwargs)


class AacEncoder:
    """AAC in an MP4 (.m4a) container through PyAV; takes float32 frames (n, channels)."""

    def __init__(self, path: Path, rate: int, channels: int, kbps: int):
        import av
        self._av = av
        self.container = av.open(str(path), mode="w", format="ipod")
        self.stream = self.container.add_stream("aac", rate=rate)
        self.stream.layout = "mono" if channels == 1 else "stereo"
        self.stream.bit_rate = int(kbps) * 1000
        self.rate, self.channels, self.pts = rate, channels, 0

    def write(self, frames: np.ndarray) -> None:
        if not len(frames):
            return
        planar = np.ascontiguousarray(np.asarray(frames, dtype=np.float32).T)
        frame = self._av.AudioFrame.from_ndarray(planar, format="fltp", layout=self.stream.layout.name)
        frame.sample_rate, frame.pts = self.rate, self.pts
        self.pts += planar.shape[1]
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is None:
            return
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None
