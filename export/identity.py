"""A trivial graph in the real ONNX contract (input `mix` (B, C, T) -> output `stems` (B, S, C, T), `ripper.*`
metadata): each source is the mix times a constant gain. Inference costs next to nothing, so a job run on it
measures the pipeline around the model (`jobs/bench.py pipeline`, memory tests on very long tracks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SOURCES = ("drums", "bass", "other", "vocals")


def make_identity_graph(path: Path, *, chunk_samples: int = 343980, sample_rate: int = 44100, channels: int = 2,
                        sources=SOURCES, family: str = "htdemucs", metadata: dict | None = None) -> Path:
    """Write the graph to `path` (a Demucs-family graph by default; its segment is the chunk length). metadata:
    more `ripper.*` entries (e.g. a RoFormer's `ripper.instruments` and `ripper.target_instrument`)."""
    gains = np.linspace(0.1, 0.4, len(sources), dtype=np.float32).reshape(1, len(sources), 1, 1)
    nodes = [helper.make_node("Unsqueeze", ["mix", "axis"], ["mix1"]),
             helper.make_node("Mul", ["mix1", "gains"], ["stems"])]
    graph = helper.make_graph(
        nodes, "identity",
        [helper.make_tensor_value_info("mix", TensorProto.FLOAT, ["batch", channels, chunk_samples])],
        [helper.make_tensor_value_info("stems", TensorProto.FLOAT, ["batch", len(sources), channels, chunk_samples])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axis"),
                     numpy_helper.from_array(gains, "gains")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {
        "ripper.family": family, "ripper.sources": json.dumps(list(sources)),
        "ripper.sample_rate": str(sample_rate), "ripper.channels": str(channels),
        "ripper.chunk_samples": str(chunk_samples), "ripper.segment_samples": str(chunk_samples),
        "ripper.export_version": "identity", "ripper.checkpoint_sha256": "identity", **(metadata or {})})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
