"""Decode what libsndfile cannot read (m4a/mp4/mov, mkv/mka/webm, wma, ac3, wv, tta, ape, video files...) with
FFmpeg through PyAV, sample-aligned with the FFmpeg command line (`ffmpeg -i FILE -map 0:a:0 -f f32le -`).

The first audio stream of the file is used (a video's sound track). Samples are what the CLI writes: the decoder's
own output with priming/encoder delay and edit lists applied by libavformat/libavcodec (skip-samples side data,
discarded packets), converted to float32 as libswresample does (s16 / 2^15, s32 / 2^31, u8: (x - 128) / 2^7).

Two ways to reach a window, chosen per file at probe (`FFmpegInfo.seekable`):

* Seek (`SEEKABLE`: demuxers with a sample-accurate index and a stream time base of 1/sample_rate, and lossless codecs
  whose frames decode independently; each pair is proved by tests/test_ffmpeg_decode.py to give windows equal, bit for
  bit, to the same samples of a full sequential decode). A window starting at sample `i` seeks to `i - PREROLL`
  (backward, to the packet at or before it; the decoder is flushed there), decodes and drops the preroll, and locates
  every sample by its frame's timestamp (`pts - origin`, origin: the pts of the first frame of a sequential decode).
  Frames after a seek must follow each other without gap or overlap, else the read fails rather than misplace
  samples. Reads that move forward a little keep decoding instead of seeking; a window of recent samples stays decoded
  for reads that step back.
* Sequential, for everything else: samples are counted from the start as the CLI concatenates them; a read that goes
  backwards restarts the decode (`audio.AudioReader` keeps a history so the engine's reads rarely do). That includes
  the lossy codecs, measured not to converge to the sequential decode after a seek whatever the preroll: FFmpeg's AAC
  decoder carries a noise generator (PNS) and float state across the whole stream (differences of 5e-6 on a pure tone
  after 30000 samples of preroll, 0.07 with noise), AC-3/E-AC-3 a dither generator, Opus IIR state that needs tens of
  thousands of samples; and raw ADTS/AC-3/DTS streams (timestamps after a byte seek are guesses), Matroska/WebM and
  ASF/WMA (millisecond timestamps cannot place a sample).

Frame count (`AudioInfo.frames`, needed by the chunk planner before any read): container headers do not give it
exactly (an .m4a's header says the edit-list length, while FFmpeg outputs the whole last AAC frame; Matroska only
knows milliseconds). Seekable files: the pts of the last frame plus its length, from a seek to the end that decodes
about a second (milliseconds). Sequential files: one full decode at probe (AAC: about 4 s per hour of stereo on one
core, see docs/BENCHMARKS.md "Decoding"), cached per process by (path, size, mtime), so the probes of one process
(the job's total duration, then the reader) cost one decode.
"""
from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np



class DecodeError(ValueError):
    """A file FFmpeg cannot use, or a decode that failed: one line naming the file (`audio` turns it into its
    AudioError; this module does not import `audio`, which imports it)."""


AudioError = DecodeError  # the name the code below raises

__all__ = ["DecodeError", "FFmpegInfo", "FFmpegSource", "SEEKABLE", "PREROLL", "probe_ffmpeg"]

#: (demuxer, codec) pairs read by seeking; each is proved by a test (windowed == sequential, bit for bit).
_MOV = "mov,mp4,m4a,3gp,3g2,mj2"
SEEKABLE = {(_MOV, c) for c in ("alac", "flac", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_s32le",
                                "pcm_s32be", "pcm_f32le", "pcm_f32be")} | {("wv", "wavpack"), ("tta", "tta")}
#: samples decoded and dropped before a window after a seek (the decoder's state converges within them); at least.
PREROLL = 8192
_SCALE = {"u8": np.float32(1 / 128), "s16": np.float32(1 / 32768), "s32": np.float32(2.0 ** -31),
          "s64": np.float32(2.0 ** -63), "flt": None, "dbl": None}


@dataclass(frozen=True)
class FFmpegInfo:
    sample_rate: int
    channels: int
    frames: int
    container: str     # short demuxer name: m4a, mp4, matroska, webm, asf, ac3, wv...
    codec: str         # FFmpeg decoder name: aac, alac, opus, wmav2...
    seekable: bool
    origin_pts: int    # pts of the first decoded frame (seekable files: sample i has pts origin + i)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


def _reason(e: BaseException) -> str:
    msg = (getattr(e, "strerror", None) or str(e) or type(e).__name__).strip()
    return msg.splitlines()[-1] if msg else type(e).__name__


def _open(path: Path):
    import av
    try:
        container = av.open(str(path), "r")
    except Exception as e:  # noqa: BLE001 - av.FFmpegError and OSError subclasses; all mean "cannot read"
        raise AudioError(f"{path}: not a readable audio file ({_reason(e)})") from None
    if not container.streams.audio:
        container.close()
        raise AudioError(f"{path}: not a readable audio file (no audio stream)")
    stream = container.streams.audio[0]
    return container, stream


