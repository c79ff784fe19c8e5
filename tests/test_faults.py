"""Fault injection as a user meets it: `ripper-dist separate` in a subprocess, both engines, both families (graphs in
the real contract with trivial inference, so each run costs what the pipeline costs). Each case ends in rows, a
clear one-line exit 2, or a finished rerun, never a hang, a traceback on the terminal or a wrong stem marked done.
Root-only tricks: `unshare -m` for a tiny tmpfs (disk full) and a read-only bind mount, `setpriv` to run as nobody
(root reads chmod-000 files anyway)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ripper_export.identity import make_identity_graph
from upstream import write_tone

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ripper_dist.cli", "separate", "--no-progress"]
STEMS = {"demucs": ["drums", "bass", "other", "vocals"], "roformer": ["vocals", "other"]}


def _can_unshare() -> bool:
    """Root with CAP_SYS_ADMIN (a private mount namespace): true on the CI VM and here, not in every container."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


root_only = pytest.mark.skipif(not _can_unshare(), reason="needs root allowed to unshare mounts")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder everyone can read (the permission cases run as nobody): graphs of both families and inputs."""
    d = Path(tempfile.mkdtemp(prefix="ripper-faults-", dir="/tmp"))
    os.chmod(d, 0o755)
    graphs = {"demucs": make_identity_graph(d / "demucs.onnx", chunk_samples=44100),
              "roformer": make_identity_graph(d / "roformer.onnx", chunk_samples=44100, family="mel_band_roformer",
                                              sources=("vocals",),
                                              metadata={"ripper.instruments": json.dumps(["vocals", "other"]),
                                                        "ripper.target_instrument": "vocals"})}
    yield d, graphs
    shutil.rmtree(d, ignore_errors=True)


def _hostile(folder: Path) -> Path:
    """good.wav, nan.wav (float, 1% NaN), inf.wav (one +Inf), a FIFO named like audio."""
    write_tone(folder / "good.wav", 1.5)
    x = sf.read(write_tone(folder / "nan.wav", 1.5, seed=1), dtype="float32")[0]
    x[::100] = np.nan
    sf.write(folder / "nan.wav", x, 44100, subtype="FLOAT")
    x = sf.read(write_tone(folder / "inf.wav", 1.5, seed=2), dtype="float32")[0]
    x[30000, 1] = np.inf
    sf.write(folder / "inf.wav", x, 44100, subtype="FLOAT")
    os.mkfifo(folder / "fifo.wav")
    return folder


def _run(args, timeout=240, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def _rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "metadata.parquet").set_index("track")


@pytest.mark.parametrize("family,engine", [("demucs", "local"), ("demucs", "ray"), ("roformer", "local"),
                                           ("roformer", "ray")])
def test_hostile_inputs_become_rows_and_leftovers_are_cleaned(world, tmp_path, family, engine):
    """Non-finite samples and a FIFO: failed rows with the reason (no stems, no hang), the good track done, exit 1,
    one line per failure on the terminal and tracebacks in errors.log; temporary stem files of an earlier killed run
    removed, a user's look-alike files kept."""
    _, graphs = world
    inp = _hostile(tmp_path / "in")
    out = tmp_path / "out"
    stems = out / family  # OUT/<model>/<track>/: the model is the graph's name
    ours = [stems / "good" / ".vocals.wav.0123456789ab.f32", stems / "good" / ".other.wav.0123456789ab.tmp",
            stems / "nan" / ".vocals.wav.a1b2c3d4.tmp"]
    users = [stems / "good" / ".notes.tmp", stems / "good" / "vocals.wav.bak.tmp",
             stems / "good" / ".vocals.wav.mine.tmp"]
    for p in ours + users:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
    t0 = time.monotonic()
    r = _run(["-n", graphs[family], "--engine", engine, "--num-cpus", "2", "-o", out, inp])
    assert r.returncode == 1, r.stderr[-3000:]
    assert time.monotonic() - t0 < 200 and "Traceback" not in r.stderr
    df = _rows(out)
    assert df.loc["good", "status"] == "done"
    for bad in ("nan", "inf"):
        assert df.loc[bad, "status"] == "failed" and df.loc[bad, "error"].startswith("NonFiniteAudioError"), df
        assert not (stems / bad).exists() or not any((stems / bad).iterdir())
    assert df.loc["fifo", "status"] == "failed" and "FIFO" in df.loc["fifo", "error"]
    assert sum(line.lstrip().startswith("failed:") for line in r.stderr.splitlines()) == 3
    log = (out / ".ripper-dist" / "errors.log").read_text()
    assert "nan.wav" in log and "Traceback" in log
    assert not any(p.exists() for p in ours) and all(p.exists() for p in users)
    for stem in STEMS[family]:
        y = sf.read(stems / "good" / f"{stem}.wav")[0]
        assert np.isfinite(y).all() and np.abs(y).max() > 0.01  # real audio, not a blank stem


