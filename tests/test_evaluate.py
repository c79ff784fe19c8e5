"""`ripper-dist evaluate`: numbers equal museval called directly and the formulas; bad pairs are isolated; reruns
skip unchanged tracks; the Ray engine gives the same rows as the local one; any folder of stems (demucs' layout, a
copy without metadata.parquet) gives the numbers the metadata path gives; MSST's spectral scores match their
definitions; nothing to match is a one-line error."""
import os
import shutil
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_dist.cli import main
from ripper_dist.evaluate import (EVALUATION, METRICS, EvaluateOptions, _museval, bleed_full, l1_freq, mel_filters,
                                  run_evaluation)
from ripper_dist.manifest import Manifest

SR = 8000
STEMS = ("bass", "drums", "vocals")


def _music(rng, n):
    t = np.arange(n) / SR
    f = rng.uniform(80, 600)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    x = 0.3 * env * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(n)
    return np.stack([x, 0.8 * x + 0.02 * rng.standard_normal(n)], 1).astype(np.float32)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """References (MUSDB layout: test/<track>/{mixture,stems}.wav) and a fake separate job's OUT."""
    root = tmp_path_factory.mktemp("eval")
    refs, out = root / "musdb" / "test", root / "out"
    rng = np.random.default_rng(0)
    manifest = Manifest(out)
    estimates = {}
    for k, track in enumerate(("Artist - One", "Artist - Two", "Broken")):
        n = int(2.0 * SR)
        ref = {s: _music(rng, n) for s in STEMS}
        (refs / track).mkdir(parents=True)
        sf.write(refs / track / "mixture.wav", sum(ref.values()), SR, subtype="FLOAT")
        paths = {}
        for s, x in ref.items():
            sf.write(refs / track / f"{s}.wav", x, SR, subtype="FLOAT")
            est = x + (0.05 + 0.1 * STEMS.index(s)) * rng.standard_normal(x.shape).astype(np.float32)
            est += 0.2 * ref[STEMS[(STEMS.index(s) + 1) % 3]]  # some interference, so SIR is finite
            rate = SR
            if track == "Broken" and s == "drums":
                rate = 11025  # a rate mismatch
            if track == "Broken" and s == "vocals":
                est = est[:-100]  # a length mismatch
            rel = f"mixture-{k}/{s}.wav"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(out / rel, est, rate, subtype="FLOAT")
            paths[s] = rel
            estimates[(track, s)] = (x, est)
        if track == "Broken":  # a reference stem the model did not write
            sf.write(refs / track / "guitar.wav", _music(rng, n), SR, subtype="FLOAT")
        manifest.record({"input_path": str(refs / track / "mixture.wav"), "track": f"mixture-{k}",
                         "status": "done", "model": "tiny", "stem_paths": paths})
    manifest.compact()
    return refs.parent, out, estimates


def _si_sdr(ref, est):
    ref, est = ref.astype(np.float64).ravel(), est.astype(np.float64).ravel()
    target = ref * (est @ ref) / (ref @ ref)
    return 10 * np.log10((target ** 2).sum() / ((est - target) ** 2).sum())


def test_numbers_match_museval_and_formulas_and_bad_pairs_are_rows(job):
    refs, out, estimates = job
    rows, rc = run_evaluation(EvaluateOptions(out=out, references=refs, engine="local"))
    assert rc == 1  # three stems of the broken track failed
    df = pd.DataFrame(rows).set_index(["track", "stem"])
    assert len(df) == 10 and (df.model == "tiny").all()
    assert "sample rates differ" in df.loc[("Broken", "drums"), "error"]
    assert "shapes differ: reference 16000 frames" in df.loc[("Broken", "vocals"), "error"]
    assert "no separated 'guitar' stem" in df.loc[("Broken", "guitar"), "error"]
    assert df.loc[("Broken", "bass"), "status"] == "done"  # its good stem is still scored
    museval = _museval()
    for track in ("Artist - One", "Artist - Two"):
        r = np.stack([estimates[(track, s)][0] for s in STEMS])
        e = np.stack([estimates[(track, s)][1] for s in STEMS])
        sdr, isr, sir, sar = museval.evaluate(r, e, win=SR, hop=SR)
        for i, s in enumerate(STEMS):
            row = df.loc[(track, s)]
            assert row.status == "done" and row.frames == sdr.shape[1] == 2
            for name, ref_val in (("sdr", sdr), ("isr", isr), ("sir", sir), ("sar", sar)):
                assert row[name] == pytest.approx(np.nanmedian(ref_val[i]), abs=1e-6)
            x, est = estimates[(track, s)]
            whole = 10 * np.log10((x.astype(np.float64) ** 2).sum() / ((x - est).astype(np.float64) ** 2).sum())
            assert row.sdr_track == pytest.approx(whole, abs=1e-6)
            assert row.si_sdr == pytest.approx(_si_sdr(x, est), abs=1e-6)
    # the noisier stems score lower: the numbers are not constants
    assert df.loc[("Artist - One", "bass"), "sdr_track"] > df.loc[("Artist - One", "vocals"), "sdr_track"] + 3
    saved = pd.read_parquet(out / EVALUATION)
    assert len(saved) == 10


