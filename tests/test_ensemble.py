"""Ensembles: a model with itself is the model, avg_wave is the mean of the members, any span split gives the same
bits; then the CLI end to end with two exported models, local and Ray, followed by `--evaluate`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_dist.audio import AudioReader
from ripper_dist import ensemble
from ripper_dist.cli import main
from ripper_dist.ensemble import ALGORITHMS, EnsembleFamily, combine_fft, reduce
from ripper_dist.families import DemucsFamily
from ripper_dist.options import SeparateOptions
from ripper_dist.span_work import plan_track, run_span
from test_engine import SOURCES, make_bag, write_input
from upstream import sdr_db


class Collect:
    def __init__(self):
        self.blocks = []

    def write(self, block):
        self.blocks.append(block)

    @property
    def data(self):
        return np.concatenate(self.blocks, axis=-1)


def _members(*weights, **opts):
    """Demucs families over numpy runners (different models by their bag weights) and the flat runner list."""
    fams, runners = [], []
    for w in weights:
        bag = make_bag(2, w)
        fams.append(DemucsFamily(bag, SeparateOptions(**opts)))
        runners += bag.runners
    return fams, runners


def _separate(family, runners, path, spans=1):
    with AudioReader(path, family.sample_rate, family.channels) as reader:
        plan = plan_track(family, reader, spans)
        out = Collect()
        for k in range(len(plan.spans)):
            run_span(family, runners, reader, plan, k, 2, out)
    return out.data, plan


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    path = tmp_path_factory.mktemp("ens") / "song.wav"
    write_input(path, 44100, 2, seconds=0.9, subtype="FLOAT")
    return path


W_A, W_B = [[1, 1, 1, 1], [0, 1, 0, 1]], [[1, 0, 1, 0], [1, 1, 1, 1]]


def test_self_ensemble_is_the_model_and_avg_wave_is_the_mean(song):
    (a, b), runners = _members(W_A, W_B)
    alone_a, _ = _separate(a, runners[:2], song)
    alone_b, _ = _separate(b, runners[2:], song)
    assert sdr_db(alone_a, alone_b) < 40  # two different models
    (a1, a2), twice = _members(W_A, W_A)
    for algo in ALGORITHMS:
        same, _ = _separate(EnsembleFamily([a1, a2], [2, 2], algo), twice, song)
        if algo.endswith("_wave"):
            np.testing.assert_array_equal(same, alone_a, err_msg=algo)
        else:  # through an STFT and back
            assert sdr_db(alone_a, same) > 100, algo
    avg, _ = _separate(EnsembleFamily([a, b], [2, 2], "avg_wave"), runners, song)
    np.testing.assert_allclose(avg, (alone_a + alone_b) / 2, atol=1e-6)
    weighted, _ = _separate(EnsembleFamily([a, b], [2, 2], "avg_wave", [3, 1]), runners, song)
    np.testing.assert_allclose(weighted, 0.75 * alone_a + 0.25 * alone_b, atol=1e-6)
    both = np.stack([alone_a, alone_b])
    mx, _ = _separate(EnsembleFamily([a, b], [2, 2], "max_wave"), runners, song)
    np.testing.assert_array_equal(np.abs(mx), np.abs(both).max(0))


def test_span_splits_give_the_same_bits(song, monkeypatch):
    (a, b), runners = _members(W_A, W_B)
    for algo in ("median_wave", "avg_fft", "min_fft"):
        fam = EnsembleFamily([a, b], [2, 2], algo, [1, 2] if algo == "avg_fft" else None)
        whole, _ = _separate(fam, runners, song, spans=1)
        split, plan = _separate(fam, runners, song, spans=3)
        assert len(plan.spans) == 3 and whole.shape == split.shape == (4, 2, plan.length)
        np.testing.assert_array_equal(whole, split, err_msg=algo)
        with monkeypatch.context() as m:  # long spans are combined in pieces: also the same bits
            m.setattr(ensemble, "PIECE_S", 0.13)
            pieces, _ = _separate(fam, runners, song, spans=1)
        np.testing.assert_array_equal(whole, pieces, err_msg=algo)


def test_fft_reductions_per_bin():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)) + 1j * rng.standard_normal((3, 5))
    mag = np.abs(x)
    np.testing.assert_array_equal(reduce(x, "min_fft"), x[mag.argmin(0), np.arange(5)])
    np.testing.assert_array_equal(reduce(x, "max_fft"), x[mag.argmax(0), np.arange(5)])
    np.testing.assert_allclose(reduce(x, "avg_fft", [1, 1, 2]), (x[0] + x[1] + 2 * x[2]) / 4)
    np.testing.assert_allclose(reduce(x, "median_fft"), np.median(x.real, 0) + 1j * np.median(x.imag, 0))
    # one member through STFT/ISTFT is the identity (frames at fixed track positions, zeros outside)
    sig = rng.standard_normal((1, 1, 2, 5000)).astype(np.float32)
    out = combine_fft(sig, 0, (0, 5000), 5000, "avg_fft", None)
    np.testing.assert_allclose(out, sig[0], atol=1e-5)


def test_members_must_agree():
    (a,), _ = _members(W_A)
    (b,), _ = _members(W_B, stems="vocals")
    with pytest.raises(ValueError, match="--stems or --two-stems"):
        EnsembleFamily([a, b], [2, 2], "avg_wave")
    with pytest.raises(ValueError, match="--ensemble"):
        EnsembleFamily([a, a], [2, 2], "mean")
    with pytest.raises(ValueError, match="--ensemble-weights"):
        SeparateOptions(model="a,b", ensemble_weights="1,2,3")
    with pytest.raises(ValueError, match="--ensemble"):
        SeparateOptions(model="a,b", ensemble="best_wave")
    assert SeparateOptions(model="a, b", ensemble_weights="2,1").ensemble_weights == (2.0, 1.0)


# -- end to end: two exported models, the CLI, local and Ray, then --evaluate ----------------------------------------
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from ripper_export.random_demucs import make_bag_repo
    from upstream import write_tone
    root = tmp_path_factory.mktemp("ens_cli")
    repo = root / "repo"
    make_bag_repo(repo, "ta", 1, seed=0)
    make_bag_repo(repo, "tb", 1, seed=7)
    for i in range(2):
        write_tone(root / "in" / f"song{i}.wav", 1.4, seed=i)
    return root, repo


def _cli(out, *args):
    return main(["separate", str(out.parent.parent / "in"), "--no-progress", "-o", str(out), "--subtype", "FLOAT",
                 "--clip-mode", "none", *map(str, args)])


def _stems(out):
    df = pd.read_parquet(out / "metadata.parquet")
    assert (df.status == "done").all()
    return {(r.track, s): sf.read(out / p, dtype="float32")[0] for r in df.itertuples() for s, p in r.stem_paths}


def test_cli_ensemble_local_and_ray_then_evaluate(cli_setup, monkeypatch, capsys):
    root, repo = cli_setup
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(root / "cache"))
    assert _cli(root / "o" / "a", "--repo", repo, "-n", "ta", "--engine", "local") == 0
    assert _cli(root / "o" / "b", "--repo", repo, "-n", "tb", "--engine", "local") == 0
    assert _cli(root / "o" / "avg", "--repo", repo, "-n", "ta,tb", "--engine", "local") == 0
    alone_a, alone_b, avg = _stems(root / "o" / "a"), _stems(root / "o" / "b"), _stems(root / "o" / "avg")
    assert set(avg) == set(alone_a) and len(avg) == 8
    for k in avg:
        np.testing.assert_allclose(avg[k], (alone_a[k] + alone_b[k]) / 2, atol=2e-6)
    assert pd.read_parquet(root / "o" / "avg" / "metadata.parquet").model.iloc[0] == "ta+tb"
    # spectral ensemble: the Ray job (tracks cut into spans over two actors) gives the local engine's bytes
    refs = root / "refs"  # ta's stems as references, so --evaluate has something to score
    for (track, stem), x in alone_a.items():
        (refs / track).mkdir(parents=True, exist_ok=True)
        sf.write(refs / track / f"{stem}.wav", x, 44100, subtype="FLOAT")
    args = ("--repo", repo, "-n", "ta,tb", "--ensemble", "max_fft", "--ensemble-weights", "1,1")
    assert _cli(root / "o" / "fft_local", *args, "--engine", "local") == 0
    capsys.readouterr()
    assert _cli(root / "o" / "fft_ray", *args, "--engine", "ray", "--num-cpus", "2", "--actors", "2",
                "--evaluate", refs) == 0
    local, ray_ = _stems(root / "o" / "fft_local"), _stems(root / "o" / "fft_ray")
    for k in local:
        np.testing.assert_array_equal(local[k], ray_[k], err_msg=str(k))
        assert sdr_db(avg[k], local[k]) < 60  # another algorithm, another output
    ev = pd.read_parquet(root / "o" / "fft_ray" / "evaluation.parquet")
    assert len(ev) == 8 and (ev.status == "done").all() and ev.model.eq("ta+tb").all()
    assert "sdr_track" in capsys.readouterr().err
