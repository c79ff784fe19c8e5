import subprocess
import sys

import numpy as np
import pytest

from ripper_dist.msst_chunking import (
    MsstOverlapAdd, MsstPlan, add_complement, complement_name, demix, model_sources, output_stems, plan_chunks,
    read_chunk, source_span,
)


def msst_loop(mix, model, chunk_size, num_overlap, batch_size=1):
    """MSST's `demix` loop (generic mode) restated in numpy, batch semantics included."""
    fade = chunk_size // 10
    step = chunk_size // num_overlap
    border = chunk_size - step
    length_init = mix.shape[-1]
    window = np.ones(chunk_size, dtype=np.float32)
    window[-fade:] = np.linspace(1, 0, fade, dtype=np.float32)
    window[:fade] = np.linspace(0, 1, fade, dtype=np.float32)
    if length_init > 2 * border and border > 0:
        mix = np.pad(mix, ((0, 0), (border, border)), mode="reflect")
    result = counter = None
    i = 0
    batch_data, batch_locations = [], []
    while i < mix.shape[1]:
        part = mix[:, i:i + chunk_size]
        chunk_len = part.shape[-1]
        pad_mode = "reflect" if chunk_len > chunk_size // 2 else "constant"
        part = np.pad(part, ((0, 0), (0, chunk_size - chunk_len)), mode=pad_mode)
        batch_data.append(part)
        batch_locations.append((i, chunk_len))
        i += step
        if len(batch_data) >= batch_size or i >= mix.shape[1]:
            x = model(np.stack(batch_data))
            if result is None:
                result = np.zeros((x.shape[1],) + mix.shape, dtype=np.float32)
                counter = np.zeros_like(result)
            w = window.copy()
            if i - step == 0:
                w[:fade] = 1
            elif i >= mix.shape[1]:
                w[-fade:] = 1
            for j, (start, seg_len) in enumerate(batch_locations):
                result[..., start:start + seg_len] += x[j, ..., :seg_len] * w[:seg_len]
                counter[..., start:start + seg_len] += w[:seg_len]
            batch_data.clear()
            batch_locations.clear()
    with np.errstate(invalid="ignore", divide="ignore"):
        est = result / counter
    est = np.nan_to_num(est, nan=0.0)
    if length_init > 2 * border and border > 0:
        est = est[..., border:-border]
    return est


def runner(x):
    """A position-dependent, nonlinear stand-in for a model: (B, C, T) -> (B, 2, C, T)."""
    t = np.arange(x.shape[-1], dtype=np.float32)
    a = np.tanh(2 * x) * (1 + 0.5 * np.sin(t / 7))
    b = x * (0.2 + t / x.shape[-1]) + 0.01
    return np.stack([a, b], axis=1).astype(np.float32)


CASES = [
    # (length, chunk, num_overlap)
    (5000, 1000, 2), (5000, 1000, 4), (4321, 999, 3), (1500, 1000, 2), (900, 1000, 2), (400, 1000, 2),
    (1000, 1000, 2), (2000, 1000, 2), (7777, 1000, 1), (1000, 1000, 1), (3, 1000, 4), (1, 100, 2), (2601, 1000, 2),
]


@pytest.mark.parametrize("length,chunk,overlap", CASES)
def test_demix_matches_msst_loop_batch_1(length, chunk, overlap):
    rng = np.random.default_rng(length)
    mix = rng.uniform(-1, 1, (2, length)).astype(np.float32)
    ref = msst_loop(mix, runner, chunk, overlap, batch_size=1)
    out = demix(mix, runner, chunk, overlap, batch_size=1)
    assert out.shape == (2, 2, length) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # Batching does not change the result: per-chunk fade semantics, same arithmetic.
    for bs in (2, 4, 64):
        assert np.array_equal(demix(mix, runner, chunk, overlap, batch_size=bs), out)


def test_msst_batching_changes_its_own_result():
    """Why the per-chunk rule: MSST with batch_size 4 fades the first chunk in and the last batch out."""
    mix = np.random.default_rng(0).uniform(-1, 1, (2, 9000)).astype(np.float32)
    a = msst_loop(mix, runner, 1000, 2, batch_size=1)
    b = msst_loop(mix, runner, 1000, 2, batch_size=4)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(demix(mix, runner, 1000, 2, batch_size=4), a, rtol=1e-5, atol=1e-6)