def test_rerun_skips_unchanged_and_ray_engine_agrees(job, tmp_path, capsys):
    refs, out, _ = job
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    first, _ = run_evaluation(EvaluateOptions(out=out2, references=refs, engine="local"))
    again, _ = run_evaluation(EvaluateOptions(out=out2, references=refs, engine="local"))
    done = lambda rows: {(r["track"], r["stem"]): r for r in rows if r["status"] == "done"}  # noqa: E731
    same = lambda rows: {k: r["eval_s"] for k, r in done(rows).items() if k[0] != "Broken"}  # noqa: E731
    assert same(again) == same(first)  # unchanged tracks are skipped; the one with failed stems is retried
    # an estimate that changed is evaluated again (and only its track)
    est = out2 / "mixture-0" / "bass.wav"
    x, sr = sf.read(est, dtype="float32")
    sf.write(est, x * 0.5, sr, subtype="FLOAT")
    os.utime(est, (time.time() + 5, time.time() + 5))
    third, _ = run_evaluation(EvaluateOptions(out=out2, references=refs, engine="local"))
    changed = {k for k, r in done(third).items() if k[0] != "Broken" and r["eval_s"] != done(first)[k]["eval_s"]}
    assert changed == {("Artist - One", s) for s in STEMS}
    assert done(third)[("Artist - One", "bass")]["si_sdr"] == pytest.approx(
        done(first)[("Artist - One", "bass")]["si_sdr"], abs=1e-6)  # scale-invariant
    # Ray: one task per track, same numbers (the CLI path, --force)
    capsys.readouterr()
    rc = main(["evaluate", str(out2), str(refs), "--engine", "ray", "--num-cpus", "2", "--force"])
    assert rc == 1
    table = capsys.readouterr().err
    assert "vocals" in table and "sdr_track" in table and "failed: tiny Broken guitar" in table
    ray_rows = done(pd.read_parquet(out2 / EVALUATION).to_dict("records"))
    for k, r in done(third).items():
        for m in ("sdr", "sir", "isr", "sar", "sdr_track", "si_sdr"):
            assert ray_rows[k][m] == pytest.approx(r[m], abs=1e-6), (k, m)


# -- any estimates folder: another tool's layout, the same numbers as through metadata.parquet -----------------------
COMPARED = ["model", "track", "stem", "status", "error", *METRICS, "frames", "duration_s", "sample_rate"]


