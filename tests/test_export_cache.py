"""Exports are cached by checkpoint hash and options: the second run exports nothing."""
import pytest

import ripper_export.onnx_export as onnx_export
from ripper_dist.export_cache import export_demucs_source
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
    # another bag segment is another export
    (repo / "bag.yaml").write_text((repo / "bag.yaml").read_text() + "segment: 1.0\n")
    with pytest.raises(AssertionError, match="exported again"):
        export_demucs_source(resolve_demucs("bag", repo=repo))
