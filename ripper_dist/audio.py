"""Audio I/O for the runtime: probe headers, windowed decode + resample to the model rate, streaming stem writing.

Reading: `AudioReader.read(start, stop)` returns model-rate, model-channel float32 samples `[start, stop)` (zeros
outside the track). It decodes only the input range that the window needs plus a margin, and resamples it with soxr
(VHQ) starting on the rate-ratio grid, which makes every window equal to the matching slice of the whole file resampled
at once (bit-identical in practice for common rates). Channel conversion follows upstream `convert_audio_channels`
(mono is duplicated; more channels than the model has: the first ones), done before resampling as upstream does.

Decoders: libsndfile for what it reads (wav, flac, ogg, opus, mp3, aiff, w64, caf...), FFmpeg through PyAV for
everything else (`ffmpeg_decode`: m4a/mp4/mov, mkv/webm, wma, ac3, wv... and the sound of video files), both behind
the same `seek`/`read` interface, so the resampling and channel rules below are the same for every format.

Seeking is used only where it is sample-accurate: libsndfile's PCM containers and FLAC, and the FFmpeg formats of
`ffmpeg_decode.SEEKABLE`. MP3 and Ogg (Vorbis/Opus) seeks are not exact in libsndfile (measured: wrong samples after
a seek, and an offset near the end of Vorbis files), so those, like FFmpeg's non-seekable formats, are decoded
sequentially: reads that move forward (the order the engine reads in) cost one decode of the file in total; a read
that goes backwards restarts the decode from the beginning.

Writing: `StemWriter` takes model-rate blocks in order, resamples them to the output rate with `soxr.ResampleStream`
(identical to one-shot `soxr.resample`), converts the channels (mono input -> mean of the model channels) and writes
wav or flac to a temporary name in the destination folder, then `os.replace`s it (atomic). Clip modes as upstream
`prevent_clip`; quantisation as upstream's encoders (clamp to [-1, 1]; 16 bit `x * 32767` and 24 bit `x * 8388607`
truncated toward zero). `rescale` needs the peak of the whole stem before the first sample can be written, so the
writer streams float32 samples to a temporary raw file while tracking the peak, and on `close()` converts that file
to the final format with the gain applied (bounded memory; one extra local pass over the stem).
"""
from __future__ import annotations

import math
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from .chunking import MixStats
from .encoders import FORMATS as _FORMATS

__all__ = [
    "AudioError",
    "AudioInfo",
    "AudioReader",
    "NonFiniteAudioError",
    "StemWriter",
    "convert_channels",
    "mix_stats",
    "probe",
    "read_audio",
    "resampled_length",
    "write_stem",
]

RESAMPLE_QUALITY = "VHQ"
CLIP_MODES = ("rescale", "clamp", "tanh", "none")
WRITE_FORMATS = {n: f.container for n, f in _FORMATS.items()}
WRITE_SUBTYPES = {n: f.subtypes for n, f in _FORMATS.items()}
# libsndfile seeks these sample-accurately; anything else is decoded sequentially.
_SEEKABLE_FORMATS = {"WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC", "RAW", "NIST", "IRCAM", "SVX"}
_LOSSY_SUBTYPES = {"VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "ALAC_16", "ALAC_20",
                   "ALAC_24", "ALAC_32", "GSM610", "IMA_ADPCM", "MS_ADPCM", "VOX_ADPCM", "G721_32", "G723_24",
                   "G723_40", "NMS_ADPCM_16", "NMS_ADPCM_24", "NMS_ADPCM_32", "DWVW_12", "DWVW_16", "DWVW_24"}


class AudioError(ValueError):
    """A file that cannot be used as input: missing, unreadable, corrupt, unsupported or empty."""


class NonFiniteAudioError(AudioError):
    """NaN or Inf samples in a float input: refused, since any rule to replace them would make up audio and the
    model would turn them into silent or NaN stems reported as done."""


#: A plain WAV (RIFF) holds at most 4 GiB; a stem that may not fit is written as RF64 (libsndfile reads and writes it;
#: the margin covers the header and libsndfile's PEAK/fact chunks).
WAV_MAX_DATA_BYTES = 2 ** 32 - 1 - 65536
_SAMPLE_BYTES = {"PCM_16": 2, "PCM_24": 3, "FLOAT": 4}