def _table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)[COMPARED].sort_values(["model", "track", "stem"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """References (`refs/<track>/<stem>.wav`) and this project's default layout (OUT/<model>/<track>/<stem>.wav,
    tracks named after their inputs) with its metadata.parquet, evaluated through it. Mono, one second: BSS Eval
    solves a (stems x channels x 512)-square system per frame, seconds even at 8 kHz."""
    root = tmp_path_factory.mktemp("own")
    refs, own = root / "refs", root / "stems"
    rng = np.random.default_rng(1)
    manifest = Manifest(own)
    for track in ("Artist - One", "Artist - Two", "Broken"):
        ref = {s: _music(rng, SR)[:, :1] for s in STEMS}
        (refs / track).mkdir(parents=True)
        (own / "tiny" / track).mkdir(parents=True)
        for i, (s, x) in enumerate(ref.items()):
            sf.write(refs / track / f"{s}.wav", x, SR, subtype="FLOAT")
            est = x + (0.05 + 0.1 * i) * rng.standard_normal(x.shape).astype(np.float32) + 0.2 * ref[STEMS[i - 1]]
            rate = 11025 if (track, s) == ("Broken", "drums") else SR
            sf.write(own / "tiny" / track / f"{s}.wav", est[:-100] if (track, s) == ("Broken", "vocals") else est,
                     rate, subtype="FLOAT")
        manifest.record({"input_path": f"/music/{track}.wav", "track": track, "status": "done", "model": "tiny",
                         "stem_paths": {s: f"tiny/{track}/{s}.wav" for s in STEMS}})
    sf.write(refs / "Broken" / "guitar.wav", _music(rng, SR)[:, :1], SR, subtype="FLOAT")
    manifest.compact()
    rows, rc = run_evaluation(EvaluateOptions(out=own, references=refs, engine="local"))
    assert rc == 1 and len(rows) == 10
    return refs, own, _table(rows)


def test_a_copy_without_metadata_gives_the_same_numbers(own, tmp_path):
    refs, own_dir, expected = own
    assert expected.l1_freq.notna().sum() == 7 and (expected.dropna(subset=["sdr"]).bleedless < 100).all()
    plain = tmp_path / "copy"
    shutil.copytree(own_dir, plain, ignore=shutil.ignore_patterns("metadata.parquet", ".ripper-dist",
                                                                  "evaluation.parquet"))
    rows, rc = run_evaluation(EvaluateOptions(out=plain, references=refs, engine="local"))  # <model>/<track>/<stem>
    assert rc == 1
    pd.testing.assert_frame_equal(_table(rows), expected, check_exact=True)
    # the flat layout (<track>/<stem>) names the model after the folder; -o a .parquet file
    flat = tmp_path / "flat" / "tiny"
    shutil.copytree(plain / "tiny" / "Artist - One", flat / "Artist - One")
    dest = tmp_path / "scores" / "flat.parquet"
    assert main(["evaluate", str(flat), str(refs), "--engine", "local", "-o", str(dest)]) == 0
    pd.testing.assert_frame_equal(_table(pd.read_parquet(dest).to_dict("records")),
                                  expected[expected.track == "Artist - One"], check_exact=True, check_dtype=False)
    assert not (flat / EVALUATION).exists()


def test_demucs_layout_other_formats_and_reruns(own, tmp_path, capsys):
    """separated/<model>/<track>/<stem>.<ext> as demucs writes it: two models, FLAC and capitalised names for one,
    a track without a reference; the table goes to -o DIR; a rerun skips what has not changed."""
    refs, own_dir, expected = own
    sep = tmp_path / "separated"
    track = "Artist - Two"
    (sep / "htdemucs" / track).mkdir(parents=True)
    for s in STEMS:
        shutil.copy2(own_dir / "tiny" / track / f"{s}.wav", sep / "htdemucs" / track / f"{s}.wav")
    (sep / "htdemucs" / track / "notes.txt").write_text("not audio")
    (sep / "mdx_extra" / "test" / "artist - one").mkdir(parents=True)  # a split level; the name, case aside
    for s in STEMS:
        x, sr = sf.read(own_dir / "tiny" / "Artist - One" / f"{s}.wav", dtype="float32")
        sf.write(sep / "mdx_extra" / "test" / "artist - one" / f"{s.capitalize()}.flac", x, sr, subtype="PCM_24")
    (sep / "htdemucs" / "Unknown Song").mkdir()
    sf.write(sep / "htdemucs" / "Unknown Song" / "vocals.wav", np.zeros((800, 2), np.float32), SR)
    capsys.readouterr()
    assert main(["evaluate", str(sep), str(refs), "--engine", "local", "-o", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "bleedless" in err and "1 separated tracks have no reference folder" in err and "Unknown Song" in err
    assert f"table: {tmp_path / 'cmp' / EVALUATION}" in err
    got = pd.read_parquet(tmp_path / "cmp" / EVALUATION)
    assert len(got) == 6 and (got.status == "done").all()
    demucs = _table(got[got.model == "htdemucs"].to_dict("records")).drop(columns="model")
    ours = expected[expected.track.isin(["Artist - One", "Artist - Two"])].drop(columns="model").set_index(
        ["track", "stem"])
    pd.testing.assert_frame_equal(demucs, ours.loc[["Artist - Two"]].reset_index(), check_exact=True,
                                  check_dtype=False)
    flac = got[got.model == "mdx_extra"].set_index(["track", "stem"])
    assert set(flac.index) == {("Artist - One", s) for s in STEMS}  # the reference's name
    diff = flac.sdr_track - ours.loc["Artist - One"].sdr_track
    assert diff.abs().max() < 0.01  # 24-bit copies of the same stems
    assert main(["evaluate", str(sep), str(refs), "--engine", "local", "-o", str(tmp_path / "cmp")]) == 0
    assert "2 tracks unchanged since the last run" in capsys.readouterr().err
    # --model picks one model folder; the other model's rows stay in the table (one table compares several runs)
    assert main(["evaluate", str(sep), str(refs), "--engine", "local", "--model", "mdx_extra", "--force",
                 "-o", str(tmp_path / "cmp" / EVALUATION)]) == 0
    again = pd.read_parquet(tmp_path / "cmp" / EVALUATION).set_index(["model", "track", "stem"])
    first = got.set_index(["model", "track", "stem"])
    assert len(again) == 6 and (again.eval_s != first.eval_s).groupby("model").all().to_dict() == {
        "htdemucs": False, "mdx_extra": True}
    # OUT itself a track folder: its parent names the model (already scored: skipped), or --model
    one = sep / "htdemucs" / track
    assert main(["evaluate", str(one), str(refs), "--engine", "local", "-o", str(tmp_path / "cmp")]) == 0
    assert "1 tracks unchanged since the last run" in capsys.readouterr().err
    assert main(["evaluate", str(one), str(refs), "--engine", "local", "-o", str(tmp_path / "cmp"),
                 "--model", "demucs4"]) == 0
    assert set(pd.read_parquet(tmp_path / "cmp" / EVALUATION).model) == {"htdemucs", "mdx_extra", "demucs4"}


def test_nothing_to_match_is_one_line_exit_2(own, tmp_path, capsys):
    refs = own[0]
    (tmp_path / "empty").mkdir()
    wrong = tmp_path / "stems" / "mixes"
    wrong.mkdir(parents=True)
    sf.write(wrong / "song_vocals.wav", np.zeros((800, 2), np.float32), SR)
    unmatched = tmp_path / "other" / "Some Song"
    unmatched.mkdir(parents=True)
    sf.write(unmatched / "vocals.wav", np.zeros((800, 2), np.float32), SR)
    cases = {tmp_path / "missing": ["no such folder"],
             tmp_path / "empty": ["nothing to evaluate", "bass, drums, guitar, vocals", "<model>/<track>/<stem>",
                                  "it is empty"],
             tmp_path / "stems": ["nothing to evaluate", "1 folder ('mixes')", "'mixes/song_vocals.wav'"],
             tmp_path / "other": ["matches a reference folder", "'" + str(unmatched) + "'", "'Artist - One'"]}
    for est, expected in cases.items():
        capsys.readouterr()
        assert main(["evaluate", str(est), str(refs)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ripper-dist: error: "), err
        for text in expected:
            assert text in err, (text, err)


# -- MSST's l1_freq, bleedless, fullness -----------------------------------------------------------------------------
def test_msst_metrics_hand_computed_cases():
    rng = np.random.default_rng(3)
    ref = (0.3 * rng.standard_normal((12000, 2))).astype(np.float32)
    assert l1_freq(ref, ref) == 100.0 and bleed_full(ref, ref, SR) == (100.0, 100.0)
    # twice the reference: every mel bin (and the -80 dB floor, relative to the maximum) 20 log10(2) dB louder
    bleedless, fullness = bleed_full(ref, 2 * ref, SR)
    assert bleedless == pytest.approx(100 / (1 + 20 * np.log10(2)), rel=1e-5) and fullness == 100.0
    bleedless, fullness = bleed_full(ref, 0.5 * ref, SR)
    assert bleedless == 100.0 and fullness == pytest.approx(100 / (1 + 20 * np.log10(2)), rel=1e-5)
    # a constant c against silence, rectangular window, reflect padding: every frame's bin 0 is 2048 c, the rest 0
    c = 1e-3
    assert l1_freq(np.zeros((5000, 1)), np.full((5000, 1), c)) == pytest.approx(100 / (1 + 10 * 2048 * c / 1025))


def test_msst_metrics_match_the_torch_and_librosa_formulation():
    """MSST's utils/metrics.py computes these with torch.stft, librosa's mel bank and torchaudio's AmplitudeToDB;
    the same formulas written with torch and librosa (AmplitudeToDB transcribed: torchaudio is not installed)."""
    import torch  # the export extra, part of the install command
    import librosa  # comes with bs-roformer (the test extra)
    rng = np.random.default_rng(4)
    ref = (0.3 * rng.standard_normal((3 * SR, 2))).astype(np.float32)
    est = ref + (0.1 * rng.standard_normal(ref.shape)).astype(np.float32)
    est[:, 1] *= 0.6

    def spec(x, n_fft, hop, **kw):
        return torch.abs(torch.stft(torch.from_numpy(np.ascontiguousarray(x.T)), n_fft, hop, return_complex=True,
                                    **kw))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1 = 10 * torch.mean(torch.abs(spec(est, 2048, 1024) - spec(ref, 2048, 1024)))
        bank = torch.from_numpy(librosa.filters.mel(sr=SR, n_fft=4096, n_mels=512))
    assert np.abs(mel_filters(SR, 4096, 512) - bank.numpy()).max() < 1e-7
    assert l1_freq(ref, est) == pytest.approx(100 / (1 + float(l1)), rel=1e-5)

    def db(x):
        mel = bank @ spec(x, 4096, 1024, window=torch.hann_window(4096), pad_mode="constant")
        x_db = 20 * torch.log10(torch.clamp(mel, min=1e-10))
        return torch.max(x_db, x_db.amax() - 80)  # one cutoff over channels, mels and frames (a 3-d input)

    d = db(est) - db(ref)
    expected = (100 / (1 + float(d[d > 0].mean())), 100 / (1 - float(d[d < 0].mean())))
    assert bleed_full(ref, est, SR) == pytest.approx(expected, rel=1e-5)
