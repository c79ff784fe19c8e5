"""Exports are cached by checkpoint hash and options: the second run exports nothing."""
import pytest

import ripper_export.onnx_export as onnx_export
from ripper_dist.export_cache import export_demucs_source, graph_problem
from ripper_dist.models import ModelBundle
from ripper_dist.sources import resolve_demucs
from ripper_export.random_demucs import make_bag_repo


def test_second_run_exports_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    repo = make_bag_repo(tmp_path / "repo", "bag", 2, [[1, 0, 0, 1], [0, 1, 1, 0]], size="small")
    first = export_demucs_source(resolve_demucs("bag", repo=repo))
    assert len(first.onnx_paths) == 2 and all(p.exists() for p in first.onnx_paths)

    def refuse(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_demucs", refuse)
    again = export_demucs_source(resolve_demucs("bag", repo=repo))
    assert again.onnx_paths == first.onnx_paths
    bundle = ModelBundle.from_exported(again)
    assert bundle.weights == [[1, 0, 0, 1], [0, 1, 1, 0]] and bundle.sources == ["drums", "bass", "other", "vocals"]
    meta = bundle.info.raw
    assert meta["ripper.checkpoint_sha256"] and float(meta["ripper.parity_sdr_db"]) >= 60
    # a cached graph damaged later (truncated) is never loaded: it is exported again ...
    graph = first.onnx_paths[0]
    good = graph.read_bytes()
    graph.write_bytes(good[:1000])
    with pytest.raises(AssertionError, match="exported again"):
        export_demucs_source(resolve_demucs("bag", repo=repo))
    assert not graph.exists()  # the damaged file is gone, never half used

    # ... and where that is impossible (no torch here), the error names the folder to delete
    def no_torch(*a, **k):
        raise ImportError("No module named 'torch'")
    monkeypatch.setattr(onnx_export, "export_demucs", no_torch)
    with pytest.raises(RuntimeError, match=f"delete {graph.parent}"):
        export_demucs_source(resolve_demucs("bag", repo=repo))
    monkeypatch.setattr(onnx_export, "export_demucs", lambda model, out, **k: out.write_bytes(good))  # as exported
    again = export_demucs_source(resolve_demucs("bag", repo=repo))
    assert graph_problem(graph) is None and ModelBundle.from_exported(again).info.family == "htdemucs"
    graph.write_bytes(good)  # the same bytes, written again: its mtime differs, its sha256 matches the record
    assert graph_problem(graph) is None
    graph.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one bit flipped, same size
    assert "sha256" in graph_problem(graph)
    monkeypatch.setattr(onnx_export, "export_demucs", refuse)
    # another bag segment is another export
    (repo / "bag.yaml").write_text((repo / "bag.yaml").read_text() + "segment: 1.0\n")
    with pytest.raises(AssertionError, match="exported again"):
        export_demucs_source(resolve_demucs("bag", repo=repo))


def test_fp16_graphs_are_derived_checked_and_cached(tmp_path, monkeypatch):
    """--precision fp16: converted once beside the fp32 graph, its distance to fp32 measured and stored; a
    conversion that falls below the threshold is refused and leaves no file."""
    import ripper_export.fp16 as fp16
    from ripper_dist.export_cache import FP16_MIN_SDR_DB, with_precision
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    repo = make_bag_repo(tmp_path / "repo", "m", 1, size="small")
    fp32 = export_demucs_source(resolve_demucs("m", repo=repo))
    assert with_precision(fp32, "fp32") == fp32
    half = with_precision(fp32, "fp16")
    assert half.onnx_paths[0] == fp32.onnx_paths[0].with_name("model-fp16.onnx")
    bundle = ModelBundle.from_exported(half)
    meta = bundle.info.raw
    assert meta["ripper.precision"] == "fp16" and float(meta["ripper.fp16_sdr_db"]) >= FP16_MIN_SDR_DB
    assert meta["ripper.checkpoint_sha256"] == ModelBundle.from_exported(fp32).info.raw["ripper.checkpoint_sha256"]
    assert bundle.identity() != ModelBundle.from_exported(fp32).identity()  # resume keys differ
    monkeypatch.setattr(fp16, "to_fp16", lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted again")))
    assert with_precision(fp32, "fp16") == half
    half.onnx_paths[0].unlink()
    monkeypatch.setattr(fp16, "to_fp16", _naive)
    with pytest.raises(ValueError, match="fp16 graph is only"):
        with_precision(fp32, "fp16")
    assert not list(half.onnx_paths[0].parent.glob("*fp16*"))
    with pytest.raises(ValueError, match="precision"):
        with_precision(fp32, "int8")


def _naive(model):
    """A whole-graph fp16 conversion (nothing kept in fp32): about 1 dB from fp32, as measured."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=[])
