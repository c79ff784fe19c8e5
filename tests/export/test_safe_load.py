import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from ripper_export.random_demucs import make_bag_repo, make_htdemucs_checkpoint, make_htdemucs_package  # noqa: E402

from ripper_export.safe_load import (  # noqa: E402
    UnsafeCheckpointError, UnsupportedCheckpointError, build_demucs_model, load_demucs_package, sha256_file)


class _RunsCommand:
    """Unpickling this runs a shell command (the classic pickle payload)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Spawns:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.Popen, (self.argv,))


class _CallsModelClass:
    def __reduce__(self):
        from demucs.htdemucs import HTDemucs
        return (HTDemucs, (["a", "b"],))


def _poisoned(tmp_path, payload):
    pkg = make_htdemucs_package(seed=3)
    pkg["training_args"]["evil"] = payload
    path = tmp_path / "poisoned.th"
    torch.save(pkg, path)
    return path


def test_command_payload_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = _poisoned(tmp_path, _RunsCommand(f"touch {marker}"))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_demucs_package(path)
    name = f"{os.system.__module__}.system"  # posix.system on Linux
    assert name in str(info.value)
    assert info.value.global_name == name
    assert isinstance(info.value, ValueError)
    assert not marker.exists()
    # control: the payload is live; upstream's full unpickling would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_other_globals_refused(tmp_path):
    marker = tmp_path / "SPAWNED"
    path = _poisoned(tmp_path, _Spawns(["touch", str(marker)]))
    with pytest.raises(UnsafeCheckpointError, match=r"global (subprocess|commands)\.Popen"):
        load_demucs_package(path)  # (protocol-2 pickles carry py2 module names; torch reports what the file says)
    assert not marker.exists()


def test_calling_the_model_class_refused(tmp_path):
    path = _poisoned(tmp_path, _CallsModelClass())
    with pytest.raises(UnsafeCheckpointError, match="demucs.htdemucs.HTDemucs"):
        load_demucs_package(path)


def test_fp16_checkpoint_loads_and_matches_upstream(tmp_path):
    from demucs.htdemucs import HTDemucs
    from demucs.states import load_model

    path = make_htdemucs_checkpoint(tmp_path / "m.th", seed=1)
    pkg = load_demucs_package(path)
    assert pkg["klass"] is HTDemucs
    assert isinstance(pkg["kwargs"]["segment"], Fraction)
    assert all(v.dtype == torch.float16 for v in pkg["state"].values())
    assert isinstance(pkg["training_args"], dict)
    model = build_demucs_model(pkg)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = load_model(str(path)).eval()
    x = torch.randn(2, 2, 40000)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_unknown_kwargs_dropped_with_warning(tmp_path):
    path = make_htdemucs_checkpoint(tmp_path / "m.th", extra_kwargs={"not_a_param": 3})
    pkg = load_demucs_package(path)
    with pytest.warns(UserWarning, match="not_a_param"):
        build_demucs_model(pkg)


def test_quantized_state_refused(tmp_path):
    pkg = make_htdemucs_package()
    pkg["state"] = {"__quantized": True, "quantized": [torch.zeros(3)]}
    torch.save(pkg, tmp_path / "q.th")
    with pytest.raises(UnsupportedCheckpointError, match="diffq"):
        load_demucs_package(tmp_path / "q.th")


def test_not_a_package(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.th")
    with pytest.raises(UnsupportedCheckpointError):
        load_demucs_package(tmp_path / "x.th")


def test_sha256_file(tmp_path):
    import hashlib
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_bag_repo_upstream_layout(tmp_path):
    import yaml
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model

    weights = [[1, 0, 0, 0], [0, 1, 1, 1]]
    repo = make_bag_repo(tmp_path / "repo", "mybag", 2, weights, segment=1.0)
    bag = yaml.safe_load((repo / "mybag.yaml").read_text())
    assert bag["weights"] == weights and bag["segment"] == 1.0 and len(bag["models"]) == 2
    files = sorted(repo.glob("*.th"))
    assert len(files) == 2
    for f in files:
        sig, sha8 = f.stem.split("-")
        assert sig in bag["models"] and sha256_file(f)[:8] == sha8
        assert load_demucs_package(f)["klass"].__name__ == "HTDemucs"
    upstream = get_model("mybag", repo=repo)  # upstream verifies the sha8 of each file
    assert isinstance(upstream, BagOfModels) and len(upstream.models) == 2
