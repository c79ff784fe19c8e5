"""A newcomer's command line, run as a user runs it (a subprocess): mistakes fail fast in one line, nothing of one
model's is overwritten by another's, the formats demucs and audio-separator users expect, what metadata.parquet
records, and no noise from Ray."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from ripper_export.random_demucs import make_bag_repo
from upstream import write_tone

NO_TORCH = "import sys; sys.modules['torch'] = sys.modules['demucs'] = None; from ripper_dist.cli import main; " \
           "sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    repo = make_bag_repo(root / "repo", "tiny", 1, size="small")
    sig = yaml.safe_load((repo / "tiny.yaml").read_text())["models"][0]
    (repo / "twin.yaml").write_text(yaml.safe_dump({"models": [sig]}))  # another model name, the same checkpoint
    track = write_tone(root / "in" / "song.wav", 1.3, seed=3)
    write_tone(root / "two" / "a.wav", 1.1, seed=4)
    write_tone(root / "two" / "b.wav", 0.9, sr=48000, channels=1, seed=5)
    for name in ("x.pdf", "y.pdf", "notes.txt"):  # no audio extension (.m4a and the like are read by FFmpeg)
        (root / "docs" / name).parent.mkdir(exist_ok=True)
        (root / "docs" / name).write_bytes(b"not audio")
    return SimpleNamespace(root=root, repo=repo, track=track, cache=root / "cache",
                           checkpoint=next(repo.glob(f"{sig}-*.th")))


def run(env, *args, cache=None, code=None, extra_env=None):
    """The command as a user types it; returns (exit code, stdout, stderr)."""
    environ = {**os.environ, "RIPPER_DIST_CACHE": str(cache or env.cache), **(extra_env or {})}
    environ.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "ripper_dist.cli"]), *map(str, args)]
    old = os.umask(0o022)  # a usual user's umask: files must come out 0644, not 0600
    try:
        p = subprocess.run(cmd, env=environ, cwd=env.root, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ripper-dist: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


MISTAKES = [  # (arguments after INPUT, what the one line must name)
    (["--overlap", "1.5"], ["--overlap", "1.5"]),
    (["--shifts", "-1"], ["--shifts"]),
    (["-n", "htdemucs", "--segment", "100"], ["--segment: 100 s", "7.8 s"]),
    (["-n", "htdemucs", "--two-stems", "guitar"], ["--two-stems", "guitar"]),
    (["--bitrate", "128"], ["--bitrate", "mp3"]),
    (["--mp3", "--bitrate", "999"], ["--bitrate", "999"]),
    (["--sample-rate", "100"], ["--sample-rate"]),
    (["--filename", "{track}.{ext}"], ["--filename", "{stem}"]),
    (["--filename", "{track}/{stem}.{codec}"], ["--filename", "codec"]),
    (["--other-method", "minus"], ["--other-method", "--two-stems"]),
    (["--onnx", "missing.onnx"], ["--onnx", "missing.onnx"]),
    (["-n", "htdemucs_9s"], ["-n: unknown model", "htdemucs_9s"]),
    (["--repo", "repo", "-n", "tiny", "-o", "in/song.wav"], ["-o", "not a folder"]),
    (["--repo", "repo", "-n", "tiny", "-o", "in/song.wav/sub"], ["-o", "is a file"]),
]


@pytest.mark.parametrize("args,needles", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_mistakes_fail_before_any_model_in_one_line(env, tmp_path, args, needles):
    rc, _, err = run(env, "separate", "in/song.wav", *args, cache=tmp_path / "cache")
    one_line_error(rc, err, *needles)
    assert not (tmp_path / "cache").exists()  # nothing downloaded or exported
    assert not (env.root / "separated").exists()  # no output folder, no metadata.parquet


def test_bad_inputs_and_unreachable_download_and_no_torch(env, tmp_path):
    rc, _, err = run(env, "separate", "nope.wav", "--repo", "repo", "-n", "tiny", cache=tmp_path / "c1")
    one_line_error(rc, err, "nope.wav", "no such file")
    rc, _, err = run(env, "separate", "docs", "--repo", "repo", "-n", "tiny", cache=tmp_path / "c1")
    one_line_error(rc, err, "no supported audio", "2 .pdf", "1 .txt")
    # released weights from a host that does not answer: one line, not urllib's traceback
    rc, _, err = run(env, "separate", "in/song.wav", "-n", "htdemucs", "-o", tmp_path / "o", cache=tmp_path / "c2",
                     extra_env={"RIPPER_DIST_MODEL_URL": "http://127.0.0.1:9/"})
    one_line_error(rc, err, "cannot download http://127.0.0.1:9/955717e8-8726e21a.th")
    # a runtime-only install (no torch) given a checkpoint that is not exported yet: which extra to install
    rc, _, err = run(env, "separate", "in/song.wav", "--repo", "repo", "-n", "tiny", "-o", tmp_path / "o",
                     cache=tmp_path / "c3", code=NO_TORCH)
    one_line_error(rc, err, "pip install 'ripper-dist[export]'", "--onnx")
    assert not (tmp_path / "o").exists()  # a job that fails its setup leaves no (empty) output folder behind


def test_layout_two_models_metadata_resume_and_onnx_without_torch(env):
    out = env.root / "out"
    rc, _, err = run(env, "separate", "in/song.wav", "--repo", "repo", "-n", "tiny", "-o", out, "--no-progress")
    assert rc == 0, err
    assert "exporting" in err and "first use" in err and "exported in" in err  # the first export says so
    assert re.search(r"x realtime on this process, \d+ (ort|openvino) threads?; model export/loading", err), err
    stems = ["drums", "bass", "other", "vocals"]
    assert sorted(p.name for p in (out / "tiny" / "song").iterdir()) == sorted(f"{s}.wav" for s in stems)
    before = {p: p.read_bytes() for p in (out / "tiny" / "song").iterdir()}
    rc, _, err = run(env, "separate", "in/song.wav", "--repo", "repo", "-n", "twin", "-o", out, "--no-progress")
    assert rc == 0, err
    assert "exporting" not in err  # same checkpoint: the cached graph
    assert sorted(p.name for p in (out / "twin" / "song").iterdir()) == sorted(f"{s}.wav" for s in stems)
    assert {p: p.read_bytes() for p in (out / "tiny" / "song").iterdir()} == before  # never overwritten
    rc, _, err = run(env, "separate", "in/song.wav", "--repo", "repo", "-n", "tiny", "-o", out, "--no-progress")
    assert rc == 0 and "1 skipped" in err, err
    assert "nothing separated" in err and "x realtime" not in err, err  # no 0.00x for a rerun with all done

    df = pd.read_parquet(out / "metadata.parquet")
    assert sorted(df.model) == ["tiny", "twin"] and (df.status == "done").all()
    row = df[df.model == "tiny"].iloc[0]
    from ripper_dist import __version__
    assert row.ripper_dist_version == __version__
    assert list(row.checkpoint_sha256) == [hashlib.sha256(env.checkpoint.read_bytes()).hexdigest()]
    assert row.parity_sdr_db >= 60
    assert (row.shifts, row.overlap, row.clip_mode, row.precision, row.device) == (0, 0.25, "rescale", "fp32", "cpu")
    assert abs(row.segment_s - 1.0) < 0.2 and list(row.stems) == stems
    assert (row.out_sample_rate, row.out_channels) == (44100, 2)
    peaks, gains = dict(row.stem_peak_dbfs), dict(row.stem_gain)
    assert sorted(peaks) == sorted(stems) and all(np.isfinite(v) for v in peaks.values())
    for s in stems:  # rescale divides by 1.01 x the peak when a stem would clip, else leaves it
        assert gains[s] == pytest.approx(min(1.0, 1 / (1.01 * 10 ** (peaks[s] / 20))), rel=1e-3)
    assert row.separate_s == pytest.approx(row.elapsed_s) and row.separate_s > 0 and row.compute_s > 0
    assert row.load_s > 0
    for p in (out / "metadata.parquet", out / "tiny" / "song" / "vocals.wav", *env.cache.rglob("model.onnx")):
        assert p.stat().st_mode & 0o777 == 0o644, p  # readable by the other users of a shared disk

    # an exported graph separates on an install without torch, without the checkpoint
    rc, so, err = run(env, "export", "--repo", "repo", "-n", "tiny", "-o", env.root / "graphs")
    assert rc == 0 and "graphs/tiny.onnx" in so, err
    rc, _, err = run(env, "separate", "in/song.wav", "--onnx", "graphs/tiny.onnx", "-o", out, "--no-progress",
                     cache=env.root / "empty-cache", code=NO_TORCH)
    assert rc == 0, err
    a = sf.read(out / "tiny" / "song" / "vocals.wav")[0]
    assert a.shape == sf.read(env.track)[0].shape

    rc, so, _ = run(env, "models")
    assert rc == 0 and "htdemucs" in so and "8.80 dB" in so and "parity" in so and "htdemucs " in so


@pytest.mark.parametrize("fmt,extra", [
    ("mp3", ["--mp3", "--mp3-bitrate", "128", "--sample-rate", "22050"]),
    ("ogg", ["--format", "ogg"]),
    ("opus", ["--format", "opus"]),
    ("m4a", ["--format", "m4a", "--bitrate", "96"]),
])
def test_output_formats_templates_and_other_method(env, tmp_path, fmt, extra):
    out = tmp_path / "o"
    rc, _, err = run(env, "separate", "in/song.wav", "--repo", "repo", "-n", "tiny", "-o", out, "--no-progress",
                     "--two-stems", "vocals", "--other-method", "minus", "--filename",
                     "{model}/{track}.{trackext}/{stem}.{ext}", *extra)
    assert rc == 0, err
    folder = out / "tiny" / "song.wav"
    assert sorted(p.name for p in folder.iterdir()) == [f"no_vocals.{fmt}", f"vocals.{fmt}"]
    row = pd.read_parquet(out / "metadata.parquet").iloc[0]
    assert row.format == fmt and row.other_method == "minus" and row.two_stems == "vocals"
    seconds = sf.info(env.track).duration
    path = folder / f"vocals.{fmt}"
    if fmt == "m4a":
        import av
        with av.open(str(path)) as c:
            stream = c.streams.audio[0]
            assert stream.codec_context.name == "aac" and stream.rate == 44100
            decoded = sum(f.samples for f in c.decode(audio=0))
        assert abs(decoded - seconds * 44100) < 4096  # AAC adds its priming frames
        rate = 44100
    else:
        info = sf.info(path)
        rate = {"mp3": 22050, "opus": 48000}.get(fmt, 44100)
        assert info.samplerate == rate and info.subtype == {"mp3": "MPEG_LAYER_III", "ogg": "VORBIS",
                                                            "opus": "OPUS"}[fmt]
        assert abs(info.frames - seconds * rate) < 0.02 * rate
    assert row.out_sample_rate == rate
    if fmt in ("mp3", "m4a"):
        kbps = path.stat().st_size * 8 / seconds / 1000
        assert 0.6 * row.bitrate_kbps < kbps < 1.6 * row.bitrate_kbps, kbps


def test_help_and_ray_noise(env, tmp_path):
    rc, so, _ = run(env, "--help")
    assert rc == 0 and "examples:" in so and "bench" not in so
    rc, so, _ = run(env, "separate", "--help")
    assert rc == 0 and "examples:" in so and "--filename" in so and "--other-method" in so and "-j N, --jobs" in so
    out = tmp_path / "o"
    rc, _, err = run(env, "separate", "two", "--repo", "repo", "-n", "tiny", "-o", out, "--engine", "ray",
                     "--num-cpus", "2", "--no-progress")
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("2 done, 0 failed") and lines[1].startswith("stems in"), err
    assert (out / ".ripper-dist" / "ray.log").is_file()
    df = pd.read_parquet(out / "metadata.parquet")
    assert (df.engine == "ray").all() and (df.compute_s > 0).all() and (df.separate_s > 0).all()
    assert sorted(df.out_channels) == [1, 2] and sorted(df.out_sample_rate) == [44100, 48000]
