"""`ripper-dist evaluate`: numbers equal museval called directly and the formulas; bad pairs are isolated; reruns
skip unchanged tracks; the Ray engine gives the same rows as the local one."""
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_dist.cli import main
from ripper_dist.evaluate import EVALUATION, EvaluateOptions, _museval, run_evaluation
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
                continue      # a missing stem
            rel = f"mixture-{k}/{s}.wav"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(out / rel, est, rate, subtype="FLOAT")
            paths[s] = rel
            estimates[(track, s)] = (x, est)
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
    assert rc == 1  # the broken track's two stems failed
    df = pd.DataFrame(rows).set_index(["track", "stem"])
    assert len(df) == 9 and (df.model == "tiny").all()
    assert "sample rates differ" in df.loc[("Broken", "drums"), "error"]
    assert "no separated 'vocals' stem" in df.loc[("Broken", "vocals"), "error"]
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
    assert len(saved) == 9


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
    assert "vocals" in table and "sdr_track" in table and "failed: tiny Broken vocals" in table
    ray_rows = done(pd.read_parquet(out2 / EVALUATION).to_dict("records"))
    for k, r in done(third).items():
        for m in ("sdr", "sir", "isr", "sar", "sdr_track", "si_sdr"):
            assert ray_rows[k][m] == pytest.approx(r[m], abs=1e-6), (k, m)
