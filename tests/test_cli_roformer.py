"""RoFormer end to end through `ripper-dist separate`: stems equal the reference implementation (bs-roformer 0.3.10,
loading the same keys unchanged) run with MSST's chunking."""
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from ripper_dist.cli import main
from ripper_export.random_roformer import make_roformer_checkpoint
from ripper_export.roformer import read_checkpoint
from ripper_export.roformer_config import load_roformer_config
from ripper_export.roformer_export import build_reference
from test_msst_chunking import msst_loop
from upstream import sdr_db, write_tone


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))


def _reference(config, ckpt, family, mix):
    cfg = load_roformer_config(config)
    ref = build_reference(family, cfg.model, read_checkpoint(ckpt))

    def run(x):
        with torch.no_grad():
            return ref(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return cfg, msst_loop(mix, run, cfg.chunk_size, cfg.num_overlap, batch_size=1)


@pytest.mark.parametrize("family,num_stems,target", [("mel_band_roformer", 1, "vocals"),
                                                      ("bs_roformer", 2, None)])
def test_separate_matches_reference(tmp_path, family, num_stems, target):
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", family, size="small", num_stems=num_stems,
                                            target_instrument=target)
    track = write_tone(tmp_path / "in" / "song.wav", 1.7, seed=5)
    out = tmp_path / "out"
    rc = main(["separate", "--engine", "local", "--no-progress", "-n", family, "--config", str(config),
               "--checkpoint", str(ckpt), "--subtype", "FLOAT", "--clip-mode", "none", "-o", str(out), str(track)])
    assert rc == 0
    mix = sf.read(track, always_2d=True, dtype="float32")[0].T
    cfg, ref = _reference(config, ckpt, family, mix)
    row = pd.read_parquet(out / "metadata.parquet").iloc[0]
    stems = dict(row.stem_paths)
    expected = list(cfg.instruments) if not target else [target, next(i for i in cfg.instruments if i != target)]
    assert sorted(stems) == sorted(expected)
    for i, name in enumerate(expected):
        got = sf.read(out / stems[name], always_2d=True)[0].T
        want = ref[i] if i < ref.shape[0] else mix - ref[0]  # the complement: mix minus target
        assert sdr_db(want, got) >= 60, (name, sdr_db(want, got))


def test_missing_key_refused_with_clear_message(tmp_path, capsys):
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    state = torch.load(ckpt, weights_only=True)
    state.pop(sorted(state)[3])
    torch.save(state, ckpt)
    rc = main(["separate", "--engine", "local", "--no-progress", "-n", "mel_band_roformer", "--config", str(config),
               "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"),
               str(write_tone(tmp_path / "t.wav", 0.5))])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing" in err.lower() and sorted(state)[0].split(".")[0] in err


def test_config_sizes_checked_against_the_checkpoint_before_building(tmp_path, capsys):
    """A config that does not describe the checkpoint (depth 10000) fails at once with a short line, before the model
    it describes is allocated."""
    import time
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    text = config.read_text()
    depth = load_roformer_config(config).model["depth"]
    config.write_text(text.replace(f"depth: {depth}\n", "depth: 10000\n", 1))
    assert load_roformer_config(config).model["depth"] == 10000
    t0 = time.monotonic()
    rc = main(["separate", "--engine", "local", "--no-progress", "-n", "mel_band_roformer", "--config", str(config),
               "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"), str(write_tone(tmp_path / "t.wav", 0.5))])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 20
    assert "depth" in err and "10000" in err and f"({depth},)" in err and len(err) < 2000


def test_chain_roformer_vocals_then_demucs_on_the_rest(tmp_path):
    """Vocals from RoFormer, the instrumental split by Demucs, in one command."""
    from ripper_export.random_demucs import make_bag_repo
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    track = write_tone(tmp_path / "in" / "song.wav", 1.9, seed=7)
    out = tmp_path / "out"
    assert main(["separate", "--engine", "local", "--no-progress", "-n", "mel_band_roformer", "--config", str(config),
                 "--checkpoint", str(ckpt), "--then", "other=tiny", "--then-repo", str(repo), "--subtype", "FLOAT",
                 "-o", str(out), str(track)]) == 0
    first = out / ckpt.stem / "song"  # OUT/<model>/<track>/
    assert {p.name for p in first.iterdir()} == {"vocals.wav", "other.wav"}
    chained = out / f"{ckpt.stem}.other.tiny"
    df = pd.read_parquet(out / "metadata.parquet")  # one manifest for the output root, a row per (model, input)
    assert sorted(df.model) == sorted([ckpt.stem, f"{ckpt.stem}.other.tiny"])
    row = df[df.model == f"{ckpt.stem}.other.tiny"].iloc[0]
    assert row.status == "done" and row.track == "song" and row.input_path == str(first / "other.wav")
    assert sorted(dict(row.stem_paths)) == ["bass", "drums", "other", "vocals"]
    direct = tmp_path / "direct"
    assert main(["separate", "--engine", "local", "--no-progress", "--repo", str(repo), "-n", "tiny", "--subtype",
                 "FLOAT", "-o", str(direct), str(first / "other.wav")]) == 0
    for stem in ["drums", "vocals"]:
        a = sf.read(chained / "song" / f"{stem}.wav")[0]
        b = sf.read(direct / "tiny" / "other" / f"{stem}.wav")[0]
        assert np.array_equal(a, b)


def test_ray_job_equals_local_engine_with_spans(tmp_path):
    """Short tracks, a resampled mono one, and a long one cut into spans over both actors: the local engine's stems."""
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    inp = tmp_path / "in"
    write_tone(inp / "a.wav", 2.3, seed=1)
    write_tone(inp / "b.wav", 0.4, sr=48000, channels=1, seed=2)
    write_tone(inp / "long.wav", 36.1, seed=3)
    common = ["--no-progress", "-n", "mel_band_roformer", "--config", str(config), "--checkpoint", str(ckpt),
              "--subtype", "FLOAT", "--clip-mode", "none", str(inp)]
    assert main(["separate", "--engine", "local", "-o", str(tmp_path / "local"), *common]) == 0
    assert main(["separate", "--engine", "ray", "--num-cpus", "2", "-o", str(tmp_path / "ray"), *common]) == 0
    for track in ["a", "b", "long"]:
        for stem in ["vocals", "other"]:
            x = sf.read(tmp_path / "ray" / ckpt.stem / track / f"{stem}.wav")[0]
            y = sf.read(tmp_path / "local" / ckpt.stem / track / f"{stem}.wav")[0]
            assert x.shape == y.shape and sdr_db(y, x) >= 120
    rows = pd.read_parquet(tmp_path / "ray" / "metadata.parquet").set_index("track")
    assert len(rows.worker["long"].split(",")) == 2  # its spans ran on both actors


def test_demucs_options_are_refused_not_ignored(tmp_path, capsys):
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    track = write_tone(tmp_path / "in" / "song.wav", 0.5, seed=5)
    rc = main(["separate", "--no-progress", "-n", "mel_band_roformer", "--config", str(config), "--checkpoint",
               str(ckpt), "--shifts", "2", "--overlap", "0.5", "-o", str(tmp_path / "out"), str(track)])
    err = capsys.readouterr().err
    assert rc == 2 and "--shifts, --overlap: Demucs options" in err
    assert not (tmp_path / "out" / "metadata.parquet").exists()