def wav_container(frames: int | None, channels: int, subtype: str) -> str:
    """"WAV", or "RF64" when `frames` of `channels` x `subtype` samples would not fit a plain WAV (4-hour stereo float
    stems at 44.1 kHz: 4.2 GiB). frames None (unknown): "WAV"."""
    if frames is None:
        return "WAV"
    return "RF64" if int(frames) * int(channels) * _SAMPLE_BYTES.get(subtype, 4) > WAV_MAX_DATA_BYTES else "WAV"


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    duration_s: float
    format: str        # libsndfile's format name (WAV, FLAC...), or "FFMPEG"
    subtype: str       # libsndfile's subtype (PCM_16, VORBIS...), or the FFmpeg codec name upper-cased
    container: str = ""  # for the manifest, every backend: wav, flac, ogg, m4a, matroska, webm, asf...
    codec: str = ""      # FFmpeg's codec names, every backend: pcm_s16le, flac, vorbis, mp3, aac, alac, opus...
    backend: str = "libsndfile"  # libsndfile | ffmpeg
    seekable: bool | None = None  # ffmpeg: windows read by seeking (ffmpeg_decode.SEEKABLE)


# libsndfile subtypes under FFmpeg's codec names (the manifest's input_codec is one vocabulary for both backends)
_SF_CODECS = {"PCM_S8": "pcm_s8", "PCM_U8": "pcm_u8", "PCM_16": "pcm_s16le", "PCM_24": "pcm_s24le",
              "PCM_32": "pcm_s32le", "FLOAT": "pcm_f32le", "DOUBLE": "pcm_f64le", "ULAW": "pcm_mulaw",
              "ALAW": "pcm_alaw", "VORBIS": "vorbis", "OPUS": "opus", "MPEG_LAYER_I": "mp1",
              "MPEG_LAYER_II": "mp2", "MPEG_LAYER_III": "mp3", "IMA_ADPCM": "adpcm_ima_wav",
              "MS_ADPCM": "adpcm_ms", "GSM610": "gsm_ms", "ALAC_16": "alac", "ALAC_20": "alac", "ALAC_24": "alac",
              "ALAC_32": "alac"}


def probe(path: str | os.PathLike) -> AudioInfo:
    """Header information, without decoding the audio. Raises `AudioError` for anything unusable."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: no such file")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    try:
        open(p, "rb").close()
    except OSError as e:  # libsndfile would only say "System error."
        raise AudioError(f"{p}: cannot open ({e.strerror})") from None
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises LibsndfileError (a RuntimeError) or others for junk
        return _probe_ffmpeg(p, _clean(e))
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(f"{p}: invalid header (sample rate {info.samplerate}, channels {info.channels})")
    if info.frames <= 0:
        raise AudioError(f"{p}: no audio frames (empty or truncated file)")
    fmt, subtype = str(info.format), str(info.subtype)
    return AudioInfo(sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames),
                     duration_s=float(info.frames) / float(info.samplerate), format=fmt, subtype=subtype,
                     container=fmt.lower(), codec="flac" if fmt == "FLAC" else _SF_CODECS.get(subtype, subtype.lower()))


def _probe_ffmpeg(p: Path, sf_reason: str) -> AudioInfo:
    """What libsndfile cannot read, through FFmpeg; an empty file or junk keeps libsndfile's one-line reason."""
    from .ffmpeg_decode import probe_ffmpeg
    try:
        if p.stat().st_size == 0:
            raise AudioError(f"{p}: not a readable audio file ({sf_reason})")
        f = probe_ffmpeg(p)
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else FFmpeg/PyAV raises on a file it cannot use
        raise (_decode_error(e) or AudioError(f"{p}: not a readable audio file ({_clean(e)})")) from None
    return AudioInfo(sample_rate=f.sample_rate, channels=f.channels, frames=f.frames,
                     duration_s=f.frames / f.sample_rate, format="FFMPEG", subtype=f.codec.upper(),
                     container=f.container, codec=f.codec, backend="ffmpeg", seekable=f.seekable)


def _decode_error(e: Exception) -> AudioError | None:
    """`ffmpeg_decode.DecodeError` (one line naming the file) as an AudioError; None for anything else."""
    mod = sys.modules.get("ripper_dist.ffmpeg_decode")
    return AudioError(str(e)) if mod is not None and isinstance(e, mod.DecodeError) else None


def _clean(e: Exception) -> str:
    msg = str(e).strip()
    return msg.splitlines()[-1] if msg else type(e).__name__