def test_plan_is_plain_ints_and_round_trips():
    plan = plan_chunks(44100 * 3 + 17, 352800 // 40, 2)
    d = plan.to_dict()
    for chunk in d["chunks"]:
        assert all(type(v) is int for v in chunk.values())
    assert all(type(v) is int for k, v in d.items() if k != "chunks")
    assert MsstPlan.from_dict(d) == plan
    assert plan.chunks[0].fade_in == 0 and plan.chunks[-1].fade_out == 0
    assert all(c.fade_in == 1 for c in plan.chunks[1:]) and all(c.fade_out == 1 for c in plan.chunks[:-1])
    assert plan.pad == plan.border == plan.chunk_size - plan.step


def test_plan_examples():
    p = plan_chunks(5000, 1000, 2)
    assert (p.step, p.fade, p.border, p.pad, p.padded_length) == (500, 100, 500, 500, 6000)
    assert [c.start for c in p.chunks] == list(range(0, 6000, 500))
    assert [c.length for c in p.chunks][-3:] == [1000, 1000, 500]
    short = plan_chunks(900, 1000, 2)           # not padded: L <= 2 * border
    assert short.pad == 0 and [c.length for c in short.chunks] == [900, 400]


def _streamed(acc, plan, mix, order):
    """Add chunks in `order`, popping finished samples after each; returns the concatenated output."""
    blocks = []
    for i in order:
        c = plan.chunks[i]
        lo, hi = source_span(plan, c)
        x = read_chunk(mix[:, lo:hi], plan, c, offset=lo)      # a worker reads only its span
        assert np.array_equal(x, read_chunk(mix, plan, c))
        acc.add(c.index, runner(x[None])[0])
        blocks.append(acc.pop_ready())
    blocks.append(acc.finish())
    return np.concatenate(blocks, axis=-1)


@pytest.mark.parametrize("length,chunk,overlap", [(5000, 1000, 2), (4321, 999, 3), (900, 1000, 2)])
def test_overlap_add_any_order_streams_the_whole_result(length, chunk, overlap):
    rng = np.random.default_rng(1)
    mix = rng.uniform(-1, 1, (2, length)).astype(np.float32)
    plan = plan_chunks(length, chunk, overlap)
    expected = demix(mix, runner, chunk, overlap)
    assert np.array_equal(expected, msst_loop(mix, runner, chunk, overlap))
    acc = MsstOverlapAdd(plan, 2, 2)
    out = _streamed(acc, plan, mix, rng.permutation([c.index for c in acc.chunks]))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # any order: sums in another order
    ordered = MsstOverlapAdd(plan, 2, 2)
    assert np.array_equal(_streamed(ordered, plan, mix, [c.index for c in ordered.chunks]), expected)
    with pytest.raises(ValueError, match="not pending"):
        acc.add(plan.chunks[0], runner(read_chunk(mix, plan, plan.chunks[0])[None])[0])


@pytest.mark.parametrize("length,chunk,overlap,cuts", [(5000, 1000, 2, [1234, 3000]), (4321, 999, 3, [17]),
                                                       (9000, 1000, 4, [4500, 4501, 8999])])
def test_spans_concatenate_to_the_whole_track(length, chunk, overlap, cuts):
    """A long track split into spans, each done alone with only the chunks touching it: bitwise the whole result."""
    rng = np.random.default_rng(2)
    mix = rng.uniform(-1, 1, (2, length)).astype(np.float32)
    plan = plan_chunks(length, chunk, overlap)
    bounds = [0, *cuts, length]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc = MsstOverlapAdd(plan, 2, 2, span=(a, b))
        assert len(acc.chunks) < len(plan.chunks) or len(bounds) == 2
        parts.append(_streamed(acc, plan, mix, [c.index for c in acc.chunks]))
        assert parts[-1].shape[-1] == b - a
    assert np.array_equal(np.concatenate(parts, axis=-1), demix(mix, runner, chunk, overlap))


def test_overlap_add_refuses_incomplete_and_bad_reads():
    mix = np.zeros((2, 5000), np.float32)
    plan = plan_chunks(5000, 1000, 2)
    acc = MsstOverlapAdd(plan, 1, 2)
    acc.add(plan.chunks[0], np.zeros((1, 2, 1000), np.float32))
    with pytest.raises(ValueError, match="not added"):
        acc.finish()
    with pytest.raises(ValueError, match="needs track samples"):
        read_chunk(mix[:, :100], plan, plan.chunks[3], offset=0)
    with pytest.raises(ValueError, match="shape"):
        acc.add(plan.chunks[1], np.zeros((2, 2, 1000), np.float32))
    with pytest.raises(ValueError, match="not inside"):
        MsstOverlapAdd(plan, 1, 2, span=(4000, 6000))


def test_identity_model_reconstructs_mix():
    mix = np.random.default_rng(2).uniform(-1, 1, (2, 12345)).astype(np.float32)
    out = demix(mix, lambda x: x[:, None], 2000, 4, batch_size=3)
    np.testing.assert_allclose(out[0], mix, atol=1e-6)


def test_stems_rule():
    assert model_sources(["vocals", "other"], "vocals") == ["vocals"]
    assert model_sources(["vocals", "other"], None) == ["vocals", "other"]
    assert output_stems(["vocals", "other"], "vocals") == ["vocals", "other"]
    assert output_stems(["vocals", "drums", "bass", "other"], "vocals") == ["vocals", "instrumental"]
    assert output_stems(["drums", "bass"], None) == ["drums", "bass"]
    assert complement_name(["other", "vocals"], "vocals") == "other"

    rng = np.random.default_rng(3)
    mix = rng.uniform(-1, 1, (2, 100)).astype(np.float32)
    vocals = rng.uniform(-1, 1, (1, 2, 100)).astype(np.float32)
    names, stems = add_complement(mix, vocals, ["vocals", "other"], "vocals")
    assert names == ["vocals", "other"]
    np.testing.assert_allclose(stems[0], vocals[0])
    np.testing.assert_allclose(stems[1], mix - vocals[0], atol=1e-7)
    two = rng.uniform(-1, 1, (2, 2, 100)).astype(np.float32)
    names, stems = add_complement(mix, two, ["vocals", "other"], None)
    assert names == ["vocals", "other"] and stems.shape == (2, 2, 100)
    with pytest.raises(ValueError):
        add_complement(mix, two, ["vocals", "other"], "vocals")


def test_no_torch_import():
    code = "import sys, ripper_dist.msst_chunking; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
