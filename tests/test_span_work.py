"""The work unit end to end with numpy runners: a file -> family plan -> spans -> stems (no torch, no ONNX)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from ripper_dist.audio import AudioReader
from ripper_dist.engine import DemucsBag
from ripper_dist.families import DemucsFamily
from ripper_dist.options import SeparateOptions
from ripper_dist.parts import TrackParts
from ripper_dist.span_work import plan_track, run_span, separate_track, stem_sink
from test_engine import CHUNK, SOURCES, NumpyRunner, expected_stems, make_bag, sdr, write_input


def family(bag, **opts):
    return DemucsFamily(bag, SeparateOptions(**opts))


def paths(folder, stems):
    return {s: folder / f"{s}.wav" for s in stems}


def test_track_end_to_end_with_resampling_shifts_and_batches(tmp_path):
    src = tmp_path / "in" / "song.wav"
    src.parent.mkdir()
    frames = write_input(src, 48000, 2, subtype="PCM_24")
    bag = make_bag(2, [[1, 1, 0, 0.5], [0, 1, 1, 1]])
    fam = family(bag, shifts=1, seed=4, overlap=0.5)
    done = []
    out, plan, info = separate_track(fam, bag.runners, src, paths(tmp_path / "out", fam.stems), subtype="FLOAT",
                                     clip="none", batch_size=3, progress=done.append)
    assert (plan.in_rate, plan.in_channels, plan.frames) == (48000, 2, frames)
    assert plan.duration_s == pytest.approx(frames / 48000) and sum(done) == plan.length
    ref = expected_stems(make_bag(2, [[1, 1, 0, 0.5], [0, 1, 1, 1]]), src, 48000, frames, shifts=1, seed=4,
                         overlap=0.5)
    for s, p in out.items():
        data, sr = sf.read(p, dtype="float32", always_2d=True)
        assert sr == 48000 and data.shape == (frames, 2)
        assert sdr(ref[s], data) >= 100, s
    assert [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")] == []


def test_mono_input_gives_mono_stems_and_rescale(tmp_path):
    src = tmp_path / "mono.flac"
    frames = write_input(src, 44100, 1, seconds=0.3, subtype="PCM_16")
    fam = family(make_bag())
    out, _, info = separate_track(fam, make_bag().runners, src,
                                  {s: tmp_path / f"{s}.flac" for s in fam.stems}, fmt="flac", subtype="PCM_24")
    ref = expected_stems(make_bag(), src, 44100, frames, mono=True)
    for s, p in out.items():
        i = sf.info(p)
        assert (i.channels, i.frames, i.samplerate, i.format, i.subtype) == (1, frames, 44100, "FLAC", "PCM_24")
        data, _ = sf.read(p, dtype="float32", always_2d=True)
        peak = np.abs(ref[s]).max()
        assert info["peaks"][s] == pytest.approx(peak, rel=1e-3)
        assert np.abs(data).max() <= 1
        assert sdr(ref[s] / max(1.01 * peak, 1), data) >= 90  # rescaled by the whole stem's peak, 24-bit


def test_stem_subset_runs_only_the_needed_models(tmp_path):
    src = tmp_path / "a.wav"
    write_input(src, 44100, 2)
    one_hot = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    bag = make_bag(4, one_hot)
    fam = family(bag, stems="vocals")
    assert fam.models == {3} and fam.stems == ["vocals"]
    out, _, _ = separate_track(fam, bag.runners, src, paths(tmp_path / "sub", fam.stems), subtype="FLOAT",
                               clip="none")
    assert [r.calls for r in bag.runners[:3]] == [0, 0, 0] and bag.runners[3].calls > 0
    full_bag = make_bag(4, one_hot)
    full, _, _ = separate_track(family(full_bag), full_bag.runners, src, paths(tmp_path / "full", SOURCES),
                                subtype="FLOAT", clip="none")
    np.testing.assert_array_equal(sf.read(out["vocals"])[0], sf.read(full["vocals"])[0])
    with pytest.raises(ValueError, match="kazoo"):
        family(bag, stems="kazoo")


def test_two_stems_sum_the_others(tmp_path):
    src = tmp_path / "t.wav"
    write_input(src, 44100, 2)
    bag = make_bag(2, [[1, 1, 1, 0], [0, 0, 0, 1]])
    fam = family(bag, two_stems="vocals")
    assert fam.stem_map == {"vocals": [3], "no_vocals": [0, 1, 2]}
    out, _, _ = separate_track(fam, bag.runners, src, paths(tmp_path, fam.stems), subtype="FLOAT", clip="none")
    ref_bag = make_bag(2, [[1, 1, 1, 0], [0, 0, 0, 1]])
    ref, _, _ = separate_track(family(ref_bag), ref_bag.runners, src, paths(tmp_path / "all", SOURCES),
                               subtype="FLOAT", clip="none")
    others = sum(sf.read(ref[s], dtype="float32")[0] for s in ["drums", "bass", "other"])
    assert sdr(others, sf.read(out["no_vocals"], dtype="float32")[0]) >= 100


def test_other_method_minus_and_none(tmp_path):
    """demucs' --other-method: minus writes no_X = mix - X (not the sum of the other outputs); none drops no_X."""
    src = tmp_path / "t.wav"
    write_input(src, 44100, 2)
    bag = make_bag(2, [[1, 1, 1, 0], [0, 0, 0, 1]])
    fam = family(bag, two_stems="vocals", other_method="minus")
    out, _, _ = separate_track(fam, bag.runners, src, paths(tmp_path, fam.stems), subtype="FLOAT", clip="none")
    mix = sf.read(src, dtype="float32")[0]
    vocals = sf.read(out["vocals"], dtype="float32")[0]
    assert sdr(mix - vocals, sf.read(out["no_vocals"], dtype="float32")[0]) >= 90
    added, _, _ = separate_track(family(bag, two_stems="vocals"), bag.runners, src, paths(tmp_path / "add", fam.stems),
                                 subtype="FLOAT", clip="none")
    assert sdr(mix - vocals, sf.read(added["no_vocals"], dtype="float32")[0]) < 60  # the random model: not the same
    assert family(bag, two_stems="vocals", other_method="none").stems == ["vocals"]


