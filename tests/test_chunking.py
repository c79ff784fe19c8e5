"""Chunk plan + overlap-add against upstream `demucs.apply.apply_model` (the reference), on tiny models."""
from __future__ import annotations

import math
import random
import subprocess
import sys
from fractions import Fraction

import numpy as np
from ripper_export.metrics import sdr_db as sdr
import pytest
import torch
import torch.nn.functional as F
from demucs.apply import BagOfModels, TensorChunk, apply_model
from demucs.htdemucs import HTDemucs
from demucs.utils import center_trim

from ripper_dist.chunking import (ChunkTask, MixStats, OverlapAdd, denormalize, mix_stats, normalize, plan_chunks,
                                  read_window, triangle_weight)
from ripper_dist.engine import DemucsBag, separate_array

SR = 1000          # tiny sample rate: max_shift = 500
SEG = 1000         # model segment (1 s) = graph length


# --------------------------------------------------------------------------------------------------------------------
# Tiny upstream-compatible models


class TinyModel(torch.nn.Module):
    """Generic model: `valid_length` is the graph length; output depends nonlinearly on the sample values, their
    neighbours, the absolute position in the window and the window's mean (so any misplaced or mis-padded window
    shows)."""

    def __init__(self, n_sources=4, samplerate=SR, segment=Fraction(1), chunk=None, seed=0):
        super().__init__()
        self.sources = [f"s{i}" for i in range(n_sources)]
        self.samplerate = samplerate
        self.audio_channels = 2
        self.segment = segment
        self.chunk = chunk or int(segment * samplerate)
        g = torch.Generator().manual_seed(seed)
        self.kernel = torch.nn.Parameter(torch.randn(n_sources * 2, 2, 9, generator=g) * 0.5, requires_grad=False)
        self.freq = torch.nn.Parameter(torch.rand(n_sources, 1, 1, generator=g) * 3 + 0.5, requires_grad=False)

    def valid_length(self, length):
        assert length <= self.chunk
        return self.chunk

    def core(self, x):
        b, c, t = x.shape
        s = len(self.sources)
        h = torch.tanh(F.conv1d(x, self.kernel, padding=4)).view(b, s, c, t)
        pos = torch.arange(t, dtype=x.dtype) / t
        h = h * (1 + 0.5 * torch.sin(2 * math.pi * self.freq * pos))
        return h + 0.3 * x.mean(-1, keepdim=True)[:, None] + 0.2 * x[:, None]

    def forward(self, x):
        assert x.shape[-1] == self.chunk, x.shape
        return self.core(x)


class TinyHT(HTDemucs):
    """Stand-in for HTDemucs (so `apply_model` takes its HTDemucs branches): `valid_length` from HTDemucs, and the
    forward pads on the right to the training length and crops back, as HTDemucs does."""

    def __init__(self, n_sources=4, samplerate=SR, segment=Fraction(1), seed=0):
        torch.nn.Module.__init__(self)
        self.inner = TinyModel(n_sources, samplerate, segment, seed=seed)
        self.sources = self.inner.sources
        self.samplerate = samplerate
        self.audio_channels = 2
        self.segment = segment
        self.use_train_segment = True

    def forward(self, mix):
        length = mix.shape[-1]
        training = int(self.segment * self.samplerate)
        if length < training:
            mix = F.pad(mix, (0, training - length))
        return self.inner.core(mix)[..., :length]


class TorchRunner:
    """The runner protocol around a torch model (numpy in, numpy out)."""

    def __init__(self, model, chunk_samples):
        self.model = model
        self.chunk_samples = chunk_samples
        self.batches = []

    def __call__(self, batch):
        assert batch.dtype == np.float32 and batch.shape[1:] == (2, self.chunk_samples), batch.shape
        self.batches.append(batch.shape[0])
        with torch.no_grad():
            return self.model(torch.from_numpy(batch)).numpy()