def resampled_length(frames: int, in_rate: int, out_rate: int) -> int:
    """Track length at another rate: `frames * out_rate / in_rate` rounded to nearest, halves down.

    One-shot `soxr.resample` returns this many samples, except that on an exact half it may return one more, and for
    very short inputs (< ~100 frames) one fewer; reads past its end are zeros.
    """
    n, a, b = int(frames), int(in_rate), int(out_rate)
    return (2 * n * b + a - 1) // (2 * a)


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(C_in, n) -> (channels, n) as upstream `convert_audio_channels`: same; to mono: mean; from mono: duplicate;
    more channels than wanted: the first ones; fewer (but not mono): error."""
    c = x.shape[0]
    if c == channels:
        return x
    if channels == 1:
        return x.mean(axis=0, keepdims=True)
    if c == 1:
        return np.repeat(x, channels, axis=0)
    if c > channels:
        return x[:channels]
    raise AudioError(f"the audio has {c} channels: fewer than the model's {channels}, and not mono")


def _grid(in_rate: int, out_rate: int) -> tuple[int, int]:
    g = math.gcd(in_rate, out_rate)
    return in_rate // g, out_rate // g


class AudioReader:
    """Model-rate, model-channel float32 windows of one file; see the module docstring.

    `length` is the track length at the model rate (`resampled_length(frames, file rate, model rate)`); window `k` of
    the model-rate track equals sample `k` of the whole file resampled at once with soxr.
    seekable: None = decide from the format (see the module docstring). history: in sequential mode, model-rate
    samples before the latest read kept decoded so that reads may step back that far without a restart.
    Use as a context manager or call `close()`. Not thread-safe.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, channels: int = 2, *,
                 quality: str = RESAMPLE_QUALITY, margin: int | None = None, seekable: bool | None = None,
                 history: int | None = None):
        self.path = Path(path)
        self.info = probe(self.path)
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        if 1 < self.info.channels < self.channels and self.channels != 1:
            raise AudioError(f"{self.path}: {self.info.channels} channels cannot be converted to {self.channels} "
                             "(upstream refuses fewer channels than the model's unless mono)")
        self.quality = quality
        self.length = resampled_length(self.info.frames, self.info.sample_rate, self.sample_rate)
        self._a, self._b = _grid(self.info.sample_rate, self.sample_rate)  # a input samples <-> b output samples
        # Input samples decoded beyond each side of a window so that soxr's filter sees the same input as it does in
        # the whole file (measured: 512 suffice for common ratios; keep a wide safety factor).
        self.margin = int(margin) if margin is not None else max(4096, int(0.05 * self.info.sample_rate))
        if seekable is None and self.info.backend == "ffmpeg":
            seekable = bool(self.info.seekable)
        elif seekable is None:
            seekable = self.info.format in _SEEKABLE_FORMATS and self.info.subtype not in _LOSSY_SUBTYPES
        self.seekable = bool(seekable)
        # sequential mode: model-rate samples before the latest read that stay decoded (default 30 s)
        self.history = int(history) if history is not None else 30 * self.sample_rate
        self._file: sf.SoundFile | None = None
        self._pos = 0            # sequential mode: file position (input frames)
        self._cache = np.zeros((0, self.info.channels), dtype=np.float32)
        self._cache_start = 0    # sequential mode: input frame of _cache[0]
        self.restarts = 0        # sequential mode: decodes restarted from the beginning (reads going backwards)

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self):
        """The decoder: a `soundfile.SoundFile`, or an `ffmpeg_decode.FFmpegSource` (the same seek/read/close)."""
        if self._file is None:
            if self.info.backend == "ffmpeg":
                from .ffmpeg_decode import FFmpegSource, probe_ffmpeg
                # seekable: a window of recent samples stays decoded for reads that step back (overlapping chunks,
                # another sub-model's batches); sequential: `_decode_sequential` keeps that history itself
                keep = self._history_frames() if self.seekable else 0
                try:
                    self._file = FFmpegSource(self.path, probe_ffmpeg(self.path), keep=keep)
                except Exception as e:
                    raise (_decode_error(e) or AudioError(f"{self.path}: cannot open ({_clean(e)})")) from None
            else:
                try:
                    self._file = sf.SoundFile(str(self.path))
                except Exception as e:
                    raise AudioError(f"{self.path}: cannot open ({_clean(e)})") from None
            self._pos = 0
        return self._file

    # -- decoding (input rate, file channels) ---------------------------------------------------------------------------
    def _read_frames(self, f, n: int) -> np.ndarray:
        try:
            data = f.read(n, dtype="float32", always_2d=True)
        except AudioError:
            raise
        except Exception as e:
            raise _decode_error(e) or AudioError(f"{self.path}: decoding failed ({_clean(e)})") from None
        self._pos += data.shape[0]
        return data

    def _decode(self, i0: int, i1: int) -> np.ndarray:
        """Input frames [i0, i1) (0 <= i0 <= i1 <= frames), (n, file channels); zeros past a short file."""
        n = i1 - i0
        if self.seekable:
            f = self._open()
            try:
                f.seek(i0)
            except AudioError:
                raise
            except Exception as e:
                raise _decode_error(e) or AudioError(f"{self.path}: seek failed ({_clean(e)})") from None
            self._pos = i0
            data = self._read_frames(f, n)
        else:
            data = self._decode_sequential(i0, i1)
        if data.shape[0] < n:  # the header promised more frames than the stream holds
            data = np.concatenate([data, np.zeros((n - data.shape[0], data.shape[1]), np.float32)])
        if not np.isfinite(data).all():
            bad = int(np.argmax(~np.isfinite(data).all(axis=1)))
            raise NonFiniteAudioError(f"{self.path}: NaN or Inf samples in the input (first at "
                                      f"{(i0 + bad) / self.info.sample_rate:.3f} s)")
        return data

    def _decode_sequential(self, i0: int, i1: int) -> np.ndarray:
        if i0 < self._cache_start:  # further back than the history kept: restart the decode
            self.restarts += 1
            self.close()
            self._cache = self._cache[:0]
            self._cache_start = 0
        f = self._open()
        cache_end = self._cache_start + self._cache.shape[0]  # == self._pos
        if i0 > cache_end:  # skip forward by decoding (seeks are not trusted here)
            self._cache = self._cache[:0]
            skip = i0 - cache_end
            while skip > 0:
                got = self._read_frames(f, min(skip, 1 << 18)).shape[0]
                if got == 0:
                    break
                skip -= got
            self._cache_start = cache_end = self._pos
        if i1 > cache_end:
            more = self._read_frames(f, i1 - cache_end)
            self._cache = np.concatenate([self._cache, more]) if self._cache.shape[0] else more
        # keep `history` frames before i0 for reads that step back a little (batches of another sub-model)
        keep_from = max(self._cache_start, i0 - self._history_frames())
        drop = min(keep_from - self._cache_start, self._cache.shape[0])
        if drop > 0:
            self._cache = self._cache[drop:]
            self._cache_start += drop
        return self._cache[i0 - self._cache_start:i1 - self._cache_start].copy()

    def _history_frames(self) -> int:
        return -(-self.history * self._a // self._b) + 2 * self.margin

    # -- public -------------------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> np.ndarray:
        """float32 (channels, stop - start) at the model rate; zeros outside `[0, length)`."""
        start, stop = int(start), int(stop)
        if stop < start:
            raise ValueError(f"stop ({stop}) < start ({start})")
        out = np.zeros((self.channels, stop - start), dtype=np.float32)
        s0, s1 = max(start, 0), min(stop, self.length)
        if s1 <= s0:
            return out
        frames = self.info.frames
        if self.info.sample_rate == self.sample_rate:
            x = self._decode(s0, s1)
            out[:, s0 - start:s1 - start] = convert_channels(x.T, self.channels)
            return out
        a, b = self._a, self._b
        m = -(-self.margin // a)                 # margin in grid steps
        k0 = max(0, s0 // b - m)                 # first grid step decoded
        i0 = k0 * a                              # input frame at output sample k0 * b
        i1 = min(frames, -(-s1 * a // b) + m * a)
        x = self._decode(i0, i1).T
        if x.shape[0] == 1 and self.channels > 1:  # mono: resample once, then duplicate (same values)
            y = np.repeat(self._resample(x), self.channels, axis=0)
        else:  # channel conversion before resampling, as upstream `convert_audio`
            y = self._resample(convert_channels(x, self.channels))
        o0 = k0 * b
        seg = y[:, s0 - o0:s1 - o0]
        if seg.shape[1] != s1 - s0:  # only if the header lied about the length
            seg = np.pad(seg, ((0, 0), (0, s1 - s0 - seg.shape[1])))
        out[:, s0 - start:s1 - start] = seg
        return out

    def _resample(self, x: np.ndarray) -> np.ndarray:
        y = soxr.resample(np.ascontiguousarray(x.T), self.info.sample_rate, self.sample_rate, quality=self.quality)
        return np.ascontiguousarray(y.T, dtype=np.float32)

    def blocks(self, block_samples: int = 44100 * 30) -> Iterator[tuple[int, np.ndarray]]:
        """(start, (channels, n)) blocks covering the track in order."""
        for s in range(0, self.length, block_samples):
            yield s, self.read(s, min(s + block_samples, self.length))

    def read_all(self) -> np.ndarray:
        return self.read(0, self.length)


def read_audio(path: str | os.PathLike, sample_rate: int, channels: int = 2) -> np.ndarray:
    """The whole file at the model rate and channel count: float32 (channels, length)."""
    with AudioReader(path, sample_rate, channels) as r:
        return r.read_all()


def mix_stats(reader: AudioReader, block_samples: int = 44100 * 30) -> MixStats:
    """Normalisation statistics of the whole track at the model rate, read block by block."""
    stats = MixStats()
    for _, block in reader.blocks(block_samples):
        stats = stats + MixStats.of(block)
    return stats


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _prevent_clip_blockwise(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "clamp":
        return np.clip(x, -0.99, 0.99)
    if mode == "tanh":
        return np.tanh(x)
    return x  # "none"; "rescale" is applied with the peak of the whole stem


def _quantize(x: np.ndarray, subtype: str) -> np.ndarray:
    """Frames (n, C) float -> what soundfile writes, quantised as upstream's encoders."""
    x = np.clip(x, -1.0, 1.0)  # lossy codecs take floats in [-1, 1]
    if subtype == "PCM_16":
        return (x * (2 ** 15 - 1)).astype(np.int16)
    if subtype == "PCM_24":
        # int32 holding the 24-bit value in its top bytes; libsndfile keeps the top 24 bits
        return (x * (2 ** 23 - 1)).astype(np.int32) << 8
    return x.astype(np.float32, copy=False)


class StemWriter:
    """Write one stem, streaming: `write(block)` with model-rate (C, n) blocks in order, then `close()`.

    in_rate: rate of the blocks; out_rate: rate of the file (None = in_rate); out_channels: 1 writes the mean of the
    block's channels, else the block's channels are written as they are (None = the block's); frames: exact length of
    the file at out_rate (e.g. the input file's frame count; the resampled tail is cut or zero-padded), None = whatever
    the resampler produces. fmt: "wav" | "flac"; subtype: PCM_16 | PCM_24 | FLOAT (wav only). clip: rescale | clamp |
    tanh | none (upstream `prevent_clip`; the encoder then clamps to [-1, 1] like upstream's).

    Nothing appears at `path` until `close()` succeeds; `abort()` (or an exception inside `with`) removes the temporary
    files. `peak` is the largest absolute sample written (after resampling, before clipping).
    """

    def __init__(self, path: str | os.PathLike, *, in_rate: int, out_rate: int | None = None,
                 out_channels: int | None = None, frames: int | None = None, fmt: str = "wav",
                 subtype: str | None = None, clip: str = "rescale", quality: str = RESAMPLE_QUALITY,
                 bitrate: int | None = None):
        fmt = fmt.lower()
        if fmt not in WRITE_FORMATS:
            raise ValueError(f"unsupported output format {fmt!r}: use one of {sorted(WRITE_FORMATS)}")
        subtype = (subtype or WRITE_SUBTYPES[fmt][0]).upper()
        if subtype not in WRITE_SUBTYPES[fmt]:
            raise ValueError(f"{fmt} cannot hold {subtype}: use one of {WRITE_SUBTYPES[fmt]}")
        clip = "none" if clip is None else clip.lower()
        if clip not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip!r}: use one of {CLIP_MODES}")
        self.path = Path(path)
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate or in_rate)
        self.out_channels = out_channels
        self.frames = None if frames is None else int(frames)
        self.fmt, self.subtype, self.clip, self.quality, self.bitrate = fmt, subtype, clip, quality, bitrate
        self.peak = 0.0
        self.gain = 1.0  # applied by `rescale` (1 / divisor), known after close()
        self.written = 0  # frames at out_rate passed on so far
        self._resampler = None
        self._channels: int | None = None
        self._closed = False
        tag = f".{self.path.name}.{uuid.uuid4().hex[:12]}"
        self._tmp = self.path.with_name(tag + ".tmp")
        self._raw = self.path.with_name(tag + ".f32") if clip == "rescale" else None
        self._sink = None  # SoundFile (direct) or raw binary file (rescale)

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "StemWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()

    def _open(self, channels: int) -> None:
        self._channels = channels
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.in_rate != self.out_rate:
            self._resampler = soxr.ResampleStream(self.in_rate, self.out_rate, channels, dtype="float32",
                                                  quality=self.quality)
        if self._raw is not None:
            self._sink = open(self._raw, "wb")
        else:
            self._sink = self._open_soundfile()

    @property
    def container(self) -> str:
        """The file format written: FLAC, MP3, OGG ..., WAV, or RF64 for a WAV too long for RIFF (see wav_container)."""
        if self.fmt != "wav":
            return WRITE_FORMATS[self.fmt]
        return wav_container(self.frames, self._channels or self.out_channels or 2, self.subtype)

    def _open_soundfile(self):
        from .encoders import open_encoder
        return open_encoder(self._tmp, self.fmt, self.subtype, self.out_rate, self._channels, self.bitrate,
                            container=self.container)

    # -- streaming ----------------------------------------------------------------------------------------------------
    def write(self, block: np.ndarray) -> None:
        """Append (C, n) samples at in_rate."""
        if self._closed:
            raise RuntimeError("writer is closed")
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2:
            raise ValueError(f"expected a (channels, samples) block, got shape {block.shape}")
        if self.out_channels == 1 and block.shape[0] != 1:
            block = block.mean(axis=0, keepdims=True)
        if self._sink is None:
            self._open(block.shape[0])
        elif block.shape[0] != self._channels:
            raise ValueError(f"block has {block.shape[0]} channels, earlier blocks had {self._channels}")
        frames = np.ascontiguousarray(block.T)
        if self._resampler is not None:
            frames = self._resampler.resample_chunk(frames, last=False)
        self._emit(frames)

    def _emit(self, frames: np.ndarray) -> None:
        if self.frames is not None:
            frames = frames[:max(0, self.frames - self.written)]
        if frames.shape[0] == 0:
            return
        self.written += frames.shape[0]
        self.peak = max(self.peak, float(np.abs(frames).max()))
        if self._raw is not None:
            self._sink.write(np.ascontiguousarray(frames, dtype="<f4").tobytes())
        else:
            self._sink.write(_quantize(_prevent_clip_blockwise(frames, self.clip), self.subtype))

    def close(self) -> Path:
        """Flush, finish the file and move it into place. Returns the final path."""
        if self._closed:
            return self.path
        try:
            if self._sink is None:  # nothing written: an empty stem of the right shape
                self._open(self.out_channels or 1)
            if self._resampler is not None:
                self._emit(self._resampler.resample_chunk(np.zeros((0, self._channels), np.float32), last=True))
            if self.frames is not None and self.written < self.frames:
                self._emit(np.zeros((self.frames - self.written, self._channels), np.float32))
            self._sink.close()
            self._sink = None
            if self._raw is not None:
                self._convert_rescaled()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self._closed = True
        self._cleanup()
        return self.path

    def _convert_rescaled(self) -> None:
        divisor = np.float32(max(1.01 * self.peak, 1.0))  # upstream: wav / max(1.01 * peak, 1)
        self.gain = float(1 / divisor)
        step = 1 << 18
        dst = self._open_soundfile()
        try:
            with open(self._raw, "rb") as src:
                while True:
                    buf = src.read(step * self._channels * 4)
                    if not buf:
                        break
                    frames = np.frombuffer(buf, dtype="<f4").reshape(-1, self._channels)
                    dst.write(_quantize(frames / divisor if divisor != 1 else frames, self.subtype))
        finally:
            dst.close()

    def abort(self) -> None:
        """Drop everything written so far (no file appears at `path`)."""
        self._closed = True
        if self._sink is not None:
            try:
                self._sink.close()
            except Exception:
                pass
            self._sink = None
        self._cleanup(include_tmp=True)

    def _cleanup(self, include_tmp: bool = False) -> None:
        for p in (self._raw, self._tmp if include_tmp else None):
            if p is not None:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


def write_stem(path: str | os.PathLike, audio: np.ndarray, *, in_rate: int, out_rate: int | None = None,
               out_channels: int | None = None, frames: int | None = None, fmt: str = "wav",
               subtype: str | None = None, clip: str = "rescale", bitrate: int | None = None) -> Path:
    """Write a whole (C, n) stem at once (same processing as `StemWriter`)."""
    with StemWriter(path, in_rate=in_rate, out_rate=out_rate, out_channels=out_channels, frames=frames, fmt=fmt,
                    subtype=subtype, clip=clip, bitrate=bitrate) as w:
        w.write(audio)
    return w.path
