"""The single-process engine end to end with numpy runners (no torch, no ONNX)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from ripper_dist.audio import read_audio
from ripper_dist.engine import DemucsBag, separate_array, separate_file, separate_track

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


def sdr(ref, est):
    ref = np.asarray(ref, np.float64)
    est = np.asarray(est, np.float64)
    assert ref.shape == est.shape, (ref.shape, est.shape)
    return 10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - est) ** 2), 1e-30))


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


def test_separate_file_end_to_end(tmp_path):
    src = tmp_path / "in" / "song.wav"
    src.parent.mkdir()
    frames = write_input(src, 48000, 2, subtype="PCM_24")
    bag = make_bag(2, [[1, 1, 0, 0.5], [0, 1, 1, 1]])
    done = []
    res = separate_file(bag, src, tmp_path / "out", subtype="FLOAT", clip="none", shifts=1, seed=4, batch_size=3,
                        overlap=0.5, progress=done.append)
    assert set(res["stems"]) == set(SOURCES)
    assert (res["sample_rate"], res["channels"], res["frames"]) == (48000, 2, frames)
    assert res["duration_s"] == pytest.approx(frames / 48000)
    assert sum(done) == res["model_frames"]
    ref = expected_stems(make_bag(2, [[1, 1, 0, 0.5], [0, 1, 1, 1]]), src, 48000, frames, shifts=1, seed=4,
                         overlap=0.5)
    for s, p in res["stems"].items():
        assert p == str(tmp_path / "out" / "song" / f"{s}.wav")
        data, sr = sf.read(p, dtype="float32", always_2d=True)
        assert sr == 48000 and data.shape == (frames, 2)
        assert sdr(ref[s], data) >= 100, s
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_mono_input_gives_mono_stems_and_rescale(tmp_path):
    src = tmp_path / "mono.flac"
    frames = write_input(src, 44100, 1, seconds=0.3, subtype="PCM_16")
    res = separate_file(make_bag(), src, tmp_path, fmt="flac", subtype="PCM_24", filename="{stem}.{ext}")
    ref = expected_stems(make_bag(), src, 44100, frames, mono=True)
    for s, p in res["stems"].items():
        info = sf.info(p)
        assert (info.channels, info.frames, info.samplerate, info.format, info.subtype) == \
            (1, frames, 44100, "FLAC", "PCM_24")
        data, _ = sf.read(p, dtype="float32", always_2d=True)
        peak = np.abs(ref[s]).max()
        scaled = ref[s] / max(1.01 * peak, 1)  # default clip mode: rescale with the whole stem's peak
        assert np.abs(data).max() <= 1
        assert sdr(scaled, data) >= 90  # 24-bit quantisation


def test_stem_subset_skips_unneeded_models(tmp_path):
    src = tmp_path / "a.wav"
    write_input(src, 44100, 2)
    one_hot = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    bag = make_bag(4, one_hot)
    res = separate_file(bag, src, tmp_path / "sub", stems=["vocals"], subtype="FLOAT", clip="none")
    assert list(res["stems"]) == ["vocals"]
    assert [r.calls for r in bag.runners[:3]] == [0, 0, 0] and bag.runners[3].calls > 0
    full = separate_file(make_bag(4, one_hot), src, tmp_path / "full", subtype="FLOAT", clip="none")
    a = sf.read(res["stems"]["vocals"], dtype="float32")[0]
    b = sf.read(full["stems"]["vocals"], dtype="float32")[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown stem"):
        separate_file(bag, src, tmp_path, stems=["kazoo"])


def test_lossy_input_with_batches(tmp_path):
    src = tmp_path / "b.mp3"
    frames = write_input(src, 44100, 2, seconds=0.5, format="MP3", subtype="MPEG_LAYER_III")
    frames = sf.info(src).frames
    res = separate_file(make_bag(2), src, tmp_path, subtype="FLOAT", clip="none", batch_size=3, shifts=1, seed=1)
    ref = expected_stems(make_bag(2), src, 44100, frames, batch_size=1, shifts=1, seed=1)
    for s, p in res["stems"].items():
        assert sdr(ref[s], sf.read(p, dtype="float32", always_2d=True)[0]) >= 100


def test_failure_leaves_no_files(tmp_path):
    src = tmp_path / "c.wav"
    write_input(src, 44100, 2)
    bag = DemucsBag([NumpyRunner(fail=True)], None, CHUNK, SOURCES, 44100, 2)
    with pytest.raises(RuntimeError, match="exploded"):
        separate_file(bag, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*.*")) == []


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


class Unused:
    def __init__(self, chunk_samples=CHUNK):
        self.chunk_samples = chunk_samples

    def __call__(self, batch):
        raise AssertionError("an unneeded sub-model was run")


def test_separate_track_stem_map(tmp_path):
    """`--two-stems vocals` (vocals + no_vocals = sum of the others) and a lazy bag whose unneeded members are
    placeholders that must never run."""
    src = tmp_path / "t.wav"
    frames = write_input(src, 44100, 2)
    weights = [[1, 1, 1, 0], [0, 0, 0, 1]]
    bag = DemucsBag([NumpyRunner(0), NumpyRunner(1)], weights, CHUNK, SOURCES, 44100, 2)
    full = separate_array(bag, read_audio(src, 44100, 2))
    seen = []
    paths = separate_track(bag, src, {"vocals": tmp_path / "o" / "vocals.wav", "no_vocals": tmp_path / "o" / "nv.wav"},
                           stem_map={"vocals": [3], "no_vocals": [0, 1, 2]}, subtype="FLOAT", clip="none",
                           batch_size=2, progress=seen.append)
    assert sum(seen) == frames
    v = sf.read(paths["vocals"], dtype="float32")[0].T
    nv = sf.read(paths["no_vocals"], dtype="float32")[0].T
    assert sdr(np.clip(full[3], -1, 1), v) >= 100
    assert sdr(np.clip(full[:3].sum(0), -1, 1), nv) >= 100

    lazy = DemucsBag([Unused(), NumpyRunner(1)], weights, CHUNK, SOURCES, 44100, 2)
    paths = separate_track(lazy, src, {"vocals": tmp_path / "lazy.wav"}, subtype="FLOAT", clip="none")
    np.testing.assert_array_equal(sf.read(paths["vocals"], dtype="float32")[0].T, v)