def upstream_separate(model, mix, *, shifts=0, overlap=0.25, seed=0, transition_power=1.0, segment=None):
    """`Separator.separate_tensor` without resampling: normalise, `apply_model`, un-normalise."""
    wav = torch.from_numpy(np.asarray(mix, np.float32))
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    random.seed(seed)  # upstream draws the shift offsets from the global `random`
    with torch.no_grad():
        out = apply_model(model, ((wav - mean) / std)[None], shifts=shifts, split=True, overlap=overlap,
                          transition_power=transition_power, segment=segment)
    return (out * std + mean)[0].numpy()




def make_mix(length, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, length)).astype(np.float32) * 0.3
    x[1] = 0.6 * x[1] + 0.4 * x[0]
    return x + np.float32(0.05)  # a DC offset exercises the mean in the normalisation


def single_bag(model, chunk=SEG, **kw):
    return DemucsBag([TorchRunner(model, chunk)], None, int(model.segment * model.samplerate), model.sources,
                     model.samplerate, 2, **kw)


# --------------------------------------------------------------------------------------------------------------------
# separate_array == upstream


@pytest.mark.parametrize("length", [300, SEG, 2777])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_single_model_matches_upstream(length, overlap):
    model = TinyModel()
    mix = make_mix(length, seed=length)
    ref = upstream_separate(model, mix, overlap=overlap)
    est = separate_array(single_bag(model), mix, overlap=overlap)
    assert est.dtype == np.float32 and est.shape == (4, 2, length)
    assert sdr(ref, est) >= 100


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("length", [300, 2777])
def test_shifts_match_upstream(batch_size, length):
    model = TinyModel(seed=1)
    mix = make_mix(length, seed=7)
    ref = upstream_separate(model, mix, shifts=2, seed=11)
    bag = single_bag(model)
    est = separate_array(bag, mix, shifts=2, seed=11, batch_size=batch_size)
    assert sdr(ref, est) >= 100
    assert max(bag.runners[0].batches) <= batch_size
    if batch_size == 4 and length == 2777:
        assert max(bag.runners[0].batches) == 4
    # negative control: other offsets give another result
    assert sdr(ref, separate_array(single_bag(model), mix, shifts=2, seed=12)) < 60


def test_transition_power_and_overlap_half():
    model = TinyModel(seed=2)
    mix = make_mix(2500, seed=3)
    ref = upstream_separate(model, mix, overlap=0.5, transition_power=2.0)
    assert sdr(ref, separate_array(single_bag(model), mix, overlap=0.5, transition_power=2.0)) >= 100
    assert sdr(ref, separate_array(single_bag(model), mix, overlap=0.5)) < 80


@pytest.mark.parametrize("weights", [
    [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]],             # one-hot (htdemucs_ft style)
    [[1, 0.5, 0, 2], [0.3, 1, 1, 0], [1, 1, 0.25, 1]],       # mixed
])
@pytest.mark.parametrize("shifts", [0, 2])
def test_bag_matches_upstream(weights, shifts):
    models = [TinyModel(seed=10 + i) for i in range(3)]
    mix = make_mix(2300, seed=4)
    ref = upstream_separate(BagOfModels(models, weights), mix, shifts=shifts, seed=5)
    bag = DemucsBag([TorchRunner(m, SEG) for m in models], weights, SEG, models[0].sources, SR, 2)
    est = separate_array(bag, mix, shifts=shifts, seed=5, batch_size=4)
    assert sdr(ref, est) >= 100


def test_bag_with_different_segments():
    models = [TinyModel(seed=20), TinyModel(segment=Fraction(4, 5), seed=21)]
    mix = make_mix(2100, seed=6)
    ref = upstream_separate(BagOfModels(models), mix, shifts=1, seed=1)
    bag = DemucsBag([TorchRunner(models[0], 1000), TorchRunner(models[1], 800)], None, [1000, 800],
                    models[0].sources, SR, 2)
    assert sdr(ref, separate_array(bag, mix, shifts=1, seed=1)) >= 100


