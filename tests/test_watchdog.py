"""Nothing hangs: the track deadline gives up on a blocked read, ORT runs are terminated after --chunk-timeout, and a
stuck track is a failed row while the job goes on (local engine here; the Ray job in test_faults)."""
import os
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ripper_dist import watchdog
from ripper_dist.watchdog import (ChunkTimeoutError, Deadline, GuardedRunner, Limits, TrackTimeoutError, guard,
                                  run_with_deadline)


def test_budget_grows_with_the_audio():
    assert Limits(600, 10).budget(None) == 600
    assert Limits(600, 10).budget(240) == pytest.approx(600 + 30 * 240)
    assert Limits(0, 10).budget(240) is None  # 0: no limit
    d = Deadline(Limits(2, 0), "x")
    assert d.budget == 2
    d.set_duration(20)
    assert d.budget == pytest.approx(4)


def test_a_read_blocked_in_the_kernel_becomes_a_timeout(tmp_path, monkeypatch):
    """A FIFO without a writer blocks open() forever, like a stalled network mount: the caller gets
    TrackTimeoutError after the deadline and goes on; the stuck thread is abandoned."""
    monkeypatch.setattr(watchdog, "GRACE_S", 0.2)
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(TrackTimeoutError, match="stalled.*no result after"):
        run_with_deadline(lambda d: open(fifo, "rb").read(), Deadline(Limits(0.5, 0), str(fifo)))
    assert 0.4 < time.monotonic() - t0 < 5
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the abandoned thread
    os.close(fd)


def test_results_and_errors_pass_through():
    assert run_with_deadline(lambda d: 42, Deadline(Limits(5, 0), "x")) == 42
    with pytest.raises(KeyError, match="mine"):
        run_with_deadline(lambda d: {}["mine"], Deadline(Limits(5, 0), "x"))
    assert run_with_deadline(lambda d: 7, Deadline(Limits(0, 0), "x")) == 7  # no limit: runs in this thread


def _slow_graph(path, nodes=300, n=256):
    """x (1, n, n) through `nodes` MatMuls: each ~1 ms, so a run takes a while and ORT checks `terminate` between."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [n, n], (np.eye(n, dtype=np.float32)).ravel())
    names = ["x"] + [f"h{i}" for i in range(nodes)]
    graph = helper.make_graph([helper.make_node("MatMul", [names[i], "w"], [names[i + 1]]) for i in range(nodes)],
                              "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n, n])],
                              [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [None, n, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


class _Raw:
    """A runner over a plain ORT session that takes RunOptions, as OnnxRunner does."""
    accepts_run_options = True

    def __init__(self, path):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every MatMul
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, batch, run_options=None):
        return self.session.run(None, {"x": batch}, run_options)[0]


def test_chunk_timeout_terminates_the_onnx_runtime_run(tmp_path):
    runner = _Raw(_slow_graph(tmp_path / "slow.onnx"))
    took, batch = 0.0, 1
    while took < 0.4:  # a batch that takes a while on this machine, however fast
        batch *= 2
        x = np.ones((batch, 256, 256), np.float32)
        t0 = time.monotonic()
        full = runner(x)
        took = time.monotonic() - t0
    guarded = GuardedRunner(runner, Deadline(Limits(0, took / 10), "t"))
    t0 = time.monotonic()
    with pytest.raises(ChunkTimeoutError, match="--chunk-timeout"):
        guarded(x)
    assert time.monotonic() - t0 < took / 2  # stopped, not run to the end
    assert np.array_equal(GuardedRunner(runner, Deadline(Limits(0, 60), "t"))(x), full)  # a run in time: unchanged


def test_an_expired_track_terminates_its_run_and_stops_further_calls(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "GRACE_S", 5)
    runner = _Raw(_slow_graph(tmp_path / "slow.onnx"))
    x = np.ones((2, 256, 256), np.float32)
    calls = []

    def work(d):
        runners = guard([runner, None], d)
        assert runners[1] is None
        while True:  # the deadline stops the loop: terminate mid-run, then check() before the next call
            calls.append(1)
            runners[0](x)

    t0 = time.monotonic()
    with pytest.raises(TrackTimeoutError):
        run_with_deadline(work, Deadline(Limits(0.3, 0), "t"))
    assert time.monotonic() - t0 < 3


def test_onnx_runner_passes_run_options(tmp_path):
    from ripper_dist.onnx_model import OnnxRunner
    from ripper_export.identity import make_identity_graph
    runner = OnnxRunner(make_identity_graph(tmp_path / "id.onnx"), "cpu", 1)
    x = np.random.default_rng(0).standard_normal((1, 2, runner.chunk_samples)).astype(np.float32)
    ro = ort.RunOptions()
    ro.terminate = True
    with pytest.raises(Exception, match="(?i)terminat"):
        runner(x, run_options=ro)
    assert GuardedRunner(runner, Deadline(Limits(10, 10), "t"))(x).shape[:2] == (1, 4)


def test_local_engine_stuck_track_is_a_failed_row_and_the_job_goes_on(tmp_path, monkeypatch):
    """One track's model call never returns: after its deadline it is a failed row, the next track is done."""
    import soundfile as sf

    from ripper_dist.models import ModelBundle
    from ripper_dist.options import SeparateOptions
    from ripper_dist.separator import run_stage
    from ripper_export.identity import make_identity_graph
    from upstream import write_tone
    monkeypatch.setattr(watchdog, "GRACE_S", 0.2)
    graph = make_identity_graph(tmp_path / "id.onnx")
    stuck = write_tone(tmp_path / "in" / "a_stuck.wav", 1.0)
    write_tone(tmp_path / "in" / "b_fine.wav", 1.0, seed=1)
    release = threading.Event()
    real = ModelBundle.runners

    class Hang:
        def __init__(self, r):
            self.r, self.chunk_samples = r, r.chunk_samples

        def __call__(self, batch):
            if Hang.first:
                Hang.first = False
                release.wait(60)  # stuck (a Python wait: only the track deadline can give up on it)
            return self.r(batch)
    Hang.first = True
    monkeypatch.setattr(ModelBundle, "runners", lambda self, *a, **k: [Hang(r) for r in real(self, *a, **k)])
    t0 = time.monotonic()
    rc = run_stage(SeparateOptions(inputs=[str(tmp_path / "in")], out=tmp_path / "out", model=str(graph),
                                   engine="local", progress=False, track_timeout=1))
    release.set()
    import pandas as pd
    df = pd.read_parquet(tmp_path / "out" / "metadata.parquet").set_index("track")
    assert rc == 1 and time.monotonic() - t0 < 30
    assert df.loc["a_stuck", "status"] == "failed" and df.loc["a_stuck", "error"].startswith("TrackTimeoutError")
    assert df.loc["b_fine", "status"] == "done"
    assert not (tmp_path / "out" / "id" / "a_stuck").exists()  # nothing published, no temporary file left
    assert sf.info(tmp_path / "out" / "id" / "b_fine" / "vocals.wav").frames == sf.info(stuck).frames
    log = (tmp_path / "out" / ".ripper-dist" / "errors.log").read_text()
    assert "a_stuck.wav" in log and "TrackTimeoutError" in log
