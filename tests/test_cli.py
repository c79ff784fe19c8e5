"""End to end through `ripper-dist separate --engine local`: stems equal upstream demucs on the same checkpoints."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_export.random_demucs import make_bag_repo
from ripper_dist.cli import main
from upstream import sdr_db, upstream_stems, write_tone

ONE_HOT = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(cache))


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    write_tone(d / "a" / "song.wav", 3.3 + 7 / 44100, seed=1)          # odd length, longer than 2 segments
    write_tone(d / "b" / "song.wav", 0.7, seed=2)                       # same name, shorter than one segment
    write_tone(d / "mono48.wav", 2.1, sr=48000, channels=1, seed=3)    # mono 48 kHz
    (d / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    return d


def _run(out: Path, *args) -> int:
    return main(["separate", "--engine", "local", "--no-progress", "-o", str(out), "--subtype", "FLOAT",
                 "--clip-mode", "none", *map(str, args)])


def _check_parity(out: Path, repo: Path, name: str, min_db: float = 60.0):
    df = pd.read_parquet(out / "metadata.parquet")
    worst = np.inf
    for row in df[df.status == "done"].itertuples():
        ref = upstream_stems(Path(row.input_path), repo=repo, name=name)
        stems = dict(row.stem_paths)
        assert set(stems) == set(ref)
        for s, rel in stems.items():
            got, sr = sf.read(out / rel, always_2d=True)
            assert sr == row.sample_rate and got.shape == ref[s].shape
            worst = min(worst, sdr_db(ref[s], got))
    assert worst >= min_db, worst
    return worst


def test_single_model_parity_metadata_and_failures(tmp_path, tracks):
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    out = tmp_path / "out"
    rc = _run(out, tracks, "--repo", repo, "-n", "tiny")
    assert rc == 1  # the corrupt file failed, the others finished
    df = pd.read_parquet(out / "metadata.parquet")
    assert len(df) == 4
    bad = df[df.input_path.str.endswith("corrupt.wav")].iloc[0]
    assert bad.status == "failed" and bad.error
    done = df[df.status == "done"]
    assert len(done) == 3 and done.track.nunique() == 3
    assert {c for c in ["input_path", "track", "status", "error", "model", "duration_s", "sample_rate", "channels",
                        "stem_paths"]} <= set(df.columns)
    mono = done[done.input_path.str.endswith("mono48.wav")].iloc[0]
    assert mono.sample_rate == 48000 and mono.channels == 1
    assert abs(mono.duration_s - 2.1) < 1e-3
    print("parity (dB):", _check_parity(out, repo, "tiny"))
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.f32"))


def test_bag_with_weights_and_stems(tmp_path, tracks):
    repo = make_bag_repo(tmp_path / "repo", "bag", 4, [[0.5, 0, 0, 1], [0.5, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]],
                         size="small")
    out = tmp_path / "out"
    assert _run(out, tracks / "a", "--repo", repo, "-n", "bag") == 0
    print("parity (dB):", _check_parity(out, repo, "bag"))
    out2 = tmp_path / "out2"
    assert _run(out2, tracks / "a", "--repo", repo, "-n", "bag", "--stems", "vocals") == 0
    df = pd.read_parquet(out2 / "metadata.parquet")
    assert [dict(s) for s in df.stem_paths] == [{"vocals": f"bag/{df.track[0]}/vocals.wav"}]
    a, _ = sf.read(out / "bag" / df.track[0] / "vocals.wav")
    b, _ = sf.read(out2 / "bag" / df.track[0] / "vocals.wav")
    assert np.array_equal(a, b)


def test_six_sources_and_two_stems(tmp_path, tracks):
    repo = make_bag_repo(tmp_path / "repo", "six", 1, size="small", sources=6)
    out = tmp_path / "out"
    assert _run(out, tracks / "mono48.wav", "--repo", repo, "-n", "six") == 0
    _check_parity(out, repo, "six")
    out2 = tmp_path / "out2"
    assert _run(out2, tracks / "mono48.wav", "--repo", repo, "-n", "six", "--two-stems", "vocals") == 0
    stems = {p.stem for p in (out2 / "six" / "mono48").iterdir()}
    assert stems == {"vocals", "no_vocals"}
    parts = [sf.read(out / "six" / "mono48" / f"{s}.wav")[0] for s in ["drums", "bass", "other", "guitar", "piano"]]
    no_vocals, _ = sf.read(out2 / "six" / "mono48" / "no_vocals.wav")
    assert sdr_db(sum(parts), no_vocals) > 100


def test_rerun_skips_and_force_redoes(tmp_path, tracks, capsys):
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    out = tmp_path / "out"
    _run(out, tracks / "a", "--repo", repo, "-n", "tiny")
    first = pd.read_parquet(out / "metadata.parquet").finished_at[0]
    capsys.readouterr()
    _run(out, tracks / "a", "--repo", repo, "-n", "tiny")
    assert "1 skipped" in capsys.readouterr().err
    assert pd.read_parquet(out / "metadata.parquet").finished_at[0] == first
    _run(out, tracks / "a", "--repo", repo, "-n", "tiny", "--overlap", "0.5")  # other options: redone
    assert pd.read_parquet(out / "metadata.parquet").finished_at[0] > first


def test_output_formats(tmp_path, tracks):
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    out = tmp_path / "out"
    assert main(["separate", "--engine", "local", "--no-progress", "-o", str(out), "--repo", str(repo), "-n", "tiny",
                 "--flac", "--int24", str(tracks / "b")]) == 0
    info = sf.info(next((out).rglob("vocals.flac")))
    assert info.format == "FLAC" and info.subtype == "PCM_24"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_refused_and_never_runs(tmp_path, tracks, capsys):
    import torch
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.th"
    torch.save({"klass": None, "args": (), "kwargs": {}, "state": {}, "training_args": _Payload(marker)}, evil)
    rc = main(["separate", "--engine", "local", "--no-progress", "-o", str(tmp_path / "out"), "--checkpoint",
               str(evil), str(tracks / "b")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "system" in err, err  # names the global it found
    assert not marker.exists()


def test_batch_size_flag(capsys):
    from ripper_dist.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["separate", "x.wav"]).batch_size == "auto"
    assert parse(["separate", "--batch-size", "4", "x.wav"]).batch_size == 4
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            parse(["separate", "--batch-size", bad, "x.wav"])
    assert "positive number of chunks or auto" in capsys.readouterr().err


def test_fp16_precision_end_to_end(tmp_path, tracks):
    """`--precision fp16` separates through the fp16 graph (stems close to fp32's), and a rerun at the other
    precision redoes the tracks instead of resuming them."""
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    track = tracks / "a" / "song.wav"
    assert _run(tmp_path / "fp32", "--repo", repo, "-n", "tiny", track) == 0
    assert _run(tmp_path / "fp16", "--repo", repo, "-n", "tiny", "--precision", "fp16", track) == 0
    for stem in ["drums", "bass", "other", "vocals"]:
        a = sf.read(tmp_path / "fp32" / "tiny" / "song" / f"{stem}.wav")[0]
        b = sf.read(tmp_path / "fp16" / "tiny" / "song" / f"{stem}.wav")[0]
        assert 40 <= sdr_db(a, b) < 200  # close, and not the fp32 graph again
    assert _run(tmp_path / "fp32", "--repo", repo, "-n", "tiny", "--precision", "fp16", track) == 0
    df = pd.read_parquet(tmp_path / "fp32" / "metadata.parquet")
    assert len(df) == 1 and df.status[0] == "done"
    assert df.options_key[0] == pd.read_parquet(tmp_path / "fp16" / "metadata.parquet").options_key[0]


def test_export_command_prints_its_checks_and_copies(tmp_path, capsys):
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    assert main(["export", "--repo", str(repo), "-n", "tiny", "--precision", "fp16", "-o", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "model-fp16.onnx" in out and "dB from upstream torch" in out and "fp16:" in out and "dB from fp32" in out
    copied = list((tmp_path / "g").glob("*.onnx"))
    assert len(copied) == 1 and copied[0].name.endswith("-fp16.onnx") and copied[0].stat().st_size > 0
