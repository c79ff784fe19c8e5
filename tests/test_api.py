"""`ripper_dist.Separator`: the README's example runs as written; both families; options checked, model loaded late."""
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_dist import Separator
from upstream import sdr_db, write_tone

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    from ripper_export.random_demucs import make_bag_repo
    make_bag_repo(tmp_path / "demo" / "models", "demo", 1, size="small")  # the quick start's demo, at a small size
    write_tone(tmp_path / "demo" / "tracks" / "short.wav", 1.6, seed=2)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "demo/stems/demo/short/vocals.wav" in printed and "'no_vocals': (2, " in printed
    assert printed.rstrip().endswith("1.6 of 1.6 s")  # update(progress=...): the callback's last call
    df = pd.read_parquet(tmp_path / "demo" / "stems" / "metadata.parquet")
    assert list(df.model) == ["demo"] and list(df.engine) == ["api"] and df.status[0] == "done"
    # the array path gives the file path's samples (the file is 16-bit and rescaled when it would clip)
    sep = Separator("demo", repo="demo/models", two_stems="vocals")
    x, rate = sf.read("demo/tracks/short.wav", dtype="float32", always_2d=True)
    stems = sep.separate_array(x.T, rate)
    for name, y in stems.items():
        written = sf.read(f"demo/stems/demo/short/{name}.wav", dtype="float32")[0].T
        assert y.shape == written.shape == x.T.shape
        assert sdr_db(y * dict(df.stem_gain[0])[name], written) > 40


def test_roformer_array_and_options_checked_before_loading(tmp_path):
    from ripper_export.random_roformer import make_roformer_checkpoint
    with pytest.raises(ValueError, match="--overlap"):
        Separator("htdemucs", overlap=1.5)
    lazy = Separator("htdemucs")  # nothing downloaded or exported until it is used
    assert lazy.options.model == "htdemucs" and not (tmp_path / "cache").exists()
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    sep = Separator("mel_band_roformer", config=config, checkpoint=ckpt)
    assert sep.stems == ["vocals", "other"]
    t = np.arange(int(0.7 * 48000)) / 48000
    mono = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1830 * t)).astype(np.float32)
    out = sep.separate_array(mono, 48000)  # mono at another rate: back at 48 kHz, mono, same length
    assert sorted(out) == ["other", "vocals"] and out["vocals"].shape == (1, mono.size)
    assert sdr_db(mono[None], out["vocals"] + out["other"]) > 40  # the complement is the mix minus the target
    with pytest.raises(ValueError, match="pass audio.T"):
        sep.separate_array(np.zeros((1000, 2), np.float32), 44100)
    assert os.listdir(tmp_path / "cache" / "onnx")  # exported once, cached


def test_progress_callback_reports_monotonic_seconds_ending_at_the_total(tmp_path):
    from ripper_export.random_roformer import make_roformer_checkpoint
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    calls = []
    sep = Separator("mel_band_roformer", config=config, checkpoint=ckpt, progress=lambda d, t: calls.append((d, t)))
    sep.separate_file(write_tone(tmp_path / "in" / "song.wav", 1.5, seed=1), tmp_path / "out")
    done, totals = [d for d, _ in calls], {t for _, t in calls}
    assert len(calls) > 3 and done == sorted(done) and done[0] == 0.0
    assert totals == {1.5} and calls[-1] == (1.5, 1.5)  # 66150 samples at 44.1 kHz, exactly
    calls.clear()
    sep.separate_array(np.zeros((2, 22050), np.float32), 44100)  # the array path reports too
    assert calls[-1] == (0.5, 0.5) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_update_keeps_the_sessions_unless_the_model_changes(tmp_path, monkeypatch):
    from ripper_dist.models import ModelBundle
    from ripper_export.random_roformer import make_roformer_checkpoint
    made = []
    runners = ModelBundle.runners
    monkeypatch.setattr(ModelBundle, "runners", lambda self, *a, **k: made.append(self.name) or runners(self, *a, **k))
    config, ckpt = make_roformer_checkpoint(tmp_path / "m", "mel_band_roformer", size="small")
    x = np.random.default_rng(0).standard_normal((2, 30000)).astype(np.float32) * 0.2
    calls = []
    sep = Separator("mel_band_roformer", config=config, checkpoint=ckpt, subtype="FLOAT")
    plain = sep.separate_array(x, 44100)
    sessions, key = sep._load()[2], sep._load()[4]
    assert sep.update(tta=True, stems="vocals", format="flac", subtype=None, clip_mode="clamp",
                      progress=lambda d, t: calls.append(d)) is sep
    out = sep.separate_array(x, 44100)
    assert sep._load()[2] is sessions and len(made) == 1  # no new session
    assert list(out) == ["vocals"] and sep.stems == ["vocals"] and calls and sep._load()[4] != key
    assert (sep.options.format, sep.options.subtype, sep.options.clip_mode) == ("flac", "PCM_16", "clamp")
    assert np.abs(out["vocals"] - plain["vocals"]).max() > 1e-4  # --tta did something
    fresh = Separator("mel_band_roformer", config=config, checkpoint=ckpt, tta=True, stems="vocals")
    assert np.array_equal(fresh.separate_array(x, 44100)["vocals"], out["vocals"])  # as if built with them
    made.clear()
    before = sep.options
    with pytest.raises(ValueError, match="--num-overlap"):  # the family's check, against the loaded model
        sep.update(num_overlap=10 ** 6)
    with pytest.raises(ValueError, match="--shifts"):  # the options' check
        sep.update(shifts=2)
    assert sep.options is before and sep._load()[2] is sessions and not made
    config2, ckpt2 = make_roformer_checkpoint(tmp_path / "m2", "mel_band_roformer", size="small", seed=1)
    sep.update(config=config2, checkpoint=ckpt2)  # another model: loaded again on next use
    other = sep.separate_array(x, 44100)
    assert sep._load()[2] is not sessions and len(made) == 1 and sep.options.tta
    assert np.abs(other["vocals"] - out["vocals"]).max() > 1e-4
