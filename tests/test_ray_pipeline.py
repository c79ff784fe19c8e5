"""The Ray job end to end on a local Ray: same stems as the single-process engine, metadata, resume, faults."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_export.random_demucs import make_bag_repo
from ripper_dist.cli import main
from ripper_dist.ray_pipeline import _pool_shape
from upstream import sdr_db, write_tone

ROOT = Path(__file__).resolve().parents[1]


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
    local = d / "local"
    main(["separate", "--engine", "local", "--no-progress", "-o", str(local), "--repo", str(repo), "-n", "tiny",
          "--subtype", "FLOAT", "--clip-mode", "none", str(inp)])
    return SimpleNamespace(dir=d, repo=repo, inp=inp, local=local)


def _ray(env, out, *extra):
    return main(["separate", "--engine", "ray", "--num-cpus", "2", "--no-progress", "-o", str(out), "--repo",
                 str(env.repo), "-n", "tiny", "--subtype", "FLOAT", "--clip-mode", "none", "--batch-size", "2",
                 *map(str, extra), str(env.inp)])


def _compare(out: Path, ref: Path, min_db=90.0):
    a = pd.read_parquet(out / "metadata.parquet").set_index("input_path")
    b = pd.read_parquet(ref / "metadata.parquet").set_index("input_path")
    assert sorted(a.index) == sorted(b.index)
    assert (a.status == b.status[a.index]).all() and (a.track == b.track[a.index]).all()
    worst = np.inf
    for path, row in a[a.status == "done"].iterrows():
        for stem, rel in dict(row.stem_paths).items():
            x, _ = sf.read(out / rel)
            y, _ = sf.read(ref / rel)
            worst = min(worst, sdr_db(y, x))
    assert worst >= min_db, worst
    return worst


def test_ray_equals_local_engine_and_resumes(env, capsys):
    out = env.dir / "ray_out"
    assert _ray(env, out) == 1  # the corrupt file fails, the job completes
    print("ray vs local SDR (dB):", _compare(out, env.local))
    df = pd.read_parquet(out / "metadata.parquet")
    bad = df[df.input_path.str.endswith("corrupt.flac")].iloc[0]
    assert bad.status == "failed" and "Error" in bad.error
    done = df[df.status == "done"]
    assert (done.engine == "ray").all() and done.node.notna().all() and done.worker.notna().all()
    capsys.readouterr()
    assert _ray(env, out) == 1  # the failed one is retried (and fails again); the rest is skipped
    err = capsys.readouterr().err
    assert "4 skipped" in err and "0 done, 1 failed" in err


def test_actor_killed_mid_run_is_redone(env):
    """SIGKILL the ONNX Runtime actor while it works: Ray restarts it, the job completes, nothing lost or doubled."""
    out = env.dir / "killed"
    cmd = [sys.executable, "-m", "ripper_dist.cli", "separate", "--engine", "ray", "--num-cpus", "2",
           "--no-progress", "-o", str(out), "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT",
           "--clip-mode", "none", "--batch-size", "1", str(env.inp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"RIPPER_DIST_CHUNK_DELAY": "0.3"})
    killed = None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and killed is None:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        for line in ps.splitlines():
            if "ChunkSeparator" in line and "ps -eo" not in line:
                pid = int(line.split()[0])
                if any(out.rglob("*.wav")):  # mid-run: some stems already written
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                break
        time.sleep(0.2)
    log, _ = proc.communicate(timeout=300)
    assert killed is not None, log
    assert proc.returncode == 1, log  # only the corrupt file failed
    print("after kill, ray vs local SDR (dB):", _compare(out, env.local))


def test_interrupted_run_resumes(env):
    out = env.dir / "interrupted"
    cmd = [sys.executable, "-m", "ripper_dist.cli", "separate", "--engine", "ray", "--num-cpus", "2",
           "--no-progress", "-o", str(out), "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT",
           "--clip-mode", "none", str(env.inp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"RIPPER_DIST_CHUNK_DELAY": "0.3"}, start_new_session=True)
    deadline = time.time() + 240
    rows = out / ".ripper-dist" / "rows"
    while time.time() < deadline and not (rows.is_dir() and len(list(rows.glob("*.parquet"))) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job dies, driver included
    proc.wait()
    assert _ray(env, out) == 1
    _compare(out, env.local)
    df = pd.read_parquet(out / "metadata.parquet")
    assert len(df) == 5 and df.input_path.is_unique


def test_two_node_cluster(env):
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        out = env.dir / "cluster"
        assert main(["separate", "--engine", "ray", "--address", cluster.address, "--threads", "1",
                     "--no-progress", "-o", str(out), "--repo", str(env.repo), "-n", "tiny", "--subtype", "FLOAT",
                     "--clip-mode", "none", str(env.inp)]) == 1
        _compare(out, env.local)
        df = pd.read_parquet(out / "metadata.parquet")
        workers = ",".join(df[df.status == "done"].worker).split(",")
        assert len({w.split(":")[1] for w in workers}) >= 2, workers  # chunks ran in two actors
    finally:
        cluster.shutdown()


def test_pool_shape_gpus_and_cpus():
    gpu = _pool_shape(SimpleNamespace(device="cuda", actors=None, threads=None), {"CPU": 32, "GPU": 4})
    assert gpu["actors"] == 4 and gpu["num_gpus"] == 1 and gpu["device"] == "cuda:0"
    cpu = _pool_shape(SimpleNamespace(device="cpu", actors=None, threads=None), {"CPU": 16})
    assert cpu["actors"] * cpu["threads"] == 16 and cpu["num_gpus"] == 0
    with pytest.raises(RuntimeError, match="no GPUs"):
        _pool_shape(SimpleNamespace(device="cuda", actors=None, threads=None), {"CPU": 4})


def test_one_actor_per_logical_gpu(env):
    """Two logical GPUs: two actors, each pinned to its own GPU by Ray (ORT itself runs on the CPU here)."""
    import ray
    os.environ["RIPPER_DIST_ORT_DEVICE_OVERRIDE"] = "cpu"
    try:
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
        out = env.dir / "gpus"
        assert main(["separate", "--engine", "ray", "--device", "cuda", "--no-progress", "-o", str(out), "--repo",
                     str(env.repo), "-n", "tiny", "--subtype", "FLOAT", "--clip-mode", "none", str(env.inp)]) == 1
        _compare(out, env.local)
        df = pd.read_parquet(out / "metadata.parquet")
        workers = ",".join(df[df.status == "done"].worker).split(",")
        gpus = {w.split(":gpu")[1] for w in workers}
        assert gpus <= {"0", "1"} and len(gpus) == 2, workers
    finally:
        ray.shutdown()
        del os.environ["RIPPER_DIST_ORT_DEVICE_OVERRIDE"]


def test_block_size_keeps_short_tracks_together_unless_actors_would_idle():
    from ripper_dist.ray_pipeline import _block_bytes
    assert _block_bytes(10, 2) == 8 * 1024 and _block_bytes(4, 2) == 8 * 1024
    assert _block_bytes(1, 2) == 1024 and _block_bytes(3, 2) == 1024 and _block_bytes(100, 64) == 1024


def test_one_short_track_spreads_over_the_actors(env):
    """A single 4 s track (a dozen chunk rows) is worked on by both CPU actors, not queued on one."""
    out = env.dir / "one"
    rc = main(["separate", "--engine", "ray", "--num-cpus", "2", "--no-progress", "-o", str(out), "--repo",
               str(env.repo), "-n", "tiny", str(env.inp / "x" / "song.wav")])
    assert rc == 0
    row = pd.read_parquet(out / "metadata.parquet").iloc[0]
    assert row.status == "done" and len(row.worker.split(",")) == 2, row.worker


def test_auto_engine(env, monkeypatch):
    """Default `--engine auto`: one track runs locally; several, or a cluster address, run on Ray."""
    from ripper_dist.separator import choose_engine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = SimpleNamespace(todo=[1])
    assert choose_engine(SimpleNamespace(engine="auto", address=None), job) == "local"
    assert choose_engine(SimpleNamespace(engine="auto", address="auto"), job) == "ray"
    assert choose_engine(SimpleNamespace(engine="auto", address=None), SimpleNamespace(todo=[1, 2])) == "ray"
    assert choose_engine(SimpleNamespace(engine="ray", address=None), job) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose_engine(SimpleNamespace(engine="auto", address=None), job) == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    out = env.dir / "auto"
    assert main(["separate", "--no-progress", "-o", str(out), "--repo", str(env.repo), "-n", "tiny",
                 str(env.inp / "y" / "song.wav")]) == 0
    assert pd.read_parquet(out / "metadata.parquet").engine.tolist() == ["local"]