def test_segment_shorter_than_graph_generic_model():
    """`apply_model(segment=...)` on a model whose `valid_length` is the graph length: chunks are centred in the
    graph window with real neighbouring audio."""
    model = TinyModel(seed=3)
    mix = make_mix(2600, seed=8)
    ref = upstream_separate(model, mix, segment=Fraction(3, 5), shifts=1, seed=2)
    bag = single_bag(model, input_samples=SEG)
    assert sdr(ref, separate_array(bag, mix, segment_samples=600, shifts=1, seed=2)) >= 100


def test_segment_shorter_than_graph_htdemucs_rule():
    """HTDemucs with a segment override: centred on the segment, zeros up to the training length (the default)."""
    model = TinyHT(seed=4)
    mix = make_mix(2600, seed=9)
    ref = upstream_separate(model, mix, segment=Fraction(3, 5), overlap=0.5)
    assert sdr(ref, separate_array(single_bag(model), mix, segment_samples=600, overlap=0.5)) >= 100
    # the other padding rule is measurably different
    assert sdr(ref, separate_array(single_bag(model, input_samples=SEG), mix, segment_samples=600,
                                   overlap=0.5)) < 60


def test_segment_longer_than_graph_is_refused():
    with pytest.raises(ValueError, match="longer"):
        separate_array(single_bag(TinyModel()), make_mix(100), segment_samples=SEG + 1)


def test_real_small_htdemucs_with_segment_override():
    """A real (tiny, random) HTDemucs: normal segment and an upstream `--segment` override."""
    from ripper_export.random_demucs import make_htdemucs_package

    pkg = make_htdemucs_package(size="small", half=False)
    model = pkg["klass"](**pkg["kwargs"])
    model.load_state_dict(pkg["state"])
    model.eval()
    chunk = int(model.segment * model.samplerate)
    mix = make_mix(33000, seed=10)
    bag = DemucsBag([TorchRunner(model, chunk)], None, chunk, model.sources, 44100, 2)
    ref = upstream_separate(model, mix, segment=Fraction(1, 2))
    assert sdr(ref, separate_array(bag, mix, segment_samples=22050, batch_size=2)) >= 100
    ref = upstream_separate(model, mix[:, :30000])
    assert sdr(ref, separate_array(bag, mix[:, :30000])) >= 100


# --------------------------------------------------------------------------------------------------------------------
# plan pieces against upstream pieces