def _in_namespace(script: str, timeout=300) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@root_only
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_disk_full_is_named_in_rows_and_a_rerun_after_freeing_space_completes(world, tmp_path, engine):
    _, graphs = world
    inp = tmp_path / "in"
    for k in range(2):
        write_tone(inp / f"t{k}.wav", 2.0, seed=k)
    out = tmp_path / "out"
    out.mkdir()
    cli = " ".join([*CLI, "-n", str(graphs["demucs"]), "--engine", engine, "--num-cpus", "2", "-o", str(out),
                    str(inp)])
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=8m tmpfs {out} || exit 99
        head -c 8000000 /dev/zero > {out}/filler
        {cli} 2> {tmp_path}/first.err; echo "first=$?"
        cp {out}/metadata.parquet {tmp_path}/first.parquet
        ls -a {out}/t0 {out}/t1 > {tmp_path}/first.ls 2>&1
        rm {out}/filler
        {cli} 2> {tmp_path}/second.err; echo "second=$?"
        cp {out}/metadata.parquet {tmp_path}/second.parquet
    """)
    r = _in_namespace(script)
    assert "first=1" in r.stdout and "second=0" in r.stdout, (r.stdout, r.stderr,
                                                             (tmp_path / "first.err").read_text()[-2000:])
    first = pd.read_parquet(tmp_path / "first.parquet")
    assert (first.status == "failed").all() and first.error.str.contains("disk full").all(), first.error.tolist()
    assert "Traceback" not in (tmp_path / "first.err").read_text()
    assert ".wav." not in (tmp_path / "first.ls").read_text()  # no temporary stem left behind
    second = pd.read_parquet(tmp_path / "second.parquet")
    assert (second.status == "done").all()


@root_only
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_read_only_output_fails_before_any_work_with_one_line(world, tmp_path, engine):
    _, graphs = world
    write_tone(tmp_path / "in" / "t.wav", 1.0)
    out = tmp_path / "out"
    out.mkdir()
    cli = " ".join([*CLI, "-n", str(graphs["demucs"]), "--engine", engine, "-o", str(out), str(tmp_path / "in")])
    r = _in_namespace(f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && {cli}; echo rc=$?")
    assert "rc=2" in r.stdout, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"ripper-dist: error: -o {out}: cannot write there (Read-only file system)"], r.stderr


@root_only
def test_unreadable_file_and_folder_get_rows_as_nobody(world, tmp_path):
    d, graphs = world
    base = Path(tempfile.mkdtemp(dir=d))
    os.chmod(base, 0o777)
    inp, out = base / "in", base / "out"
    write_tone(inp / "ok.wav", 1.0)
    write_tone(inp / "locked.wav", 1.0, seed=1)
    write_tone(inp / "closed" / "hidden.wav", 1.0, seed=2)
    os.chmod(inp, 0o755)
    os.chmod(inp / "ok.wav", 0o644)
    os.chmod(inp / "locked.wav", 0o000)
    os.chmod(inp / "closed", 0o000)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI, "-n",
                        str(graphs["demucs"]), "--engine", "local", "-o", str(out), str(inp)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=os.environ | {"HOME": str(base), "RIPPER_DIST_CACHE": str(base / "cache")})
    assert r.returncode == 1, r.stderr
    df = pd.read_parquet(out / "metadata.parquet").set_index("input_path")
    assert df.loc[str(inp / "ok.wav"), "status"] == "done"
    assert df.loc[str(inp / "locked.wav"), "error"].startswith("PermissionError"), df.error.tolist()
    assert "cannot be listed" in df.loc[str(inp / "closed"), "error"]
    assert "Traceback" not in r.stderr


def _victim_runners(victim: str, action: str):
    """Runner factory: the first model call changes (or deletes) `victim`, as a user might mid-run."""
    def make(graphs, device, threads, max_batch):
        from ripper_dist.ray_pipeline import onnx_runners
        return [None if r is None else _Victim(r, victim, action) for r in onnx_runners(graphs, device, threads,
                                                                                        max_batch)]
    return make


class _Victim:
    def __init__(self, runner, victim, action):
        self.runner, self.victim, self.action = runner, victim, action
        self.chunk_samples = runner.chunk_samples

    def __call__(self, batch):
        if os.path.exists(self.victim):
            if self.action == "delete":
                os.unlink(self.victim)
            else:  # same size is not enough: the mtime moves on
                os.utime(self.victim, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
        return self.runner(batch)


@pytest.mark.parametrize("engine,action", [("local", "delete"), ("ray", "change")])
def test_input_changed_or_deleted_mid_run_is_not_published(world, tmp_path, engine, action, monkeypatch):
    import ray.cloudpickle

    from ripper_dist.models import ModelBundle
    from ripper_dist.options import SeparateOptions
    from ripper_dist.ray_pipeline import run_ray
    from ripper_dist.separator import plan_job, run_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, graphs = world
    victim = write_tone(tmp_path / "in" / "victim.wav", 1.0)
    write_tone(tmp_path / "in" / "other.wav", 1.0, seed=3)
    out = tmp_path / "out"
    opts = SeparateOptions(inputs=[str(tmp_path / "in")], out=out, model=str(graphs["demucs"]), engine=engine,
                           progress=False, num_cpus=2)
    job = plan_job(opts)
    # only the victim's runner calls touch it: the other track is read before (local) or untouched (Ray)
    make = _victim_runners(str(victim), action)
    if engine == "local":
        real = ModelBundle.runners

        def runners(self, *a, **k):
            rs = real(self, *a, **k)
            return [None if r is None else _Victim(r, str(victim), action) for r in rs]
        job.todo.sort(key=lambda t: t.track != "victim")  # the victim first, then the other track untouched
        monkeypatch.setattr(ModelBundle, "runners", runners)
        rows = run_local(job)
    else:
        rows = run_ray(job, make_runners=make)
    by = {r["track"]: r for r in rows}
    assert by["victim"]["status"] == "failed" and by["victim"]["error"].startswith("InputChangedError"), by
    assert by["other"]["status"] == "done" or action == "change"
    assert not (out / "demucs" / "victim").exists() or not any((out / "demucs" / "victim").iterdir())


@pytest.mark.parametrize("engine", ["local"])
def test_any_exception_is_one_tracks_row(world, tmp_path, monkeypatch, engine):
    """A bug (here a MemoryError) on one track: its row names it, the traceback is in errors.log, the job goes on."""
    from ripper_dist import families
    from ripper_dist.options import SeparateOptions
    from ripper_dist.separator import run_stage
    _, graphs = world
    write_tone(tmp_path / "in" / "a.wav", 1.0)
    write_tone(tmp_path / "in" / "b.wav", 1.0, seed=1)
    real = families.DemucsFamily.run_span

    def run_span(self, runners, reader, *a, **k):
        if Path(reader.path).name == "a.wav":
            raise MemoryError("simulated allocation failure")
        return real(self, runners, reader, *a, **k)
    monkeypatch.setattr(families.DemucsFamily, "run_span", run_span)
    rc = run_stage(SeparateOptions(inputs=[str(tmp_path / "in")], out=tmp_path / "out", model=str(graphs["demucs"]),
                                   engine=engine, progress=False))
    df = _rows(tmp_path / "out")
    assert rc == 1 and df.loc["a", "error"] == "MemoryError: simulated allocation failure"
    assert df.loc["b", "status"] == "done"
    assert "in run_span" in (tmp_path / "out" / ".ripper-dist" / "errors.log").read_text()


def test_stuck_ray_job_ends_with_timeout_rows(world, tmp_path):
    """Every model call hangs (tests/ray_job.py slows each call by 1000 s): each span gives up after its deadline,
    the job ends with failed rows and exit 1 instead of waiting forever."""
    _, graphs = world
    write_tone(tmp_path / "in" / "a.wav", 1.0)
    write_tone(tmp_path / "in" / "b.wav", 1.0, seed=1)
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "ray_job.py"), "1000", str(out), "-n",
                        str(graphs["demucs"]), "--engine", "ray", "--num-cpus", "2", "--no-progress",
                        "--track-timeout", "2", str(tmp_path / "in")], capture_output=True, text=True, timeout=240,
                       cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]
    assert time.monotonic() - t0 < 180
    df = _rows(out)
    assert (df.status == "failed").all() and df.error.str.startswith("TrackTimeoutError").all(), df.error.tolist()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_ctrl_c_exits_130_and_the_rerun_cleans_up_and_finishes(world, tmp_path, engine):
    """SIGINT mid-run (a temporary stem file exists): exit 130 with one line; the rerun removes whatever the
    interrupted run left, finishes, and leaves no temporary file."""
    import signal
    _, graphs = world
    track = tmp_path / "in" / "long.wav"
    track.parent.mkdir()
    with sf.SoundFile(track, "w", 44100, 2, subtype="PCM_16") as f:  # 8 minutes, written a minute at a time
        for k in range(8):
            f.write(np.random.default_rng(k).uniform(-0.3, 0.3, (44100 * 60, 2)).astype(np.float32))
    # three more inputs (hard links: no extra writing) keep the job busy for several seconds after the first
    # temporary file appears, so a fast machine or a busy test process cannot miss the window
    names = ["long", "long2", "long3", "long4"]
    for name in names[1:]:
        os.link(track, track.with_name(f"{name}.wav"))
    out = tmp_path / "out"
    argv = [*CLI, "-n", str(graphs["demucs"]), "--engine", engine, "--num-cpus", "2", "-o", str(out),
            str(track.parent)]
    # as from a terminal: a suite started in the background (`cmd &`, nohup) hands its children SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 150
    seen = False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".") for p in out.rglob("*") if p.is_file() and ".wav." in p.name) or \
                any((out / ".ripper-dist" / "parts").rglob("*.f32")):
            seen = True
            break
        time.sleep(0.05)
    assert seen, f"no temporary file seen before the job ended (rc {proc.poll()})"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    r = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in names:
        assert sorted(p.name for p in (out / "demucs" / name).iterdir()) == ["bass.wav", "drums.wav", "other.wav",
                                                                             "vocals.wav"]
    assert not (out / ".ripper-dist" / "parts").exists()
