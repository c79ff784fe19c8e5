"""Probe, windowed resampled reads, streaming stats, atomic stem writing."""
from __future__ import annotations

import os

import numpy as np
from ripper_export.metrics import sdr_db as sdr
import pytest
import soundfile as sf
import soxr

from ripper_dist.audio import (AudioError, AudioReader, StemWriter, convert_channels, mix_stats, probe, read_audio,
                               resampled_length, write_stem)
from ripper_dist.chunking import MixStats




def signal(frames, channels, sr, seed=0):
    """Band-limited-ish test audio: a few tones plus filtered noise, (frames, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / sr
    cols = []
    for c in range(channels):
        x = 0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t + c) + 0.1 * np.sin(2 * np.pi * 3000 * t)
        n = np.convolve(rng.standard_normal(frames), np.ones(8) / 8, mode="same")
        cols.append(x + 0.1 * n)
    return np.stack(cols, 1).astype(np.float32)


def whole_reference(path, model_sr=44100, channels=2):
    """The whole file decoded, channel-converted and resampled at once, at `resampled_length` (soxr's own length can
    be one sample longer on an exact half)."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = convert_channels(data.T, channels)
    if sr != model_sr:
        x = soxr.resample(np.ascontiguousarray(x.T), sr, model_sr, quality="VHQ").T
    n = resampled_length(data.shape[0], sr, model_sr)
    assert x.shape[1] - n in (0, 1)
    return np.ascontiguousarray(x[:, :n])


def test_resampled_length_is_soxr_length():
    rng = np.random.default_rng(0)
    for a, b in [(48000, 44100), (22050, 44100), (44100, 48000), (8000, 44100), (96000, 44100), (44100, 44100)]:
        for n in [30000, 1001] + [int(v) for v in rng.integers(1000, 200000, 40)]:
            got = soxr.resample(np.zeros((n, 1), np.float32), a, b, quality="VHQ").shape[0]
            assert got - resampled_length(n, a, b) in ((0, 1) if (2 * n * b) % (2 * a) == a else (0,)), (a, b, n)


# --------------------------------------------------------------------------------------------------------------------
# probe


def test_probe(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, signal(48000 + 7, 2, 48000), 48000, subtype="PCM_24")
    info = probe(p)
    assert (info.sample_rate, info.channels, info.frames, info.format, info.subtype) == \
        (48000, 2, 48007, "WAV", "PCM_24")
    assert info.duration_s == pytest.approx(48007 / 48000)


def test_probe_errors(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 20)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2), np.float32), 44100)
    zero_bytes = tmp_path / "zero.flac"
    zero_bytes.write_bytes(b"")
    for p, what in [(junk, "not a readable"), (text, "not a readable"), (empty, "no audio frames"),
                    (zero_bytes, "not a readable"), (tmp_path / "missing.wav", "no such file"), (tmp_path, "not a")]:
        with pytest.raises(AudioError, match=what):
            probe(p)
    assert issubclass(AudioError, ValueError)
    with pytest.raises(AudioError):
        AudioReader(junk, 44100)


# --------------------------------------------------------------------------------------------------------------------
# windowed reads


@pytest.mark.parametrize("sr,fmt,frames", [(48000, "wav", 81613), (48000, "flac", 30000), (22050, "flac", 37498),
                                           (44100, "wav", 20001)])
def test_windowed_reads_equal_whole_file_resampling(tmp_path, sr, fmt, frames):
    """48000 * 30000 frames -> 27562.5 model samples: the exact-half case at the end."""
    p = tmp_path / f"x.{fmt}"
    sf.write(p, signal(frames, 2, sr), sr, subtype="PCM_24")
    whole = whole_reference(p)
    with AudioReader(p, 44100) as r:
        assert r.seekable
        assert r.length == whole.shape[1]
        rng = np.random.default_rng(1)
        starts = [0, 1, 146, 147, r.length - 500, r.length - 1] + list(rng.integers(0, r.length, 12))
        for s in starts:
            for n in (1, 333, 5000):
                got = r.read(s, s + n)
                ref = np.zeros((2, n), np.float32)
                ref[:, :max(0, min(n, r.length - s))] = whole[:, s:s + n]
                assert got.shape == (2, n) and got.dtype == np.float32
                assert sdr(ref, got) >= 100 or np.array_equal(ref, got)
        # zeros outside the track
        out = r.read(-100, 50)
        assert np.all(out[:, :100] == 0) and np.array_equal(out[:, 100:], whole[:, :50])
        assert np.all(r.read(r.length + 10, r.length + 20) == 0)
        assert sdr(whole, r.read_all()) >= 100