def test_triangle_weight_matches_upstream():
    for seg, power in [(1, 1.0), (2, 1.0), (7, 1.0), (1000, 1.0), (1001, 2.0), (343980, 1.0)]:
        w = torch.cat([torch.arange(1, seg // 2 + 1), torch.arange(seg - seg // 2, 0, -1)])
        w = ((w / w.max()) ** power).numpy()
        np.testing.assert_allclose(triangle_weight(seg, power), w, rtol=1e-6)


def test_windows_match_tensorchunk_padding():
    """Every window of a no-shift plan is upstream's `TensorChunk(mix, o, seg).padded(valid)`."""
    mix = make_mix(2777, seed=1)
    tm = torch.from_numpy(mix)
    for seg, chunk in [(1000, 1000), (600, 1000), (601, 1000)]:
        tasks = plan_chunks(mix.shape[1], segment_samples=seg, chunk_samples=chunk)
        stride = int(0.75 * seg)
        assert [t.offset for t in tasks] == list(range(0, mix.shape[1], stride))
        for t in tasks:
            ref = TensorChunk(tm, t.offset, seg).padded(chunk).numpy()
            np.testing.assert_array_equal(read_window(mix, t, chunk), ref)
            # centre-trimmed output index <-> kept track samples
            trimmed = center_trim(torch.arange(chunk), t.length).numpy()
            assert trimmed[0] == t.out_start and len(trimmed) == t.keep_len


def test_shift_plan_in_track_coordinates():
    tasks = plan_chunks(700, segment_samples=400, chunk_samples=400, shifts=3, seed=0, max_shift=500)
    rng = random.Random(0)
    offsets = [rng.randint(0, 500) for _ in range(3)]
    for p, off in enumerate(offsets):
        mine = [t for t in tasks if t.shift == p]
        view_start = off - 500
        # every kept sample of the track is covered once per pass, contiguously
        assert mine[0].keep_start == 0 and mine[-1].keep_end == 700
        assert all(0 <= t.keep_start and t.keep_end <= 700 for t in mine)
        for t in mine:
            assert (t.offset - view_start) % 300 == 0   # stride int(0.75 * 400)
            assert t.weight_start == max(0, -t.offset)
    # chunks entirely left of the track (segment <= max_shift) are dropped
    assert all(t.keep_len > 0 for t in tasks)


def test_chunktask_is_a_table_row():
    t = plan_chunks(5000, segment_samples=1000, chunk_samples=1200, shifts=1, max_shift=500, n_models=2)[3]
    row = t.as_dict()
    assert all(type(v) is int for v in row.values())
    assert ChunkTask.from_dict(row) == t


def test_plan_validation():
    with pytest.raises(ValueError):
        plan_chunks(10, segment_samples=1000, chunk_samples=900)
    with pytest.raises(ValueError):
        plan_chunks(10, segment_samples=100, chunk_samples=100, shifts=1)  # max_shift missing
    with pytest.raises(ValueError):
        plan_chunks(10, segment_samples=1, chunk_samples=1)                # stride 0
    assert plan_chunks(0, segment_samples=100, chunk_samples=100) == []


# --------------------------------------------------------------------------------------------------------------------
# OverlapAdd streaming


def _fake_outputs(tasks, chunk, n_sources=3, seed=0):
    rng = np.random.default_rng(seed)
    return {t.key: rng.standard_normal((n_sources, 2, chunk)).astype(np.float32) for t in tasks}


def test_any_order_with_prefix_popping_equals_one_shot():
    length, chunk = 5321, 900
    tasks = plan_chunks(length, segment_samples=[800, 900], chunk_samples=chunk, shifts=2, seed=3, max_shift=250,
                        n_models=2)
    outs = _fake_outputs(tasks, chunk)
    weights = [[1, 0.5, 0], [0.5, 1, 1]]
    stats = MixStats(total=3.0, total_sq=50.0, count=5000)

    def run(order, pop):
        acc = OverlapAdd(tasks, length=length, n_sources=3, channels=2, weights=weights, stats=stats)
        blocks = []
        for t in order:
            acc.add(t, outs[t.key])
            if pop:
                blocks.append(acc.pop_ready())
        blocks.append(acc.finish())
        assert acc.position == length
        return np.concatenate(blocks, axis=-1)

    one_shot = run(tasks, pop=False)
    rng = random.Random(0)
    for _ in range(3):
        order = list(tasks)
        rng.shuffle(order)
        np.testing.assert_allclose(run(order, pop=True), one_shot, rtol=1e-5, atol=1e-5)

    # the explicit formula: per (model, pass) weighted mean, average passes, bag weights / per-source totals
    ref = np.zeros((3, 2, length))
    w = np.asarray(weights, float)
    for m in range(2):
        est = 0
        for p in range(2):
            num = np.zeros((3, 2, length))
            den = np.zeros(length)
            for t in tasks:
                if (t.model, t.shift) != (m, p):
                    continue
                tri = triangle_weight(t.segment)[t.weight_start:t.weight_start + t.keep_len]
                num[:, :, t.keep_start:t.keep_end] += tri * outs[t.key][:, :, t.out_start:t.out_start + t.keep_len]
                den[t.keep_start:t.keep_end] += tri
            est = est + num / den
        ref += (est / 2) * w[m][:, None, None]
    ref /= w.sum(0)[:, None, None]
    np.testing.assert_allclose(one_shot, denormalize(ref, stats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shifts,cuts", [(0, [1500]), (2, [700, 2600, 2601]), (1, [1, 5320])])
def test_spans_concatenate_to_the_whole_track_bitwise(shifts, cuts):
    """Spans of a track, each reduced alone from the calls touching it, are the whole track's samples, bitwise."""
    length, chunk = 5321, 900
    tasks = plan_chunks(length, segment_samples=[800, 900], chunk_samples=chunk, shifts=shifts, seed=3,
                        max_shift=250, n_models=2)
    outs = _fake_outputs(tasks, chunk)
    kw = dict(length=length, n_sources=3, channels=2, weights=[[1, 0.5, 0], [0.5, 1, 1]],
              stats=MixStats(total=3.0, total_sq=50.0, count=5000))

    def run(span=None):
        acc = OverlapAdd(tasks, span=span, **kw)
        blocks = []
        for t in acc.tasks:
            acc.add(t, outs[t.key])
            blocks.append(acc.pop_ready())
        blocks.append(acc.finish())
        return np.concatenate(blocks, axis=-1), len(acc.tasks)

    whole, n_all = run()
    bounds = [0, *cuts, length]
    spans = [run((a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    assert spans[0][1] < n_all  # a span runs only the calls that touch it
    assert np.array_equal(np.concatenate([s for s, _ in spans], axis=-1), whole)


def test_prefix_popping_keeps_memory_bounded():
    length, seg = 200_000, 1000
    tasks = plan_chunks(length, segment_samples=seg, chunk_samples=seg, shifts=1, max_shift=500)
    acc = OverlapAdd(tasks, length=length, n_sources=2, channels=2)
    out = np.ones((2, 2, seg), np.float32)
    got, peak = 0, 0
    for t in sorted(tasks, key=lambda t: t.keep_start):
        acc.add(t, out)
        got += acc.pop_ready().shape[-1]
        peak = max(peak, acc.buffer_samples)
    rest = acc.finish()
    assert got + rest.shape[-1] == length
    np.testing.assert_allclose(rest, 1.0, rtol=1e-6)  # weights of a pass sum to 1 everywhere
    assert peak <= 4 * seg


def test_overlap_add_errors():
    tasks = plan_chunks(2000, segment_samples=1000, chunk_samples=1000)
    acc = OverlapAdd(tasks, length=2000, n_sources=1, channels=2)
    out = np.zeros((1, 2, 1000), np.float32)
    acc.add(tasks[0], out)
    with pytest.raises(ValueError):
        acc.add(tasks[0], out)  # twice
    with pytest.raises(ValueError):
        acc.add(tasks[1], np.zeros((2, 2, 1000), np.float32))  # wrong shape
    with pytest.raises(RuntimeError):
        acc.finish()
    with pytest.raises(ValueError):
        OverlapAdd(tasks, length=2000, n_sources=2, channels=2, weights=[[1, 0]])  # a source weighs 0


# --------------------------------------------------------------------------------------------------------------------
# normalisation


def test_stats_match_upstream_and_stream():
    mix = make_mix(10007, seed=2) * 3
    ref = torch.from_numpy(mix).mean(0)
    whole = mix_stats(mix)
    assert whole.mean == pytest.approx(float(ref.mean()), rel=1e-5, abs=1e-7)
    assert whole.std == pytest.approx(float(ref.std()), rel=1e-5)
    parts = MixStats()
    for s in range(0, mix.shape[1], 999):
        parts = parts + MixStats.of(mix[:, s:s + 999])
    assert parts.count == whole.count
    assert parts.mean == pytest.approx(whole.mean, rel=1e-12, abs=1e-15)
    assert parts.std == pytest.approx(whole.std, rel=1e-12)
    np.testing.assert_allclose(denormalize(normalize(mix, whole), whole), mix, rtol=1e-5, atol=1e-6)


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, ripper_dist.chunking, ripper_dist.audio, ripper_dist.engine; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
