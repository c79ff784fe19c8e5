"""The wire-format metadata reader against onnx's own parser, and its refusals."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ripper_dist.onnx_metadata import MetadataError, metadata_props
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
