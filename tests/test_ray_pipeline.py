"""The Ray job end to end on a local Ray: the local engine's bytes, rows only at the driver, spans, faults, nodes."""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import soundfile as sf

from ray_nodes import Node, free_ports, node_env, wait_for
from ripper_dist import ray_connect
from ripper_dist.cli import main
from ripper_dist.options import SeparateOptions
from ripper_dist.ray_pipeline import ROW_COLUMNS, block_bytes, onnx_runners, pool_shape, run_ray
from ripper_dist.separator import choose_engine, plan_job
from ripper_export.random_demucs import make_bag_repo
from upstream import sdr_db, write_tone

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # runner factories below travel to the actors


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    os.environ["RIPPER_DIST_CACHE"] = str(d / "cache")
    repo = make_bag_repo(d / "repo", "tiny", 2, [[1, 0.5, 0, 1], [0, 0.5, 1, 1]], size="small")
    inp = d / "in"
    write_tone(inp / "x" / "song.wav", 4.1 + 3 / 44100, seed=1)
    write_tone(inp / "y" / "song.wav", 0.6, seed=2)
    write_tone(inp / "mono48.wav", 2.3, sr=48000, channels=1, seed=3)
    write_tone(inp / "long.flac", 9.5, seed=4)
    (inp / "corrupt.flac").write_bytes(os.urandom(3000))
    long = write_tone(d / "one" / "long.wav", 33.3 + 7 / 44100, seed=5)  # alone: spans over the actors
    local = d / "local"
    # --backend ort: the tests that inject runners (onnx_runners) run ONNX Runtime, and `auto` may pick OpenVINO for
    # this tiny graph on timing noise (~115 dB apart), so every reference and every Ray run here names the backend.
    common = ["--engine", "local", "--no-progress", "--repo", str(repo), "-n", "tiny", "--subtype", "FLOAT",
              "--clip-mode", "none", "--backend", "ort"]
    main(["separate", *common, "-o", str(local), str(inp)])
    main(["separate", *common, "-o", str(d / "local_one"), str(long)])
    return SimpleNamespace(dir=d, repo=repo, inp=inp, local=local, long=long, local_one=d / "local_one")


def _argv(env, out, *extra, inputs=None):
    return ["separate", "--no-progress", "-o", str(out), "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT",
            "--clip-mode", "none", "--backend", "ort", *map(str, extra), *(map(str, inputs) if inputs else [str(env.inp)])]


def _ray(env, out, *extra, inputs=None):
    return main(_argv(env, out, "--engine", "ray", "--num-cpus", "2", *extra, inputs=inputs))


def _same_bytes(out: Path, ref: Path, min_db: float = 120.0) -> pd.DataFrame:
    """Same rows and, for every finished track, the same stems (WAV FLOAT): >= 120 dB SDR. Not bitwise: ONNX Runtime
    with two threads is not bitwise repeatable even between two local runs (~336 dB); the placements themselves
    are bitwise equal on numpy runners (test_span_work)."""
    a = pd.read_parquet(out / "metadata.parquet").set_index("input_path")
    b = pd.read_parquet(ref / "metadata.parquet").set_index("input_path")
    assert sorted(a.index) == sorted(b.index)
    assert (a.status == b.status[a.index]).all() and (a.track == b.track[a.index]).all()
    for _, row in a[a.status == "done"].iterrows():
        for stem, rel in dict(row.stem_paths).items():
            got, want = sf.read(out / rel)[0], sf.read(ref / rel)[0]
            assert got.shape == want.shape and sdr_db(want, got) >= min_db, (rel, sdr_db(want, got))
    assert not (out / ".ripper-dist" / "parts").exists()  # no span parts left behind
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files
    return a


def _workers(df) -> list[str]:
    return ",".join(df[df.status == "done"].worker).split(",")


def test_ray_equals_local_engine_rows_only_at_the_driver_and_resumes(env, capsys, monkeypatch):
    """Bitwise the local engine's stems; what the driver iterates is the small row columns, nothing else."""
    seen = []
    real = ray.data.Dataset.iter_batches

    def spy(self, *a, **kw):
        for batch in real(self, *a, **kw):
            seen.append({k: (np.asarray(v).dtype, sum(len(str(x)) for x in np.asarray(v).ravel()))
                         for k, v in batch.items()})
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    out = env.dir / "ray_out"
    assert _ray(env, out) == 1  # the corrupt file fails, the job completes
    df = _same_bytes(out, env.local)
    assert seen and all(tuple(b) == ROW_COLUMNS for b in seen)
    assert all(b["row"][1] < 4096 and b["kind"][0] == object for b in seen)  # a row is a few hundred bytes of JSON
    bad = df.loc[str(env.inp / "corrupt.flac")]
    assert bad.status == "failed" and "AudioError" in bad.error
    done = df[df.status == "done"]
    assert (done.engine == "ray").all() and done.node.notna().all() and (done.elapsed_s > 0).all()
    capsys.readouterr()
    assert _ray(env, out) == 1  # the failed one is retried (and fails again); the rest is skipped
    err = capsys.readouterr().err
    assert "4 skipped" in err and "0 done, 1 failed" in err