def test_mono_is_duplicated_and_stats_stream(tmp_path):
    p = tmp_path / "mono.wav"
    sf.write(p, signal(30000, 1, 48000)[:, 0], 48000, subtype="FLOAT")
    with AudioReader(p, 44100) as r:
        x = r.read_all()
        assert x.shape == (2, resampled_length(30000, 48000, 44100))
        np.testing.assert_array_equal(x[0], x[1])
        assert sdr(whole_reference(p), x) >= 100
        stats = mix_stats(r, block_samples=4097)
    whole = MixStats.of(x)
    assert stats.count == whole.count
    assert stats.mean == pytest.approx(whole.mean, rel=1e-6, abs=1e-9)
    assert stats.std == pytest.approx(whole.std, rel=1e-6)


def test_more_channels_than_the_model(tmp_path):
    p = tmp_path / "surround.wav"
    data = signal(20000, 4, 44100)
    sf.write(p, data, 44100, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(p, 44100, 2), data[:, :2].T)   # first channels, as upstream
    np.testing.assert_allclose(read_audio(p, 44100, 1), data.mean(1, keepdims=True).T, atol=1e-7)


@pytest.mark.parametrize("ext,fmt,subtype", [("mp3", "MP3", "MPEG_LAYER_III"), ("ogg", "OGG", "VORBIS")])
def test_lossy_formats_read_sequentially(tmp_path, ext, fmt, subtype):
    p = tmp_path / f"x.{ext}"
    sf.write(p, signal(48000, 2, 48000), 48000, format=fmt, subtype=subtype)
    whole = whole_reference(p)
    with AudioReader(p, 44100, history=4000) as r:
        assert not r.seekable and r.length == whole.shape[1]
        for s in [0, 3000, 2500, 9000, 20000, r.length - 1000]:  # forward, one small step back
            assert sdr(whole[:, s:s + 4000], r.read(s, min(s + 4000, r.length))) >= 100
        assert r.restarts == 0
        assert sdr(whole[:, 100:600], r.read(100, 600)) >= 100  # far back: restart, still right
        assert r.restarts == 1


# --------------------------------------------------------------------------------------------------------------------
# writing


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_streaming_writer_equals_whole_array_resampling(tmp_path):
    stem = signal(44100 + 555, 2, 44100, seed=3).T * 0.5
    out = tmp_path / "s.wav"
    with StemWriter(out, in_rate=44100, out_rate=48000, fmt="wav", subtype="FLOAT", clip="none") as w:
        for s in range(0, stem.shape[1], 7777):
            w.write(stem[:, s:s + 7777])
    data, sr = sf.read(out, dtype="float32", always_2d=True)
    ref = soxr.resample(np.ascontiguousarray(stem.T), 44100, 48000, quality="VHQ")
    assert sr == 48000 and data.shape == ref.shape
    np.testing.assert_array_equal(data, np.clip(ref, -1, 1))
    assert _no_temp_files(tmp_path)


def test_frames_and_mono_output(tmp_path):
    stem = signal(10000, 2, 44100).T
    out = write_stem(tmp_path / "m.flac", stem, in_rate=44100, out_rate=22050, out_channels=1, frames=5003,
                     fmt="flac", subtype="PCM_24", clip="none")
    info = sf.info(out)
    assert (info.channels, info.frames, info.samplerate, info.subtype) == (1, 5003, 22050, "PCM_24")
    data, _ = sf.read(out, dtype="float32")
    ref = soxr.resample(stem.mean(0), 44100, 22050, quality="VHQ")
    assert sdr(ref[:5000], data[:5000]) > 100  # 24-bit quantisation: ~140 dB
    assert np.all(data[ref.shape[0]:] == 0)  # padded to the requested frame count


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_subtypes_and_upstream_quantisation(tmp_path, subtype):
    x = np.array([[0.5, -0.5, 0.123456, -0.99999, 1.0, -1.0, 0.0, 1.5e-5]], np.float32)
    out = write_stem(tmp_path / "q.wav", x, in_rate=44100, subtype=subtype, clip="none")
    assert sf.info(out).subtype == subtype
    if subtype == "PCM_16":
        got = sf.read(out, dtype="int16")[0]
        np.testing.assert_array_equal(got, (x[0] * 32767).astype(np.int16))  # upstream i16_pcm: truncation
    elif subtype == "PCM_24":
        got = sf.read(out, dtype="int32")[0] >> 8
        np.testing.assert_array_equal(got, (x[0] * (2 ** 23 - 1)).astype(np.int32))
    else:
        np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], x[0])
    with pytest.raises(ValueError):
        StemWriter(tmp_path / "f.flac", in_rate=44100, fmt="flac", subtype="FLOAT")
    with pytest.raises(ValueError):
        StemWriter(tmp_path / "f.wma", in_rate=44100, fmt="wma")


