"""`--explain`: Demucs writes each stem's time- and spectral-branch terms (they sum to the stem, the stem still equals
upstream), RoFormer each stem's per-band masks (equal to the torch model's on the same chunks); the side files also
travel through span parts (the Ray job's path)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from explained import explained
from ripper_dist.onnx_model import read_info
from ripper_dist.parts import TrackParts
from ripper_dist.stem_sink import StemOutput, StemSink
from upstream import sdr_db, upstream_stems

STEMS = ("drums", "bass", "other", "vocals")


def test_demucs_branches_sum_to_the_stems_which_equal_upstream(tmp_path_factory):
    ex = explained(tmp_path_factory)
    row = pd.read_parquet(ex.demucs / "metadata.parquet").iloc[0]
    assert row.engine == "ray"
    paths = dict(row.stem_paths)
    assert sorted(paths) == sorted([*STEMS, *(f"{s}.time" for s in STEMS), *(f"{s}.spec" for s in STEMS)])
    ref = upstream_stems(ex.track, repo=ex.repo, name="tiny")
    for s in STEMS:
        stem, t, p = (sf.read(ex.demucs / paths[k], dtype="float64")[0] for k in (s, f"{s}.time", f"{s}.spec"))
        assert sdr_db(ref[s], stem) >= 60, s                 # the explanation graph's output is the model's
        assert sdr_db(stem, t + p) >= 60, s                  # the two terms sum to the stem
        assert sdr_db(stem, t) < 30 and sdr_db(stem, p) < 30, s  # and each is only part of it
    graph = next((ex.cache / "onnx" / "htdemucs").rglob("model.onnx"))
    meta = read_info(graph).raw
    assert meta["ripper.explain"] == "branches" and float(meta["ripper.explain_sum_sdr_db"]) >= 60


def test_roformer_band_masks_equal_the_torch_model(tmp_path_factory):
    from ripper_dist.msst_chunking import plan_chunks, read_chunk
    from ripper_export.roformer import build_roformer, read_checkpoint
    from ripper_export.roformer_config import load_roformer_config
    ex = explained(tmp_path_factory)
    row = pd.read_parquet(ex.roformer / "metadata.parquet").iloc[0]
    paths = dict(row.stem_paths)
    assert sorted(paths) == ["other", "vocals", "vocals.masks"]  # the complement has no mask of its own
    got = np.load(ex.roformer / paths["vocals.masks"])
    cfg = load_roformer_config(ex.config)
    model = build_roformer("mel_band_roformer", cfg.model, read_checkpoint(ex.ckpt))
    model.explain = True
    hop = model.spec.stft_hop_length
    mix = sf.read(ex.track, dtype="float32", always_2d=True)[0].T
    length = mix.shape[1]
    assert got.shape == (model.num_bands, length // hop + 1)
    plan = plan_chunks(length, cfg.chunk_size, cfg.num_overlap)
    acc = {}
    with torch.no_grad():  # every chunk in one batch
        _, masks = model(torch.from_numpy(np.stack([read_chunk(mix, plan, c) for c in plan.chunks])))
    for c, m in zip(plan.chunks, masks.numpy()):
        for j in range(m.shape[-1]):
            pos = c.start - plan.pad + j * hop
            if j * hop < c.length and pos >= 0 and round(pos / hop) < got.shape[1]:
                acc.setdefault(round(pos / hop), []).append(m[0, :, j])
    want = np.stack([np.mean(acc[f], axis=0) for f in range(got.shape[1])], axis=1)
    assert sdr_db(want, got) >= 60
    assert got.std() > 0  # not a constant


def test_side_arrays_travel_through_span_parts(tmp_path):
    parts = TrackParts(tmp_path / "parts", "song", 1)
    w = parts.writer(0)
    w.write(np.ones((1, 2, 10), np.float32))
    masks = np.arange(12, dtype=np.float32).reshape(3, 4)
    w.side("masks", {"vocals": masks})
    w.close()
    sink = StemSink({"vocals": tmp_path / "out" / "vocals.wav"}, model_rate=44100, in_rate=44100, frames=10,
                    input_channels=2, model_channels=2, output=StemOutput("wav", "FLOAT", "none"))
    for block in parts.blocks(1, 2):
        sink.write(block)
    for name, arrays in parts.sides():
        sink.side(name, arrays)
    paths = sink.close()
    assert json.dumps(sorted(paths)) == '["vocals", "vocals.masks"]'
    np.testing.assert_array_equal(np.load(paths["vocals.masks"]), masks)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
