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
        assert main(["separate", "--engine", "ray", "--no-progress", "--repo", str(repo), "-n", "m", "--device", device,
                     "--subtype", "FLOAT", "--clip-mode", "none", "-o",
                     str(tmp_path / device), str(tmp_path / "t.wav")]) == 0
    for stem in ["drums", "bass", "other", "vocals"]:
        a = sf.read(tmp_path / "cpu" / "t" / f"{stem}.wav")[0]
        b = sf.read(tmp_path / "cuda" / "t" / f"{stem}.wav")[0]
        assert sdr_db(a, b) >= 60
    workers = pd.read_parquet(tmp_path / "cuda" / "metadata.parquet").worker[0]
    assert ":gpu" in workers  # the actor was placed on a GPU by Ray


def test_io_binding_on_cuda_equals_plain_run(tmp_path, monkeypatch):
    _, bundle = _bundle(tmp_path, monkeypatch)
    bound = OnnxRunner(bundle.graphs[0], "cuda")
    plain = OnnxRunner(bundle.graphs[0], "cuda", bind=False)
    assert bound._bind and not plain._bind
    rng = np.random.default_rng(1)
    xs = [(0.1 * rng.standard_normal((b, 2, bound.chunk_samples))).astype(np.float32) for b in (3, 3, 1, 3)]
    ys = [bound(x) for x in xs]
    for x, y in zip(xs, ys):
        assert np.array_equal(y, plain(x)) or sdr_db(plain(x), y) >= 100


def test_auto_batch_is_measured_on_the_gpu_and_fits(tmp_path, monkeypatch):
    """Calibration reads real free memory: one more chunk costs something, the batch is within the cap and runs."""
    from ripper_dist.gpu_memory import gpu_memory
    _, bundle = _bundle(tmp_path, monkeypatch, size="released")
    runner = OnnxRunner(bundle.graphs[0], "cuda")
    free_before, total = gpu_memory(0)
    batch = runner.fit_to_gpu(16)
    cal = runner.calibration
    assert 1 <= batch <= 16 and cal["per_item"] > 0 and cal["free_after_two"] < free_before <= total
    x = np.zeros((batch, 2, runner.chunk_samples), np.float32)
    assert runner(x).shape[0] == batch and runner.max_batch == batch  # no out-of-memory back-off was needed


def test_out_of_memory_back_off_on_a_real_gpu(tmp_path, monkeypatch):
    """A memory-limited CUDA arena: a batch too large is halved until it fits, never a failed run."""
    from ripper_dist import onnx_model
    _, bundle = _bundle(tmp_path, monkeypatch, size="released")
    real = onnx_model.providers_for

    def limited(device, **kw):
        provs = real(device, **kw)
        return [("CUDAExecutionProvider", {**provs[0][1], "gpu_mem_limit": str(3 << 30)}), *provs[1:]]
    monkeypatch.setattr(onnx_model, "providers_for", limited)
    runner = OnnxRunner(bundle.graphs[0], "cuda")
    x = np.zeros((32, 2, runner.chunk_samples), np.float32)
    assert runner(x).shape[0] == 32 and 1 <= runner.max_batch < 32


def test_tensorrt_engine_cache_is_written_once(tmp_path, monkeypatch):
    import time

    import onnxruntime as ort
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise AssertionError("onnxruntime-gpu lists no TensorRT provider on this GPU machine")
    _, bundle = _bundle(tmp_path, monkeypatch)
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 2, OnnxRunner(bundle.graphs[0]).chunk_samples)))
    t0 = time.perf_counter()
    first = OnnxRunner(bundle.graphs[0], "tensorrt", max_batch=4)
    y1 = first(x.astype(np.float32))
    cold = time.perf_counter() - t0
    engines = sorted((tmp_path / "cache" / "tensorrt").glob("*.engine"))
    assert engines, "TensorRT wrote no engine cache"
    t0 = time.perf_counter()
    second = OnnxRunner(bundle.graphs[0], "tensorrt", max_batch=4)
    y2 = second(x.astype(np.float32))
    warm = time.perf_counter() - t0
    assert sorted((tmp_path / "cache" / "tensorrt").glob("*.engine")) == engines  # reused, not rebuilt
    assert warm < cold and sdr_db(y1, y2) >= 100
    cpu = OnnxRunner(bundle.graphs[0], "cpu")(x.astype(np.float32))
    assert sdr_db(cpu, y1) >= 40


def test_fp16_on_cuda_stays_close_to_fp32(tmp_path, monkeypatch):
    """The fp16 graph on the GPU (tensor cores) against the fp32 graph on the CPU, released size."""
    from ripper_dist.export_cache import FP16_MIN_SDR_DB, with_precision
    from ripper_export.fp16 import music_like
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))
    repo = make_bag_repo(tmp_path / "repo", "m", 1, size="released")
    fp32 = export_demucs_source(resolve_demucs("m", repo=repo))
    half = ModelBundle.from_exported(with_precision(fp32, "fp16"))
    gpu = OnnxRunner(half.graphs[0], "cuda")
    x = music_like(2, 2, gpu.chunk_samples)
    ref = OnnxRunner(ModelBundle.from_exported(fp32).graphs[0], "cpu")(x)
    assert sdr_db(ref, gpu(x)) >= FP16_MIN_SDR_DB