def test_lossy_input_with_batches(tmp_path):
    src = tmp_path / "b.mp3"
    write_input(src, 44100, 2, seconds=0.5, format="MP3", subtype="MPEG_LAYER_III")
    frames = sf.info(src).frames
    bag = make_bag(2)
    out, _, _ = separate_track(family(bag, shifts=1, seed=1), bag.runners, src, paths(tmp_path, SOURCES),
                               subtype="FLOAT", clip="none", batch_size=3)
    ref = expected_stems(make_bag(2), src, 44100, frames, batch_size=1, shifts=1, seed=1)
    for s, p in out.items():
        assert sdr(ref[s], sf.read(p, dtype="float32", always_2d=True)[0]) >= 100


def test_failure_leaves_no_files(tmp_path):
    src = tmp_path / "c.wav"
    write_input(src, 44100, 2)
    bag = DemucsBag([NumpyRunner(fail=True)], None, CHUNK, SOURCES, 44100, 2)
    with pytest.raises(RuntimeError, match="exploded"):
        separate_track(family(bag), bag.runners, src, paths(tmp_path / "out", SOURCES))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


@pytest.mark.parametrize("n_spans", [2, 3, 7])
def test_spans_through_parts_equal_the_one_span_track(tmp_path, n_spans):
    """The Ray placement in one process: spans in any order into parts, assembled: the local engine's bytes."""
    src = tmp_path / "long.wav"
    write_input(src, 48000, 2, seconds=2.3)
    bag = make_bag(2, [[1, 0.5, 0, 1], [0, 0.5, 1, 1]])
    fam = family(bag, shifts=1, seed=2)
    local, _, _ = separate_track(fam, bag.runners, src, paths(tmp_path / "local", fam.stems), subtype="FLOAT",
                                 clip="none", batch_size=2)
    with AudioReader(src, 44100, 2) as reader:
        plan = plan_track(fam, reader, n_spans)
        assert len(plan.spans) == n_spans and plan.spans[0][0] == 0 and plan.spans[-1][1] == plan.length
        parts = TrackParts(tmp_path / "parts", "long", n_spans)
        for k in reversed(range(n_spans)):
            w = parts.writer(k)
            info = run_span(fam, bag.runners, reader, plan, k, 2, w)
            w.close()
            parts.mark(k, info)
            assert parts.complete() == (k == 0)
    assert parts.claim() and not parts.claim()
    sink = stem_sink(fam, plan, paths(tmp_path / "ray", fam.stems), fmt="wav", subtype="FLOAT", clip="none")
    for block in parts.blocks(len(fam.stems), 2):
        sink.write(block)
    for s, p in sink.close().items():
        assert sf.read(p)[0].tobytes() == sf.read(local[s])[0].tobytes(), s


def test_span_cuts_avoid_straddling_calls():
    from ripper_dist.families import split_points
    calls = [(0, 100), (75, 175), (150, 250), (225, 325)]
    spans = split_points(calls, 325, 2)
    assert spans[0][0] == 0 and spans[-1][1] == 325 and spans[0][1] == spans[1][0]
    cut = spans[0][1]
    assert sum(a < cut < b for a, b in calls) == 1  # the best any cut can do here
    assert split_points(calls, 325, 1) == [(0, 325)]
    assert len(split_points(calls, 5, 50)) <= 5
