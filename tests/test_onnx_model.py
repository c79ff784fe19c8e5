"""ONNX Runtime sessions: metadata read back from the graph, runner protocol, no silent CPU fallback."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ripper_dist.onnx_model import GraphInfo, OnnxRunner, ProviderError, make_session, parse_device, read_info

META = {"ripper.family": "htdemucs", "ripper.sources": json.dumps(["a", "b"]), "ripper.sample_rate": "44100",
        "ripper.channels": "2", "ripper.chunk_samples": "16", "ripper.segment_samples": "12"}


def _graph(meta=META) -> bytes:
    """stems[:, 0] = mix, stems[:, 1] = 2 * mix: (B, 2, 16) -> (B, 2, 2, 16)."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Unsqueeze", ["mix", "axes"], ["a"]),
             helper.make_node("Mul", ["a", "two"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["stems"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["batch", 2, 16])],
                          [helper.make_tensor_value_info("stems", TensorProto.FLOAT, ["batch", 2, 2, 16])],
                          initializer=[two, axes])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return m.SerializeToString()


def test_runner_and_metadata(tmp_path):
    path = tmp_path / "g.onnx"
    path.write_bytes(_graph())
    info = read_info(path)
    assert info == read_info(path.read_bytes())
    assert info.sources == ("a", "b") and info.chunk_samples == 16 and info.segment_samples == 12
    runner = OnnxRunner(path, "cpu", threads=1)
    x = np.random.default_rng(0).standard_normal((3, 2, 16)).astype(np.float32)
    y = runner(x)
    assert y.shape == (3, 2, 2, 16) and np.allclose(y[:, 1], 2 * x)


def test_graph_without_metadata_is_refused():
    with pytest.raises(ValueError, match="ripper metadata"):
        GraphInfo.from_metadata({})


def test_gpu_request_never_falls_back_to_cpu_silently():
    """On a machine without a usable GPU, asking for CUDA/TensorRT is an error that says so."""
    for device in ("cuda", "cuda:1", "tensorrt"):
        with pytest.raises(ProviderError, match="ExecutionProvider"):
            make_session(_graph(), device)


def test_parse_device():
    assert parse_device("cuda:2") == ("cuda", 2) and parse_device("cpu") == ("cpu", 0)
    with pytest.raises(ValueError):
        parse_device("tpu")
