"""fp16 graphs (ripper_export.fp16): fp32 I/O, what runs in fp16 vs fp32, metadata, and SDR against the fp32 graph.

Thresholds come from `python -m ripper_export.fp16` on a 2-core AVX-512 CPU (ORT CPU provider), music-like input:
small htdemucs 64.5 dB (naive whole-graph conversion 1.0 dB; without the staged-sum GroupNorm scopes 9 dB,
without the prologue 1.3 dB), small Mel-Band RoFormer 69 dB, small BS-RoFormer 65 dB. htdemucs must reach 50 dB,
well below ours and far above any conversion that drops one of the fp32 rules. The tiny RoFormers are forgiving
(naive about 60 dB: their random activations are too small to overflow), so they must reach 60 dB and their
fp32 rules are checked structurally.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from ripper_export.fp16 import (
    COMPUTE_OPS, _scope, fp16_sdr, fp32_nodes, music_like, node_precisions, precision_summary, to_fp16)
from ripper_export.onnx_export import export_demucs
from ripper_export.random_demucs import make_htdemucs_checkpoint
from ripper_export.random_roformer import make_roformer_checkpoint
from ripper_export.roformer_export import export_roformer

SDR_MIN = {"htdemucs": 50.0, "mel_band_roformer": 60.0, "bs_roformer": 60.0}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    out = {}
    export_demucs(make_htdemucs_checkpoint(d / "small.th", size="small"), d / "htdemucs.onnx")
    out["htdemucs"] = onnx.load(str(d / "htdemucs.onnx"))
    for family in ("mel_band_roformer", "bs_roformer"):
        cfg, ckpt = make_roformer_checkpoint(d / family, family)
        export_roformer(cfg, ckpt, d / f"{family}.onnx", family=family, check_reference=False)
        out[family] = onnx.load(str(d / f"{family}.onnx"))
    return out


@pytest.fixture(scope="module")
def converted(graphs):
    return {family: to_fp16(m) for family, m in graphs.items()}


def _meta(m):
    return {p.key: p.value for p in m.metadata_props}


def _mix(m, batch=1, seed=0):
    meta = _meta(m)
    return music_like(batch, int(meta["ripper.channels"]), int(meta["ripper.chunk_samples"]), seed=seed)


FAMILIES = ["htdemucs", "mel_band_roformer", "bs_roformer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_io_metadata_and_validity(graphs, converted, family):
    m32, m16 = graphs[family], converted[family]
    onnx.checker.check_model(m16)
    for v in list(m16.graph.input) + list(m16.graph.output):
        assert v.type.tensor_type.elem_type == TensorProto.FLOAT, v.name
    assert [i.name for i in m16.graph.input] == ["mix"] and [o.name for o in m16.graph.output] == ["stems"]
    meta32, meta16 = _meta(m32), _meta(m16)
    assert meta16.pop("ripper.precision") == "fp16"
    assert meta16 == meta32 and meta16["ripper.family"] == family
    assert "ripper.precision" not in meta32  # the input model is left alone
    sess = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["ripper.precision"] == "fp16"
    mix = _mix(m32, batch=2)
    out = sess.run(None, {"mix": mix})[0]
    assert out.dtype == np.float32 and out.shape[0] == 2 and out.shape[-1] == mix.shape[-1]
    assert np.isfinite(out).all()
    # the fp16 layers' weights are stored in fp16, not cast at run time
    inits = {t.name: t for t in m16.graph.initializer}
    producer = {o: n for n in m16.graph.node for o in n.output}
    prec = node_precisions(m16)
    for n in m16.graph.node:
        if n.op_type in COMPUTE_OPS and prec[n.name] == "fp16" and len(n.input) > 1:
            w = n.input[1]
            if w in inits:
                assert inits[w].data_type == TensorProto.FLOAT16, n.name
            else:
                assert not (producer[w].op_type == "Cast" and producer[w].input[0] in inits), n.name


@pytest.mark.parametrize("family", FAMILIES)
def test_heavy_ops_fp16_sensitive_parts_fp32(converted, family):
    m16 = converted[family]
    prec = node_precisions(m16)
    nodes = list(m16.graph.node)
    heavy = [n for n in nodes if n.op_type in COMPUTE_OPS]
    heavy16 = [n for n in heavy if prec[n.name] == "fp16"]
    assert len(heavy16) >= 0.9 * len(heavy)
    # the fp32 Conv/MatMul are the STFT/ISTFT's real DFT and nothing else
    for n in heavy:
        if prec[n.name] == "fp32":
            assert "/stft/" in n.name or "/istft/" in n.name, n.name
        if "/stft/" in n.name or "/istft/" in n.name:
            assert prec[n.name] == "fp32", n.name
    # reductions, and the whole module scope of a norm written out of them, are fp32
    reductions = [n for n in nodes if n.op_type.startswith("Reduce")]
    assert reductions and all(prec[n.name] == "fp32" for n in reductions)
    norm_scopes = {_scope(n.name) for n in reductions} - {""}
    assert norm_scopes
    for n in nodes:
        if _scope(n.name) in norm_scopes and n.op_type in ("Sub", "Mul", "Div", "Sqrt", "Clip", "Add"):
            assert prec[n.name] == "fp32", n.name
    # measured harmless in fp16, so they run in fp16
    for n in nodes:
        if n.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization", "Erf"):
            assert prec[n.name] == "fp16", n.name
    # the graph output is produced in fp32 (epilogue), not cast up from fp16
    producer = {o: n for n in nodes for o in n.output}
    last = producer["stems"]
    assert not (last.op_type == "Cast" and prec.get(producer.get(last.input[0], last).name) == "fp16")
    s = precision_summary(m16)
    assert sum(s["fp16"].values()) > 0 and sum(s["fp32"].values()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sdr_against_fp32(graphs, converted, family):
    mix = _mix(graphs[family], seed=1)
    sdr = fp16_sdr(graphs[family], converted[family], mix)
    assert sdr >= SDR_MIN[family], sdr
    assert sdr < 120  # really fp16 (an fp32 graph would agree to ~inf)


def test_naive_conversion_fails_the_htdemucs_threshold(graphs):
    """The threshold means something: converting every node (the converter's default) loses the signal."""
    m32 = graphs["htdemucs"]
    naive = to_fp16(m32, naive=True)
    assert all(p != "fp32" for p in node_precisions(naive).values())
    assert fp16_sdr(m32, naive, _mix(m32, seed=1)) < SDR_MIN["htdemucs"] - 20


def test_block_list_is_rule_based_and_extensible(graphs):
    m32 = graphs["htdemucs"]
    blocked = fp32_nodes(m32)
    names = {n.name for n in m32.graph.node}
    assert blocked <= names
    # prologue/epilogue: the input normalisation and the final sum; no weight Identity is blocked
    dynamic_first = [n for n in m32.graph.node if "mix" in n.input]
    assert all(n.name in blocked for n in dynamic_first)
    assert all(n.name in blocked for n in m32.graph.node if "stems" in n.output)
    # an extra node kept fp32 on request
    conv = next(n for n in m32.graph.node if n.op_type == "Conv")
    prec = node_precisions(to_fp16(m32, extra_fp32_nodes=[conv.name]))
    assert prec[conv.name] == "fp32"


def test_refuses_fp16_input_and_unknown_family(graphs, converted):
    with pytest.raises(ValueError, match="already fp16"):
        to_fp16(converted["htdemucs"])
    m = onnx.ModelProto()
    m.CopyFrom(graphs["mel_band_roformer"])
    for p in m.metadata_props:
        if p.key == "ripper.family":
            p.value = "other"
    with pytest.raises(ValueError, match="ripper.family"):
        to_fp16(m)