def _short_name(fmt_name: str, path: Path) -> str:
    names = fmt_name.split(",")
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in names else names[0]


def _to_float(frame) -> np.ndarray:
    """A decoded frame as (samples, channels) float32, converted as libswresample converts to f32."""
    a = frame.to_ndarray()
    fmt = frame.format.name
    base = fmt.rstrip("p")
    channels = len(frame.layout.channels)
    a = a.T if frame.format.is_planar else a.reshape(-1, channels)
    if base not in _SCALE:
        raise AudioError(f"unsupported sample format {fmt}")
    if base == "u8":
        return (a.astype(np.float32) - np.float32(128)) * _SCALE[base]
    out = a.astype(np.float32)
    return out * _SCALE[base] if _SCALE[base] is not None else out


class _Decoder:
    """Frames of the first audio stream as (pts, (n, C) float32); decode errors become one-line AudioErrors."""

    def __init__(self, path: Path):
        self.path = path
        self.container, self.stream = _open(path)
        self.sample_rate = None
        self.channels = None

    def frames(self):
        path, stream = self.path, self.stream
        try:
            for packet in self.container.demux(stream):
                for frame in packet.decode():
                    yield frame.pts, self._check(frame)
        except AudioError:
            raise
        except Exception as e:  # noqa: BLE001 - av.error.*: corrupt or truncated data
            raise AudioError(f"{path}: decoding failed ({_reason(e)})") from None

    def _check(self, frame) -> np.ndarray:
        rate, channels = int(frame.sample_rate), len(frame.layout.channels)
        if self.sample_rate is None:
            self.sample_rate, self.channels = rate, channels
        elif (rate, channels) != (self.sample_rate, self.channels):
            raise AudioError(f"{self.path}: the audio changes from {self.sample_rate} Hz x {self.channels} to "
                             f"{rate} Hz x {channels} mid-stream (convert it to one format first)")
        try:
            return _to_float(frame)
        except AudioError as e:
            raise AudioError(f"{self.path}: {e}") from None

    def seek(self, pts: int) -> None:
        try:
            self.container.seek(int(pts), stream=self.stream, backward=True, any_frame=False)
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{self.path}: seek failed ({_reason(e)})") from None

    def close(self) -> None:
        self.container.close()


def _probe_uncached(path: Path) -> FFmpegInfo:
    dec = _Decoder(path)
    try:
        fmt, codec = dec.container.format.name, dec.stream.codec_context.name
        tb = dec.stream.time_base
        it = dec.frames()
        first = next(it, None)
        if first is None:
            raise AudioError(f"{path}: no audio frames (empty or truncated file)")
        origin, data = first
        rate, channels = dec.sample_rate, dec.channels
        seekable = ((fmt, codec) in SEEKABLE and origin is not None and tb == Fraction(1, rate))
        if not seekable:  # count every sample, as the CLI concatenates them
            frames = data.shape[0] + sum(d.shape[0] for _, d in it)
        else:
            frames = _tail_count(dec, path, origin, rate)
    finally:
        dec.close()
    if frames <= 0:
        raise AudioError(f"{path}: no audio frames (empty or truncated file)")
    return FFmpegInfo(sample_rate=rate, channels=channels, frames=frames, container=_short_name(fmt, path),
                      codec=codec, seekable=seekable, origin_pts=int(origin))


def _tail_count(dec: _Decoder, path: Path, origin: int, rate: int) -> int:
    """Samples of a seekable file: the last frame's position (from its pts) plus its length."""
    dur = dec.stream.duration  # in samples (time base 1/rate); an estimate only (edit list, or a wrong header)
    if not dur:
        dur = (dec.container.duration or 0) * rate // 1_000_000
    dec.seek(origin + max(0, int(dur) - rate))
    end, expected = None, None
    for pts, data in dec.frames():
        if pts is None:
            raise AudioError(f"{path}: a frame without a timestamp (cannot be read by seeking)")
        pos = pts - origin
        if expected is not None and pos != expected:
            raise AudioError(f"{path}: timestamps jump near {pos / rate:.3f} s (a gap or overlap in the file)")
        expected = end = pos + data.shape[0]
    if end is None:
        raise AudioError(f"{path}: no audio decodable at the end of the file (truncated?)")
    return end


def probe_ffmpeg(path: str | os.PathLike) -> FFmpegInfo:
    """Stream information (see the module docstring for the frame count), cached by (path, size, mtime)."""
    p = Path(path)
    st = os.stat(p)
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    info = _probe_uncached(p)
    with _CACHE_LOCK:
        _CACHE[key] = info
        while len(_CACHE) > 256:
            _CACHE.popitem(last=False)
    return info


