import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ripper_export.random_demucs import SOURCES_4, SOURCES_6, htdemucs_kwargs, make_htdemucs_checkpoint  # noqa: E402

from ripper_dist.export_cache import EXPORT_VERSION  # noqa: E402
from ripper_export.htdemucs import OnnxHTDemucs, UnsupportedModelError  # noqa: E402
from ripper_export.onnx_export import (  # noqa: E402
    ParityError, export_demucs, htdemucs_metadata, ort_run, read_metadata, sdr_db, set_metadata)
from ripper_export.safe_load import build_demucs_model, load_demucs_package, sha256_file  # noqa: E402

SEG = 52920  # small fixture segment: 6/5 s at 44100 Hz


def _model(path):
    return build_demucs_model(load_demucs_package(path))


def _upstream(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {
        4: make_htdemucs_checkpoint(d / "small4.th", sources=4, seed=0),
        6: make_htdemucs_checkpoint(d / "small6.th", sources=6, seed=1),
    }


_PROGRESS: dict = {}  # the export progress lines of exported4, by its path


@pytest.fixture(scope="module")
def exported4(ckpts, tmp_path_factory):
    import io
    out = tmp_path_factory.mktemp("onnx4") / "htdemucs.onnx"
    lines = io.StringIO()
    meta = export_demucs(ckpts[4], out, metadata={"ripper.model_name": "unit"}, progress=lines)
    _PROGRESS[out] = lines.getvalue()
    return out, meta


def test_export_says_what_it_is_doing(exported4):
    """One line per step as it starts, numbered k/5, with the elapsed time; then where the graph went."""
    out, meta = exported4
    lines = _PROGRESS[out].splitlines()
    assert [ln.split("]")[0] for ln in lines[:5]] == [f"export [{k}/5" for k in range(1, 6)]
    assert "tracing" in lines[1] and "reference" in lines[2] and "parity" in lines[3]
    assert f"parity {float(meta['ripper.parity_sdr_db']):.1f} dB" in lines[4]
    assert lines[5].startswith("export done: ") and str(out) in lines[5]
    seconds = [float(ln.rsplit("(", 1)[1].split(" s)")[0]) for ln in lines]
    assert seconds == sorted(seconds)


# ---------------------------------------------------------------- torch-side wrapper, no ONNX
@pytest.mark.parametrize("sources,chunk,batch", [(4, None, 2), (6, None, 1), (4, 30000, 1)])
def test_wrapper_matches_upstream_in_torch(ckpts, sources, chunk, batch):
    model = _model(ckpts[sources])
    wrapper = OnnxHTDemucs(model, chunk)
    x = np.random.default_rng(0).standard_normal((batch, 2, chunk or SEG)).astype(np.float32)
    with torch.no_grad():
        out = wrapper(torch.from_numpy(x)).numpy()
    ref = _upstream(model, x)
    assert out.shape == ref.shape == (batch, sources, 2, chunk or SEG)
    assert sdr_db(ref, out) > 100


def test_wrapper_leaves_reference_model_untouched(ckpts):
    model = _model(ckpts[4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    OnnxHTDemucs(model)
    assert kinds == [type(m) for m in model.modules()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_refuses_unsupported_configurations():
    from demucs.htdemucs import HTDemucs

    def build(**over):
        kw = htdemucs_kwargs("small")
        kw.update(over)
        return HTDemucs(**kw).eval()

    with pytest.raises(UnsupportedModelError, match="cac"):
        OnnxHTDemucs(build(cac=False))
    with pytest.raises(UnsupportedModelError, match="random_shift"):
        OnnxHTDemucs(build(t_sin_random_shift=2))
    with pytest.raises(ValueError, match="longer than"):
        OnnxHTDemucs(build(), SEG + 1)


# ---------------------------------------------------------------- ONNX export + ONNX Runtime
def test_export_4_sources_parity_dynamic_batch(ckpts, exported4):
    out, meta = exported4
    model = _model(ckpts[4])
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 2, SEG)).astype(np.float32)
        est = ort_run(out, {"mix": x})[0]
        assert est.shape == (batch, 4, 2, SEG)
        sdr = sdr_db(_upstream(model, x), est)
        print(f"4 sources batch {batch}: {sdr:.1f} dB")
        assert sdr >= 60
    assert float(meta["ripper.parity_sdr_db"]) >= 60


def test_export_metadata_and_graph_contract(ckpts, exported4):
    import onnx

    out, meta = exported4
    stored = read_metadata(out)
    assert stored == meta
    assert stored["ripper.family"] == "htdemucs"
    assert json.loads(stored["ripper.sources"]) == SOURCES_4
    assert stored["ripper.sample_rate"] == "44100"
    assert stored["ripper.channels"] == "2"
    assert stored["ripper.chunk_samples"] == str(SEG)
    assert stored["ripper.segment_samples"] == str(SEG)
    assert stored["ripper.export_version"] == EXPORT_VERSION
    assert json.loads(stored["ripper.export_options"])["opset"] == 17
    assert stored["ripper.checkpoint_sha256"] == sha256_file(ckpts[4])
    assert stored["ripper.model_name"] == "unit"
    graph = onnx.load(str(out), load_external_data=False).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in graph.input] == ["mix"] and [o.name for o in graph.output] == ["stems"]
    assert dims(graph.input[0]) == ["batch", 2, SEG]
    assert dims(graph.output[0]) == ["batch", 4, 2, SEG]
    assert sorted(os.listdir(out.parent)) == [out.name]  # atomic: no temp files left behind


def test_set_metadata_replaces_and_adds(exported4, tmp_path):
    import shutil

    out, meta = exported4
    copy = tmp_path / "copy.onnx"
    shutil.copy(out, copy)
    set_metadata(copy, {"ripper.export_version": "9", "extra": {"a": [1, 2]}}, shapes={"stems": ["n", 4, 2, SEG]})
    stored = read_metadata(copy)
    import onnx
    out_dims = onnx.load(str(copy)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out_dims] == ["n", 4, 2, SEG]
    assert stored["ripper.export_version"] == "9"
    assert json.loads(stored["extra"]) == {"a": [1, 2]}
    assert stored["ripper.family"] == "htdemucs"


def test_export_6_sources_no_bottom_channels(ckpts, tmp_path):
    model = _model(ckpts[6])
    assert model.bottom_channels == 0 and len(model.sources) == 6
    out = tmp_path / "six.onnx"
    meta = export_demucs(model, out, check_batch=1)
    assert json.loads(meta["ripper.sources"]) == SOURCES_6
    assert "ripper.checkpoint_sha256" not in meta  # a module has no file to hash
    x = np.random.default_rng(2).standard_normal((3, 2, SEG)).astype(np.float32)
    est = ort_run(out, {"mix": x})[0]
    assert est.shape == (3, 6, 2, SEG)
    sdr = sdr_db(_upstream(model, x), est)
    print(f"6 sources batch 3: {sdr:.1f} dB; export check {meta['ripper.parity_sdr_db']} dB")
    assert sdr >= 60


def test_export_chunk_shorter_than_segment_and_parity_error(ckpts, tmp_path):
    """A 30000-sample graph (upstream pads to the 52920 training length and crops) checked at batch 2 against
    upstream; an impossible threshold turns the measured SDR into a ParityError and no file is left behind."""
    out = tmp_path / "short.onnx"
    with pytest.raises(ParityError) as info:
        export_demucs(load_demucs_package(ckpts[4]), out, chunk_samples=30000, min_parity_db=1e9)
    print(f"short chunk batch 2: {info.value.sdr:.1f} dB")
    assert info.value.sdr >= 60
    assert not out.exists() and os.listdir(tmp_path) == []


def test_metadata_for_short_chunk(ckpts):
    meta = htdemucs_metadata(_model(ckpts[4]), 30000, opset=17, parity_sdr_db=99.123, extra={"k": [1]})
    assert meta["ripper.chunk_samples"] == "30000" and meta["ripper.segment_samples"] == str(SEG)
    assert meta["ripper.parity_sdr_db"] == "99.12" and meta["k"] == "[1]"
    assert "ripper.checkpoint_sha256" not in meta


def test_released_size_export(tmp_path):
    """Released htdemucs kwargs (42M params, 7.8 s chunk): export + parity + one ORT run."""
    t0 = time.perf_counter()
    ckpt = make_htdemucs_checkpoint(tmp_path / "rel.th", size="released")
    out = tmp_path / "rel.onnx"
    meta = export_demucs(ckpt, out, check_batch=1)
    t1 = time.perf_counter()
    x = np.random.default_rng(4).standard_normal((1, 2, 343980)).astype(np.float32)
    est = ort_run(out, {"mix": x})[0]
    t2 = time.perf_counter()
    print(f"released: export+parity {t1 - t0:.1f} s ({meta['ripper.parity_sdr_db']} dB), ORT run {t2 - t1:.1f} s")
    assert est.shape == (1, 4, 2, 343980)
    assert meta["ripper.chunk_samples"] == "343980"
    assert float(meta["ripper.parity_sdr_db"]) >= 60
