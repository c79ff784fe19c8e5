"""The wire-format metadata reader against onnx's own parser, and its refusals; the architecture key: what the graph
computes and how large, never its weight values."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ripper_dist.onnx_metadata import MetadataError, architecture_key, metadata_props
from ripper_export.identity import make_identity_graph


def _model(props: dict[str, str], weights: int = 1000) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(weights, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weights])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weights])], [w])
    m = helper.make_model(graph, producer_name="test", doc_string="a doc string")
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    return m


def _onnx_props(model) -> dict[str, str]:
    proto = onnx.load_model(model, load_external_data=False) if not isinstance(model, bytes) \
        else onnx.load_model_from_string(model)
    return {p.key: p.value for p in proto.metadata_props}


def test_same_as_onnx_for_bytes_and_paths(tmp_path):
    props = {"ripper.family": "htdemucs", "ripper.sources": '["drums", "bass"]', "unicode": "Beyoncé — ♫",
             "empty": "", "long": "x" * 100_000}
    data = _model(props, weights=300_000).SerializeToString()  # a graph field longer than 1 MB comes first
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert metadata_props(data) == _onnx_props(data) == props
    assert metadata_props(path) == _onnx_props(path) == props
    assert metadata_props(str(path)) == props


def test_exported_graph_and_external_data(tmp_path):
    path = make_identity_graph(tmp_path / "identity.onnx", metadata={"ripper.extra": "1"})
    assert metadata_props(path) == _onnx_props(path)
    assert metadata_props(path)["ripper.extra"] == "1"
    m = _model({"k": "v"}, weights=50_000)
    onnx.save_model(m, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    assert metadata_props(tmp_path / "ext.onnx") == {"k": "v"}


def test_repeated_key_last_wins_and_none():
    m = _model({})
    m.metadata_props.add(key="a", value="1")
    m.metadata_props.add(key="a", value="2")
    assert metadata_props(m.SerializeToString()) == _onnx_props(m.SerializeToString()) == {"a": "2"}
    assert metadata_props(_model({}).SerializeToString()) == {}


def test_truncated_or_foreign_bytes_refused(tmp_path):
    data = _model({"k": "v"}, weights=10_000).SerializeToString()
    with pytest.raises(MetadataError):
        metadata_props(data[: len(data) // 2])  # the graph's length prefix runs past the end
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[:-3])
    with pytest.raises(MetadataError):
        metadata_props(path)
    with pytest.raises(MetadataError):
        metadata_props(b"RIFF\x24\x00\x00\x00WAVEfmt ")  # a WAV file handed over as a graph
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert metadata_props(tmp_path / "empty.onnx") == {}


def _net(hidden: int = 8, alpha: float = 0.5, scale: float = 2.0, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(w) -> LeakyRelu(alpha) -> Mul(Constant scale) -> If(flag: Identity | Neg) -> y."""
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((4, hidden)).astype(np.float32), "w")
    out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, [1, hidden])
    then_g = helper.make_graph([helper.make_node("Identity", ["s"], ["branch"])], "then", [], [out])
    else_g = helper.make_graph([helper.make_node("Neg", ["s"], ["branch"])], "else", [], [out])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("LeakyRelu", ["h"], ["a"], alpha=alpha),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([scale], np.float32))),
             helper.make_node("Mul", ["a", "c"], ["s"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_architecture_key_ignores_weights_and_names(tmp_path):
    base = _net()
    key = architecture_key(base.SerializeToString())
    path = tmp_path / "net.onnx"
    onnx.save_model(base, path)
    assert architecture_key(path) == architecture_key(str(path)) == key
    assert architecture_key(_net(seed=1).SerializeToString()) == key  # other weights
    assert architecture_key(_net(scale=3.0).SerializeToString()) == key  # a Constant's value is a weight too
    as_floats = _net()
    w = as_floats.graph.initializer[0]
    values = numpy_helper.to_array(w).ravel().tolist()
    w.ClearField("raw_data")
    w.float_data[:] = values  # the same weights stored in float_data instead of raw_data
    assert architecture_key(as_floats.SerializeToString()) == key
    renamed = _net()
    renamed.graph.node[0].name, renamed.graph.doc_string, renamed.doc_string = "other", "doc", "doc"
    renamed.metadata_props.add(key="ripper.family", value="x")
    assert architecture_key(renamed.SerializeToString()) == key
    onnx.save_model(_net(seed=2), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    assert architecture_key(tmp_path / "ext.onnx") == key  # weights in a side file: only their reference differs


def test_architecture_key_sees_what_is_computed():
    key = architecture_key(_net().SerializeToString())
    changed = {"hidden size": _net(hidden=16), "attribute": _net(alpha=0.1)}
    op = _net()
    op.graph.node[1].op_type = "Relu"
    del op.graph.node[1].attribute[:]
    changed["operator"] = op
    wiring = _net()
    wiring.graph.node[3].input[:] = ["c", "a"]
    changed["wiring"] = wiring
    sub = _net()
    sub.graph.node[4].attribute[1].g.node[0].op_type = "Abs"  # else_branch: Neg -> Abs
    changed["subgraph"] = sub
    opset = _net()
    opset.opset_import[0].version = 18
    changed["opset"] = opset
    const_shape = _net()
    const_shape.graph.node[2].attribute[0].t.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32)))
    changed["constant's shape"] = const_shape
    keys = {what: architecture_key(m.SerializeToString()) for what, m in changed.items()}
    assert all(k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)


def test_architecture_key_of_an_exported_graph_matches_its_file(tmp_path):
    path = make_identity_graph(tmp_path / "identity.onnx", metadata={"ripper.extra": "1"})
    assert architecture_key(path) == architecture_key(path.read_bytes())
    with pytest.raises(MetadataError):
        architecture_key(path.read_bytes()[:-5])