def test_one_long_track_spreads_over_the_actors_in_spans(env):
    out = env.dir / "one"
    assert _ray(env, out, inputs=[env.long]) == 0
    df = _same_bytes(out, env.local_one)
    assert len({w.split(":")[1] for w in _workers(df)}) == 2  # both actors worked on it


def test_no_shared_fs_equals_local_engine(env):
    out = env.dir / "noshared"
    assert _ray(env, out, "--no-shared-fs") == 1
    _same_bytes(out, env.local)


def test_no_shared_fs_with_a_node_that_cannot_see_input_or_output(env, tmp_path):
    """A real second node in its own mount namespace, with empty tmpfs over the input and output folders. Each node
    is a `ray start --block` in a session of its own (HOME apart: no token of the user's applies), stopped by
    killing that session."""
    out = tmp_path / "out"
    out.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    hide = f"mount -t tmpfs tmpfs {env.inp} && mount -t tmpfs tmpfs {out} && test -z \"$(ls -A {env.inp})\""
    nodes = []
    try:
        nodes.append(Node("head", ["--head", "--port", port, "--num-cpus", "1", "--include-dashboard", "false"],
                          node_env(home), tmp_path))
        ray.init(address=address)
        nodes.append(Node("hidden", ["--address", address, "--num-cpus", "1"], node_env(home), tmp_path,
                          wrap=lambda argv: ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                             f"{hide} && exec {shlex.join(argv)}"]))
        wait_for("second node", lambda: len([n for n in ray.nodes() if n["Alive"]]) >= 2, nodes, timeout=60)
        ray.shutdown()
        rc = main(_argv(env, out, "--engine", "ray", "--address", address, "--no-shared-fs", "--actors", "2",
                        "--threads", "1"))
        assert rc == 1
        df = _same_bytes(out, env.local)
        node_ids = {w.split(":")[2] for w in _workers(df)}
        assert len(node_ids) == 2, _workers(df)  # the hidden node separated spans it could not have read
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            node.stop()


class _Slow:
    def __init__(self, runner, delay):
        self.runner, self.delay, self.chunk_samples = runner, delay, runner.chunk_samples

    def __call__(self, batch):
        time.sleep(self.delay * len(batch))
        return self.runner(batch)


def _slow_runners(graphs, device, threads, max_batch):
    return [_Slow(r, 0.3) if r is not None else None for r in onnx_runners(graphs, device, threads, max_batch)]


