"""GPU paths: run with `python -m pytest -q tests/gpu` on a machine with an NVIDIA GPU (CUDA + cuDNN for
onnxruntime-gpu). Kept out of the default run (pyproject `norecursedirs`), which has no GPU to use."""
import numpy as np
import pandas as pd
import soundfile as sf

from ripper_dist.cli import main
from ripper_dist.export_cache import export_demucs_source
from ripper_dist.models import ModelBundle
from ripper_dist.onnx_model import OnnxRunner
from ripper_dist.sources import resolve_demucs
from ripper_export.random_demucs import make_bag_repo
from ripper_export.reference import sdr_db


def _bundle(tmp_path, monkeypatch, size="small"):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    repo = make_bag_repo(tmp_path / "repo", "m", 1, size=size)
    return repo, ModelBundle.from_exported(export_demucs_source(resolve_demucs("m", repo=repo)))


def test_cuda_session_runs_on_the_gpu_and_matches_cpu(tmp_path, monkeypatch):
    _, bundle = _bundle(tmp_path, monkeypatch, size="released")
    gpu = OnnxRunner(bundle.graphs[0], "cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = OnnxRunner(bundle.graphs[0], "cpu")
    x = (0.1 * np.random.default_rng(0).standard_normal((4, 2, gpu.chunk_samples))).astype(np.float32)
    assert sdr_db(cpu(x), gpu(x)) >= 60


def test_separate_on_cuda_equals_cpu(tmp_path, monkeypatch):
    repo, _ = _bundle(tmp_path, monkeypatch)
    t = np.arange(int(3.1 * 44100)) / 44100
    sf.write(tmp_path / "t.wav", np.stack([np.sin(2 * np.pi * 220 * t)] * 2, 1).astype(np.float32) * 0.3, 44100)
    for device in ("cpu", "cuda"):
        assert main(["separate", "--no-progress", "--repo", str(repo), "-n", "m", "--device", device,
                     "--batch-size", "4", "--subtype", "FLOAT", "--clip-mode", "none", "-o",
                     str(tmp_path / device), str(tmp_path / "t.wav")]) == 0
    for stem in ["drums", "bass", "other", "vocals"]:
        a = sf.read(tmp_path / "cpu" / "t" / f"{stem}.wav")[0]
        b = sf.read(tmp_path / "cuda" / "t" / f"{stem}.wav")[0]
        assert sdr_db(a, b) >= 60
    workers = pd.read_parquet(tmp_path / "cuda" / "metadata.parquet").worker[0]
    assert ":gpu" in workers  # the actor was placed on a GPU by Ray
