"""RoFormer -> ONNX: parity, graph contents, metadata, external data, and MSST chunking end to end."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch


from ripper_export.random_roformer import SMALL_CHUNK, make_roformer_checkpoint  # noqa: E402
from ripper_dist.msst_chunking import add_complement, demix  # noqa: E402
from ripper_dist.export_cache import EXPORT_VERSION  # noqa: E402
from ripper_dist.onnx_model import GraphInfo  # noqa: E402
from ripper_export.roformer import build_roformer, read_checkpoint  # noqa: E402
from ripper_export.roformer_config import load_roformer_config  # noqa: E402
from ripper_export.roformer_export import (  # noqa: E402
    FORBIDDEN_OPS, ParityError, export_roformer, export_roformer_model, graph_op_types, sdr_db,
)

pytest.importorskip("bs_roformer")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family,wrap,num_stems,stereo", [
    ("mel_band_roformer", None, 1, True),
    ("bs_roformer", "lightning", 2, False),
    ("mel_band_roformer", "state_dict", 2, False),
    ("bs_roformer", None, 1, True),
])
def test_export_parity_graph_and_metadata(tmp_path, family, wrap, num_stems, stereo):
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, family, wrap=wrap, num_stems=num_stems, stereo=stereo)
    out = tmp_path / "out" / "model.onnx"
    res = export_roformer(cfg_path, ckpt, out, family=family,
                          metadata={"ripper.checkpoint_sha256": "ab" * 32, "ripper.export_options": '{"x": 1}'})
    assert res["parity_sdr_db"] >= 60 and res["parity_sdr_db_torch"] >= 60
    assert res["parity_sdr_db_reference"] >= 60 and res["torch_vs_reference_sdr_db"] >= 60
    assert out.exists() and res["external_data"] is None
    assert not (out.parent / "model.onnx.data").exists()
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob("roformer-export-*"))

    ops = graph_op_types(out)
    assert not ops & FORBIDDEN_OPS
    assert not {op for op in ops if "Scatter" in op}
    assert "Softmax" in ops and "MatMul" in ops

    sess = _session(out)
    meta = sess.get_modelmeta().custom_metadata_map
    info = GraphInfo.from_metadata(meta)
    channels = 2 if stereo else 1
    cfg = load_roformer_config(cfg_path)
    assert info.family == family and info.sample_rate == 44100 and info.channels == channels
    assert info.chunk_samples == SMALL_CHUNK and list(info.sources) == list(cfg.sources)
    assert meta["ripper.export_version"] == EXPORT_VERSION
    assert meta["ripper.checkpoint_sha256"] == "ab" * 32 and meta["ripper.export_options"] == '{"x": 1}'
    assert float(meta["ripper.parity_sdr_db"]) >= 60
    assert meta["ripper.num_overlap"] == "2" and meta["ripper.batch_size"] == "2"
    assert json.loads(meta["ripper.instruments"]) == list(cfg.instruments)
    assert meta["ripper.target_instrument"] == (cfg.target_instrument or "")

    # Dynamic batch: a batch of 3 equals the torch model.
    ins, outs = sess.get_inputs()[0], sess.get_outputs()[0]
    assert ins.name == "mix" and outs.name == "stems"
    assert ins.shape[1:] == [channels, SMALL_CHUNK] and outs.shape[1:] == [num_stems, channels, SMALL_CHUNK]
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, channels, SMALL_CHUNK)).astype(np.float32)
    y = sess.run(None, {"mix": x})[0]
    model = build_roformer(family, cfg.model, read_checkpoint(ckpt))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert y.shape == (3, num_stems, channels, SMALL_CHUNK)
    assert sdr_db(ref, y) >= 60


def test_external_data(tmp_path):
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, "mel_band_roformer")
    out = tmp_path / "ext" / "model.onnx"
    res = export_roformer(cfg_path, ckpt, out, family="mel_band_roformer", external_data_threshold=0)
    data = out.parent / "model.onnx.data"
    assert res["external_data"] == data and data.exists()
    assert data.stat().st_size > out.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = np.zeros((1, 2, SMALL_CHUNK), np.float32)
    assert _session(out).run(None, {"mix": x})[0].shape == (1, 1, 2, SMALL_CHUNK)
    # Re-export as a single file: the stale data file goes away.
    export_roformer(cfg_path, ckpt, out, family="mel_band_roformer")
    assert not data.exists()
    assert _session(out).run(None, {"mix": x})[0].shape == (1, 1, 2, SMALL_CHUNK)


def test_parity_failure_raises_and_writes_nothing(tmp_path):
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, "bs_roformer")
    cfg = load_roformer_config(cfg_path)
    model = build_roformer("bs_roformer", cfg.model, read_checkpoint(ckpt))

    def wrong_reference(mix):
        with torch.no_grad():
            return model(mix) * 1.01                                # 40 dB off

    out = tmp_path / "bad" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(ParityError, match="parity below 60"):
        export_roformer_model(model, out, chunk_samples=SMALL_CHUNK, reference=wrong_reference)
    assert list(out.parent.iterdir()) == []


def test_family_mismatch(tmp_path):
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, "mel_band_roformer")
    with pytest.raises(ValueError, match="looks like mel_band_roformer"):
        export_roformer(cfg_path, ckpt, tmp_path / "m.onnx", family="bs_roformer")


def test_msst_demix_with_onnx_matches_torch(tmp_path):
    """The runtime path: MSST chunking + ORT graph + complement stem, against the same with the torch model."""
    cfg_path, ckpt = make_roformer_checkpoint(tmp_path, "mel_band_roformer", target_instrument="vocals")
    out = tmp_path / "model.onnx"
    export_roformer(cfg_path, ckpt, out, family="mel_band_roformer")
    cfg = load_roformer_config(cfg_path)
    sess = _session(out)
    model = build_roformer("mel_band_roformer", cfg.model, read_checkpoint(ckpt))

    def torch_runner(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    mix = np.random.default_rng(5).uniform(-0.5, 0.5, (2, 3 * SMALL_CHUNK + 123)).astype(np.float32)
    ours = demix(mix, lambda x: sess.run(None, {"mix": x})[0], cfg.chunk_size, cfg.num_overlap, cfg.batch_size)
    ref = demix(mix, torch_runner, cfg.chunk_size, cfg.num_overlap, 1)
    assert ours.shape == (1, 2, mix.shape[-1]) and sdr_db(ref, ours) >= 60
    names, stems = add_complement(mix, ours, cfg.instruments, cfg.target_instrument)
    assert names == ["vocals", "other"]
    np.testing.assert_allclose(stems[0] + stems[1], mix, atol=1e-5)
