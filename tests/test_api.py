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