def test_node_killed_mid_run_every_track_done_once(env):
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node = cluster.add_node(num_cpus=2)
    out = env.dir / "nodekill"
    try:
        opts = SeparateOptions(inputs=(str(env.inp),), out=out, model="tiny", repo=env.repo, subtype="FLOAT", backend="ort",
                               clip_mode="none", engine="ray", address=cluster.address, actors=2, threads=1,
                               progress=False)
        job = plan_job(opts)
        result = {}
        thread = threading.Thread(target=lambda: result.update(rows=run_ray(job, make_runners=_slow_runners)))
        thread.start()
        parts = out / ".ripper-dist" / "parts"
        deadline = time.time() + 120
        while not any(parts.rglob("*.json")) and time.time() < deadline:
            time.sleep(0.1)
        cluster.remove_node(node)  # mid-run: spans done, others in flight
        thread.join(timeout=400)
        assert not thread.is_alive()
        assert sorted(r["status"] for r in result["rows"]).count("done") == 4
        _same_bytes(out, env.local)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_actor_killed_mid_run_is_redone(env):
    """SIGKILL an ONNX Runtime actor while it works: Ray restarts it, the job completes, nothing lost or doubled."""
    out = env.dir / "killed"
    cmd = [sys.executable, str(ROOT / "tests" / "ray_job.py"), "0.3", str(out), "--engine", "ray", "--num-cpus", "2",
           "--no-progress", "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT", "--clip-mode", "none",
           "--batch-size", "1", str(env.inp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and killed is None:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        for line in ps.splitlines():
            if "SpanSeparator" in line and "ps -eo" not in line:
                if any(out.rglob("*.wav")):  # mid-run: some stems written
                    os.kill(int(line.split()[0]), signal.SIGKILL)
                    killed = line
                break
        time.sleep(0.1)
    log, _ = proc.communicate(timeout=300)
    assert killed is not None, log
    assert proc.returncode == 1, log  # only the corrupt file failed
    _same_bytes(out, env.local)


def test_driver_killed_then_rerun_resumes(env):
    out = env.dir / "interrupted"
    cmd = [sys.executable, str(ROOT / "tests" / "ray_job.py"), "0.3", str(out), "--engine", "ray", "--num-cpus", "2",
           "--no-progress", "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT", "--clip-mode", "none",
           str(env.inp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    journal = out / ".ripper-dist" / "rows.jsonl"

    def recorded() -> int:
        """Distinct tracks recorded so far, in the journal or already compacted into metadata.parquet (compaction
        runs every 10 s and empties the journal, so on a slow machine the journal alone can read 0 after a row)."""
        paths = set()
        try:
            paths |= {json.loads(line)["input_path"] for line in journal.read_text().splitlines() if line.strip()}
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        try:
            paths |= set(pq.read_table(out / "metadata.parquet", columns=["input_path"]).column(0).to_pylist())
        except (FileNotFoundError, OSError):
            pass
        return len(paths)

    while time.time() < deadline and recorded() < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies, driver included
    proc.wait()
    done_before = recorded()
    assert _ray(env, out) == 1
    df = _same_bytes(out, env.local)
    assert len(df) == 5 and df.index.is_unique and done_before >= 2


def _cpu_runners(graphs, device, threads, max_batch):
    assert device == "cuda:0" and os.environ.get("CUDA_VISIBLE_DEVICES") in ("0", "1")
    return onnx_runners(graphs, "cpu", threads, max_batch)  # logical GPUs: ORT on the CPU


def test_one_actor_per_logical_gpu(env):
    """Two logical GPUs: two actors, each given its own GPU by Ray (ORT itself runs on the CPU here)."""
    ray_connect.start_local(num_cpus=2, num_gpus=2, include_dashboard=False)  # no token file written
    try:
        out = env.dir / "gpus"
        opts = SeparateOptions(inputs=(str(env.inp),), out=out, model="tiny", repo=env.repo, subtype="FLOAT", backend="ort",
                               clip_mode="none", engine="ray", device="CUDA", batch_size=1, progress=False)
        run_ray(plan_job(opts), make_runners=_cpu_runners)
        df = _same_bytes(out, env.local)
        gpus = {w.split(":gpu")[1] for w in _workers(df)}
        assert gpus == {"0", "1"}, _workers(df)
    finally:
        ray_connect.disconnect()


def test_pool_shape_and_blocks():
    gpu = pool_shape(SeparateOptions(device="cuda"), {"CPU": 32, "GPU": 4})
    assert gpu.actors == 4 and gpu.num_gpus == 1 and gpu.device == "cuda:0"
    trt = pool_shape(SeparateOptions(device="TensorRT:1", actors=2), {"CPU": 32, "GPU": 4})
    assert trt.actors == 2 and trt.device == "tensorrt:0"
    cpu = pool_shape(SeparateOptions(), {"CPU": 16})
    assert cpu.actors * cpu.threads == 16 and cpu.num_gpus == 0
    assert pool_shape(SeparateOptions(threads=2, actors=3), {"CPU": 16}) == pool_shape(
        SeparateOptions(threads=2, actors=3), {"CPU": 2})  # the user's -j/--threads win
    with pytest.raises(RuntimeError, match="no GPUs"):
        pool_shape(SeparateOptions(device="cuda"), {"CPU": 4})
    assert block_bytes(1, 2) == 1 and block_bytes(100, 8) > 1  # few tracks: a span per block, to spread


def test_auto_engine(env, monkeypatch):
    """Default `--engine auto`: one track runs locally; several, a cluster address, or --no-shared-fs on Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_engine(SeparateOptions(), 1) == "local"
    assert choose_engine(SeparateOptions(address="auto"), 1) == "ray"
    assert choose_engine(SeparateOptions(num_cpus=2), 2) == "local"  # a small folder on a small machine
    assert choose_engine(SeparateOptions(num_cpus=2), 9) == "ray"
    assert choose_engine(SeparateOptions(num_cpus=16), 2) == "ray"
    assert choose_engine(SeparateOptions(engine="ray"), 1) == "ray"
    assert choose_engine(SeparateOptions(shared_fs=False), 1) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose_engine(SeparateOptions(), 1) == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    out = env.dir / "auto"
    assert main(_argv(env, out, inputs=[env.inp / "y" / "song.wav"])) == 0
    assert pd.read_parquet(out / "metadata.parquet").engine.tolist() == ["local"]


def test_workers_run_at_normal_priority_and_a_niced_cluster_is_named(capsys, tmp_path):
    """Ray starts workers at nice 15; there any low-priority work on the machine takes CPU from the actors
    (docs/BENCHMARKS.md, "Shared machines"). A Ray the job starts runs them at 0; a cluster that nices them is said."""
    from ray.cluster_utils import Cluster

    from ripper_dist.ray_pipeline import RayEngine, workers_niceness
    assert not ray.is_initialized()
    with RayEngine(SeparateOptions(num_cpus=2, out=tmp_path / "a")) as engine:  # OUT gets Ray's native log
        assert engine.started_here and workers_niceness() == 0
    assert not ray.is_initialized()
    assert "nice" not in capsys.readouterr().err

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # as `ray start` with Ray's defaults
    try:
        with RayEngine(SeparateOptions(address=cluster.address, out=tmp_path / "b")):
            assert workers_niceness() == 15
        err = capsys.readouterr().err
        assert "runs its workers at nice 15" in err and "RAY_worker_niceness=0" in err
    finally:
        ray.shutdown()
        cluster.shutdown()