class FFmpegSource:
    """Input-rate samples of one file, with the part of `soundfile.SoundFile`'s interface that `AudioReader` uses:
    `seek(frame)` (seekable files only, see the module docstring), `read(n)` -> (m <= n, channels) float32, `close()`.

    keep: samples before the read position kept decoded, so that reads stepping back that far neither seek nor
    restart (0 in sequential mode, where `AudioReader` keeps its own history)."""

    def __init__(self, path: str | os.PathLike, info: FFmpegInfo, keep: int = 0, preroll: int | None = None):
        self.path, self.info = Path(path), info
        self.keep = int(keep)
        self.preroll = int(preroll) if preroll is not None else max(PREROLL, info.sample_rate // 10)
        self.seeks = 0         # real seeks done (a forward step that keeps decoding is not one)
        self.restarts = 0      # decodes restarted from the beginning
        self._dec: _Decoder | None = None
        self._it = None
        self._cache = np.zeros((0, info.channels), np.float32)
        self._cache_start = 0  # position of _cache[0]
        self._pos = 0          # read position
        self._eof = False
        self._drop_until = 0   # frames before it are dropped while decoding (preroll, skipped samples)
        self._start(0)

    # -- decoding -----------------------------------------------------------------------------------------------------
    def _start(self, target: int) -> None:
        """(Re)position the decoder so that the next samples kept are `target`, `target + 1`, ... (seek with
        preroll, or restart from the beginning and skip by decoding)."""
        info = self.info
        at = target - self.preroll
        if info.seekable and at > 0:
            if self._dec is None:
                self._dec = _Decoder(self.path)
            self.seeks += 1
            self._dec.seek(info.origin_pts + at)
            self._it = self._timed(at)
        else:
            if self._dec is not None:
                self._dec.close()
                self.restarts += 1
            self._dec = _Decoder(self.path)
            self._it = self._timed(0) if info.seekable else self._counted()
        self._cache = self._cache[:0]
        self._cache_start = self._drop_until = target
        self._eof = False

    def _counted(self):
        """Sequential: positions counted from the start, as the CLI concatenates the frames."""
        pos = 0
        for _, data in self._dec.frames():
            yield pos, data
            pos += data.shape[0]

    def _timed(self, at: int):
        """Seekable: positions from timestamps; the first frame must start at or before `at`, the others follow
        without gap or overlap."""
        info, expected = self.info, None
        for pts, data in self._dec.frames():
            if pts is None:
                raise AudioError(f"{self.path}: a frame without a timestamp (cannot be read by seeking)")
            pos = pts - info.origin_pts
            if expected is None and pos > at:
                raise AudioError(f"{self.path}: a seek landed at sample {pos}, after {at} (the index is not "
                                 "sample-accurate)")
            if expected is not None and pos != expected:
                raise AudioError(f"{self.path}: timestamps jump near {pos / info.sample_rate:.3f} s (a gap or overlap "
                                 "in the file)")
            expected = pos + data.shape[0]
            yield pos, data

    def _fill(self, stop: int) -> None:
        """Decode until the cache reaches `stop` (or the end of the stream)."""
        end = self._cache_start + self._cache.shape[0]
        if end >= stop or self._eof:
            return
        pending = [self._cache] if self._cache.shape[0] else []
        while end < stop:
            nxt = next(self._it, None)
            if nxt is None:
                self._eof = True
                break
            pos, data = nxt
            if pos + data.shape[0] <= self._drop_until:  # preroll, or samples skipped over
                continue
            if pos < self._drop_until:
                data = data[self._drop_until - pos:]
                pos = self._drop_until
            if pos != end:  # positions are checked by _timed/_counted: a bug if reached
                raise AudioError(f"{self.path}: decoded samples at {pos}, expected {end}")
            pending.append(data)
            end += data.shape[0]
            self._drop_until = end
        self._cache = np.concatenate(pending) if len(pending) > 1 else (pending[0] if pending else self._cache)

    # -- SoundFile-like interface -------------------------------------------------------------------------------------
    def seek(self, frame: int) -> int:
        """Position the next `read` at `frame`: from the cache, by decoding forward (a short step, or any step in
        sequential mode), else by a seek with preroll (sequential mode: a restart from the beginning)."""
        frame = int(frame)
        end = self._cache_start + self._cache.shape[0]
        if self._cache_start <= frame <= end:
            pass
        elif frame > end and (not self.info.seekable or frame - end <= 4 * self.preroll):
            self._cache, self._cache_start, self._drop_until = self._cache[:0], frame, frame
        else:
            self._start(frame)
        self._pos = frame
        return frame

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        n = max(0, int(frames))
        self._fill(self._pos + n)
        i = self._pos - self._cache_start
        out = self._cache[i:i + n].copy()
        self._pos += out.shape[0]
        drop = min(max(0, self._pos - self._cache_start - self.keep), self._cache.shape[0])
        if drop:
            self._cache = self._cache[drop:]
            self._cache_start += drop
        return out

    def close(self) -> None:
        if self._dec is not None:
            self._dec.close()
            self._dec = None
            self._it = None
