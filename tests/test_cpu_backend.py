"""CPU backends: OpenVINO runs the same graph as ONNX Runtime, `auto` measures once per machine and graph, and the
local engine and the Ray actors use the backend asked for."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ripper_dist import cpu_backend
from ripper_dist.cli import main
from ripper_dist.onnx_model import OnnxRunner
from ripper_dist.openvino_model import OpenVinoRunner
from ripper_dist.options import SeparateOptions
from ripper_dist.ray_pipeline import onnx_runners
from ripper_export.random_demucs import make_bag_repo
from test_onnx_model import _graph
from upstream import sdr_db, write_tone


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))


def test_choose_needs_the_margin():
    assert cpu_backend.choose({"ort": 1.0, "openvino": 0.95}) == "ort"       # 5% faster: noise, stay
    assert cpu_backend.choose({"ort": 1.0, "openvino": 0.85}) == "openvino"  # 15% faster: switch
    assert cpu_backend.choose({"ort": 1.0, "openvino": 1.3}) == "ort"
    assert cpu_backend.choose({"ort": 1.0}) == "ort"


def test_openvino_runner_follows_the_runner_protocol():
    x = np.random.default_rng(0).standard_normal((3, 2, 16)).astype(np.float32)
    ov = OpenVinoRunner(_graph(), "cpu", threads=1, max_batch=2)  # 3 rows: a batch of 2, then 1
    y = ov(x)
    assert ov.info.sources == ("a", "b") and ov.chunk_samples == 16 and ov.backend == "openvino"
    assert y.shape == (3, 2, 2, 16) and np.allclose(y[:, 0], x) and np.allclose(y[:, 1], 2 * x)
    assert np.array_equal(y, OnnxRunner(_graph(), "cpu", 1)(x))
    assert not np.shares_memory(ov(x[:1]), ov(x[1:2]))  # outputs are copies, not the request's buffer
    with pytest.raises(ValueError, match="CPU only"):
        OpenVinoRunner(_graph(), "cuda")


def test_auto_measures_once_per_machine_and_graph(monkeypatch):
    calls = []

    def fake_measure(graph, threads, **kw):
        calls.append(threads)
        return {"ort": 2.0, "openvino": 1.0}, {"ort": "ORT", "openvino": "OV"}
    monkeypatch.setattr(cpu_backend, "measure", fake_measure)
    assert cpu_backend.resolve("auto", "cpu", _graph(), 1) == ("openvino", "OV")  # measured: its runner is reused
    assert cpu_backend.resolve("auto", "cpu", _graph(), 1) == ("openvino", None)  # cached
    assert calls == [1]
    cache = json.loads((Path(os.environ["RIPPER_DIST_CACHE"]) / "backends.json").read_text())
    (machine, graphs), = cache.items()
    assert machine == cpu_backend.machine_key() and f"{len(os.sched_getaffinity(0))}cores" in machine.split("|")
    assert graphs[cpu_backend.graph_key(_graph())]["seconds_per_chunk"] == {"ort": 2.0, "openvino": 1.0}
    # other threads (a Ray actor beside the local engine): the machine's one choice, so both write the same bytes
    assert cpu_backend.resolve("auto", "cpu", _graph(), 2) == ("openvino", None)
    assert calls == [1]
    # explicit choices and GPUs never measure
    assert cpu_backend.resolve("ort", "cpu", _graph(), 1) == ("ort", None)
    assert cpu_backend.resolve("auto", "cuda:0", _graph(), 1) == ("ort", None)
    assert calls == [1]


def test_real_measurement_builds_both_and_keeps_the_winner():
    runners = cpu_backend.make_runners([_graph(), None, _graph()], "cpu", 1, "auto", max_batch=4)
    assert runners[1] is None and type(runners[0]) is type(runners[2])
    entry = json.loads((Path(os.environ["RIPPER_DIST_CACHE"]) / "backends.json").read_text())
    times = next(iter(entry.values()))[cpu_backend.graph_key(_graph())]["seconds_per_chunk"]
    assert set(times) == {"ort", "openvino"} and all(t > 0 for t in times.values())
    assert runners[0].backend == cpu_backend.choose(times)


def test_measurement_holds_one_backend_at_a_time(monkeypatch):
    """A first run on a machine times both backends: one session alive at a time (two RoFormer vocals sessions
    would be two copies of 0.9 GB of weights), ONNX Runtime's kept when it wins, OpenVINO's built again when it does."""
    import weakref
    alive: set = set()
    most = [0]
    real = cpu_backend.make_runner

    def tracked(name, *a, **k):
        r = real(name, *a, **k)
        alive.add(id(r))
        weakref.finalize(r, alive.discard, id(r))
        most[0] = max(most[0], len(alive))
        return r
    monkeypatch.setattr(cpu_backend, "make_runner", tracked)
    times, kept = cpu_backend.measure(_graph(), 1)
    assert set(times) == {"ort", "openvino"} and most[0] == 1
    assert list(kept) == (["ort"] if cpu_backend.choose(times) == "ort" else [])
    del kept
    monkeypatch.setattr(cpu_backend, "choose", lambda times: "openvino")  # OpenVINO wins: measured, then rebuilt
    runners = cpu_backend.make_runners([_graph()], "cpu", 1, "auto")
    assert runners[0].backend == "openvino" and most[0] == 1


def test_auto_falls_back_to_onnx_runtime_when_openvino_cannot_run_the_graph(monkeypatch, capsys):
    real = cpu_backend.make_runner

    def no_openvino(name, *a, **k):
        if name == "openvino":
            raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:\nunsupported operation")
        return real(name, *a, **k)
    monkeypatch.setattr(cpu_backend, "make_runner", no_openvino)
    runners = cpu_backend.make_runners([_graph()], "cpu", 1, "auto")
    assert runners[0].backend == "ort"
    assert "OpenVINO cannot run this graph (RuntimeError: Exception from src" in capsys.readouterr().err
    entry = json.loads((Path(os.environ["RIPPER_DIST_CACHE"]) / "backends.json").read_text())
    assert next(iter(entry.values()))[cpu_backend.graph_key(_graph())]["seconds_per_chunk"].keys() == {"ort"}


def test_graph_key_is_the_architecture_not_the_weights():
    import onnx
    other_weights, other_shape = onnx.load_from_string(_graph()), onnx.load_from_string(_graph())
    other_weights.graph.initializer[0].float_data[:] = [3.0]
    other_shape.graph.initializer[0].dims[:] = [1]
    key = cpu_backend.graph_key(_graph())
    assert cpu_backend.graph_key(other_weights.SerializeToString()) == key
    assert cpu_backend.graph_key(other_shape.SerializeToString()) != key


def test_options_refuse_unknown_or_gpu_openvino():
    with pytest.raises(ValueError, match="--backend"):
        SeparateOptions(backend="tvm")
    with pytest.raises(ValueError, match="--backend: openvino runs on the CPU only"):
        SeparateOptions(backend="openvino", device="cuda")
    assert SeparateOptions().backend == "auto"


def test_ray_actor_factory_uses_the_backend():
    graphs = [_graph(), None]
    assert [type(r) for r in onnx_runners(graphs, "cpu", 1, 1, backend="openvino")] == [OpenVinoRunner, type(None)]
    assert isinstance(onnx_runners(graphs, "cpu", 1, 1)[0], OnnxRunner)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("backend")
    repo = make_bag_repo(d / "repo", "tiny", 1, size="small")
    song = write_tone(d / "in" / "song.wav", 3.1, seed=7)
    return d, repo, song


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_separate_with_openvino_matches_onnx_runtime(small, tmp_path, engine):
    """The real (small) htdemucs graph through the whole command: OpenVINO's stems agree with ORT's far above the
    parity bar, and the metadata row says which backend ran (in Ray: the actors')."""
    d, repo, song = small
    common = ["separate", "--no-progress", "--repo", str(repo), "-n", "tiny", "--subtype", "FLOAT", "--clip-mode",
              "none", str(song)]
    out = {}
    for backend in ("ort", "openvino"):
        extra = ["--engine", engine] + (["--num-cpus", "2"] if engine == "ray" else [])
        assert main([*common, *extra, "--backend", backend, "-o", str(tmp_path / backend)]) == 0
        row = pd.read_parquet(tmp_path / backend / "metadata.parquet").iloc[0]
        assert row.status == "done" and row.backend == backend and row.engine == engine
        import soundfile as sf
        out[backend] = np.stack([sf.read(tmp_path / backend / "tiny" / "song" / f"{s}.wav")[0] for s in
                                 ("drums", "bass", "other", "vocals")])
    assert sdr_db(out["ort"], out["openvino"]) > 60
