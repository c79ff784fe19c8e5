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


def test_io_binding_equals_plain_run_and_never_aliases_its_buffers():
    """The bound path (used on GPUs) gives the same numbers as session.run, per batch shape, and a result stays
    valid after later runs reuse the device buffers."""
    plain = OnnxRunner(_graph(), "cpu", threads=1, bind=False)
    bound = OnnxRunner(_graph(), "cpu", threads=1, bind=True)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((b, 2, 16)).astype(np.float32) for b in (3, 3, 1, 2, 3)]
    results = [bound(x) for x in xs]
    for x, y in zip(xs, results):
        assert np.array_equal(y, plain(x))
    assert len(bound._bound) <= 2  # buffers for at most two batch shapes are kept


def test_max_batch_runs_a_large_batch_in_pieces():
    runner = OnnxRunner(_graph(), "cpu", threads=1, max_batch=2)
    calls = []
    run = runner._run
    runner._run = lambda b: calls.append(len(b)) or run(b)
    x = np.random.default_rng(2).standard_normal((5, 2, 16)).astype(np.float32)
    assert np.allclose(runner(x)[:, 1], 2 * x)
    assert calls == [2, 2, 1]


def test_gpu_out_of_memory_halves_the_batch_and_retries():
    """A piece that fails to allocate on a GPU is split, and later batches use the smaller size; one chunk that
    does not fit, or any other error, is raised."""
    runner = OnnxRunner(_graph(), "cpu", threads=1)
    runner.on_gpu = True  # the back-off is device logic; simulate the CUDA provider's allocation error
    run, calls = runner._run, []

    def limited(b):
        calls.append(len(b))
        if len(b) > 3:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory")
        return run(b)
    runner._run = limited
    x = np.random.default_rng(3).standard_normal((8, 2, 16)).astype(np.float32)
    assert np.allclose(runner(x)[:, 1], 2 * x)
    assert calls == [8, 4, 2, 2, 2, 2] and runner.max_batch == 2
    runner._run = lambda b: (_ for _ in ()).throw(RuntimeError("Failed to allocate memory for requested buffer"))
    with pytest.raises(RuntimeError, match="allocate"):
        runner(x[:1])
    runner.max_batch = None
    runner._run = lambda b: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        runner(x)


def test_fit_to_gpu_measures_the_memory_per_chunk():
    """Calibration on a simulated device: 1 GiB weights, 300 MiB per chunk, 8 GiB card."""
    runner = OnnxRunner(_graph(), "cpu", threads=1)
    assert runner.fit_to_gpu(cap=16) == 1  # a CPU runner is left as it is
    runner.on_gpu = True
    largest = [0]
    run = runner._run
    runner._run = lambda b: largest.__setitem__(0, max(largest[0], len(b))) or run(b)
    free = lambda: (8 << 30) - (1 << 30) * (largest[0] > 0) - (300 << 20) * largest[0]  # noqa: E731
    batch = runner.fit_to_gpu(cap=64, free_bytes=free)
    spare = int(((8 << 30) - (1 << 30) - 600 * (1 << 20)) * 0.85) - (512 << 20)
    assert batch == 2 + spare // (300 << 20) and runner.max_batch == batch
    assert largest[0] == batch  # the chosen batch ran once, so the arena already holds it
    assert runner.calibration["per_item"] == 300 << 20
    assert runner.fit_to_gpu(cap=4, free_bytes=free) == 4


def test_tensorrt_gets_an_engine_cache_and_a_batch_profile(tmp_path):
    from ripper_dist.onnx_model import _trt_shapes, providers_for
    shapes = _trt_shapes(_graph(), 8)
    assert shapes == ("mix", (2, 16), 8)
    trt, cuda, cpu = providers_for("tensorrt:1", trt_cache=tmp_path, trt_shapes=shapes)
    assert trt[0] == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    opts = trt[1]
    assert opts["device_id"] == 1 and opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_profile_min_shapes"] == "mix:1x2x16" and opts["trt_profile_max_shapes"] == "mix:8x2x16"
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kSameAsRequested"})


def test_batch_plan():
    from ripper_dist.onnx_model import AUTO_BATCH_CAP, batch_plan
    assert batch_plan("auto", "cpu") == (1, False)
    assert batch_plan("auto", "cuda:1") == (AUTO_BATCH_CAP, True)
    assert batch_plan("auto", "tensorrt") == (AUTO_BATCH_CAP, True)
    assert batch_plan(6, "cuda") == (6, False) and batch_plan(3, "cpu") == (3, False)


def test_sessions_run_without_the_memory_pattern():
    """The memory pattern doubles the peak from the second run on (docs/BENCHMARKS.md): sessions turn it off."""
    assert make_session(_graph(), "cpu").get_session_options().enable_mem_pattern is False


def test_fit_runners_measures_each_session_and_feeds_the_largest(monkeypatch):
    """A bag's sessions calibrate one after another on what the previous ones left; placeholders are skipped."""
    import ripper_dist.gpu_memory as gm
    from ripper_dist.models import _Unused
    from ripper_dist.onnx_model import fit_runners
    held = {"used": 0}
    monkeypatch.setattr(gm, "gpu_memory", lambda idx=0: ((4 << 30) - held["used"], 4 << 30))
    runners = [OnnxRunner(_graph(), "cpu", threads=1) for _ in range(2)]
    for r in runners:
        r.on_gpu = True
        run = r._run

        def grow(b, run=run):
            held["used"] += len(b) * (200 << 20)  # each run keeps its blocks, as an arena does
            return run(b)
        r._run = grow
    batch = fit_runners([runners[0], _Unused(16), runners[1]], 16)
    assert runners[0].max_batch > runners[1].max_batch >= 1  # the second saw less free memory
    assert batch == runners[0].max_batch


def test_session_does_not_keep_the_graph_bytes():
    """A runner made from bytes holds no reference to them: the caller can free the serialized graph (0.9 GB for
    the RoFormer vocals model) once its sessions exist."""
    import sys
    data = _graph()
    before = sys.getrefcount(data)
    runner = OnnxRunner(data, "cpu", threads=1)
    assert sys.getrefcount(data) == before
    x = np.ones((1, 2, 16), np.float32)
    assert np.allclose(runner(x)[:, 1], 2 * x)