def test_clip_modes(tmp_path):
    x = np.array([[0.2, 1.6, -2.0, 0.5]] * 2, np.float32)
    got = {}
    for mode in ["rescale", "clamp", "tanh", "none"]:
        with StemWriter(tmp_path / f"{mode}.wav", in_rate=44100, subtype="FLOAT", clip=mode) as w:
            w.write(x[:, :2])   # the peak arrives in the second block: rescale must still use it
            w.write(x[:, 2:])
        got[mode] = sf.read(tmp_path / f"{mode}.wav", dtype="float32", always_2d=True)[0][:, 0]
    np.testing.assert_allclose(got["rescale"], x[0] / np.float32(1.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(got["clamp"], np.clip(x[0], -0.99, 0.99))
    np.testing.assert_allclose(got["tanh"], np.tanh(x[0]), rtol=1e-6)
    np.testing.assert_allclose(got["none"], np.clip(x[0], -1, 1))  # the encoder clamps, as upstream's
    # no rescale below full scale
    write_stem(tmp_path / "quiet.wav", x * 0.1, in_rate=44100, subtype="FLOAT")
    np.testing.assert_array_equal(sf.read(tmp_path / "quiet.wav", dtype="float32", always_2d=True)[0], (x * 0.1).T)
    assert _no_temp_files(tmp_path)


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "stem.wav"
    for clip in ["rescale", "clamp"]:
        w = StemWriter(out, in_rate=44100, out_rate=48000, clip=clip)
        w.write(np.zeros((2, 1000), np.float32))
        assert not out.exists()  # nothing at the final name before close
        assert any(p.name.startswith(".stem.wav.") for p in tmp_path.iterdir())
        w.abort()
        assert not out.exists() and _no_temp_files(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with StemWriter(out, in_rate=44100) as w:
            w.write(np.ones((2, 100), np.float32) * 0.1)
            raise RuntimeError("boom")
    assert not out.exists() and _no_temp_files(tmp_path)
    # replacing an existing file is atomic too: the old one stays until the new one is complete
    write_stem(out, np.full((2, 10), 0.25, np.float32), in_rate=44100, subtype="FLOAT")
    w = StemWriter(out, in_rate=44100, subtype="FLOAT")
    w.write(np.full((2, 10), 0.5, np.float32))
    assert sf.read(out, dtype="float32")[0][0, 0] == 0.25
    w.close()
    assert sf.read(out, dtype="float32")[0][0, 0] == pytest.approx(0.5 / 1.0)
    assert _no_temp_files(tmp_path)


def test_non_finite_input_is_refused(tmp_path):
    from ripper_dist.audio import NonFiniteAudioError
    x = np.random.default_rng(0).standard_normal((44100, 2)).astype(np.float32) * 0.1
    x[22050, 1] = np.nan
    sf.write(tmp_path / "nan.wav", x, 44100, subtype="FLOAT")
    with AudioReader(tmp_path / "nan.wav", 44100) as r:
        r.read(0, 20000)  # before the bad sample: fine
        with pytest.raises(NonFiniteAudioError, match=r"NaN or Inf samples in the input \(first at 0.500 s\)"):
            r.read(0, 44100)
    with AudioReader(tmp_path / "nan.wav", 48000) as r:  # through the resampler too
        with pytest.raises(NonFiniteAudioError):
            r.read_all()


def test_long_wav_stems_are_rf64(tmp_path, monkeypatch):
    """A plain WAV ends at 4 GiB: a stem that would not fit is written as RF64 (libsndfile reads it back)."""
    from ripper_dist import audio
    from ripper_dist.audio import StemWriter, wav_container
    four_hours = 4 * 3600 * 44100
    assert wav_container(four_hours, 2, "FLOAT") == "RF64"        # 4.26e9 bytes
    assert wav_container(four_hours, 2, "PCM_16") == "WAV"        # 2.1e9 bytes
    assert wav_container(four_hours, 2, "PCM_24") == "WAV"        # 3.2e9 bytes
    assert wav_container(6 * 3600 * 44100, 2, "PCM_24") == "RF64"  # 4.8e9 bytes
    assert wav_container(3 * 3600 * 8000, 1, "FLOAT") == "WAV"    # 3 hours at 8 kHz mono: 346 MB
    limit = audio.WAV_MAX_DATA_BYTES
    frames = limit // 8  # stereo float: exactly at the limit, then one frame over
    assert wav_container(frames, 2, "FLOAT") == "WAV" and wav_container(frames + 1, 2, "FLOAT") == "RF64"
    monkeypatch.setattr(audio, "WAV_MAX_DATA_BYTES", 1000)  # the same path with a small file
    y = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 4000)).astype(np.float32)
    for clip in ("rescale", "none"):
        with StemWriter(tmp_path / f"{clip}.wav", in_rate=44100, frames=4000, subtype="FLOAT", clip=clip) as w:
            w.write(y)
        info = sf.info(tmp_path / f"{clip}.wav")
        assert (info.format, info.frames) == ("RF64", 4000)
        assert np.array_equal(sf.read(tmp_path / f"{clip}.wav", dtype="float32")[0].T, y)
    with StemWriter(tmp_path / "short.wav", in_rate=44100, frames=100, subtype="FLOAT") as w:
        w.write(y[:, :100])
    assert sf.info(tmp_path / "short.wav").format == "WAV"
