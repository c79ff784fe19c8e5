"""A very long track in bounded memory, both families, both engines: a 20-minute mono track through a trivial graph
in the real contract (inference costs ~nothing, so this measures the pipeline around the model). The model-rate mix
alone is 423 MB and its four stems 1.7 GB; every process must stay far below that."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from ripper_export.identity import make_identity_graph

MINUTES = 20
LOCAL_LIMIT_MB = 400    # the whole local process: far below the mix (423 MB), let alone the stems
WORKER_LIMIT_MB = 700   # any Ray worker (ORT session, span buffers, encoder)


@pytest.fixture(scope="module")
def track(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sr, block = 44100, 44100 * 60
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:  # written a minute at a time
        for k in range(MINUTES):
            t = (np.arange(block) + k * block) / sr
            f.write((0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(block)).astype(np.float32))
    return path


def _graphs(tmp_path):
    demucs = make_identity_graph(tmp_path / "demucs.onnx")
    roformer = make_identity_graph(tmp_path / "roformer.onnx", chunk_samples=352800, family="mel_band_roformer",
                                   sources=("vocals",), metadata={"ripper.instruments": json.dumps(["vocals", "other"]),
                                                                  "ripper.target_instrument": "vocals"})
    return {"demucs": demucs, "roformer": roformer}


def _hwm(pid) -> int:
    """Peak RSS in bytes of a running process (VmHWM: of its own program, unlike ru_maxrss, which a child inherits
    from the process that forked it)."""
    try:
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return 0


def _ray_workers() -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::"):
                out.append(int(pid))
        except OSError:
            continue
    return out


def _run(argv) -> tuple[float, float]:
    """(peak RSS MB of the command itself, of the largest Ray worker meanwhile), sampled every 0.1 s."""
    proc = subprocess.Popen([sys.executable, "-m", "ripper_dist.cli", *argv], stderr=subprocess.PIPE, text=True)
    peaks, stop = {"self": 0, "workers": 0}, threading.Event()

    def sample():
        while not stop.is_set():
            peaks["self"] = max(peaks["self"], _hwm(proc.pid))
            peaks["workers"] = max([peaks["workers"], *(_hwm(p) for p in _ray_workers())])
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = proc.stderr.read()
    proc.wait()
    stop.set()
    th.join()
    assert proc.returncode == 0, err[-3000:]
    return peaks["self"] / 2 ** 20, peaks["workers"] / 2 ** 20


@pytest.mark.parametrize("family", ["demucs", "roformer"])
def test_long_mono_track_bounded_memory_on_both_engines(track, tmp_path, family):
    graph = _graphs(tmp_path)[family]
    common = ["separate", "--no-progress", "-n", str(graph), str(track)]
    local_rss, _ = _run(common + ["--engine", "local", "-o", str(tmp_path / "local")])
    driver_rss, worker_rss = _run(common + ["--engine", "ray", "--num-cpus", "2", "-o", str(tmp_path / "ray")])
    print(f"{family}: local {local_rss:.0f} MB, Ray driver {driver_rss:.0f} MB, largest worker {worker_rss:.0f} MB")
    assert local_rss < LOCAL_LIMIT_MB and driver_rss < WORKER_LIMIT_MB and 0 < worker_rss < WORKER_LIMIT_MB
    frames = sf.info(track).frames
    stems = ["drums", "bass", "other", "vocals"] if family == "demucs" else ["vocals", "other"]
    for stem in stems:
        for engine in ("local", "ray"):
            info = sf.info(tmp_path / engine / graph.stem / "long" / f"{stem}.wav")  # OUT/<model>/<track>/
            assert (info.frames, info.channels) == (frames, 1)
    # the identity graph's stems are known: the mix times a gain (and for RoFormer the complement, mix - vocals)
    with sf.SoundFile(track) as f_in, sf.SoundFile(tmp_path / "ray" / graph.stem / "long" / f"{stems[-1 if family == 'demucs' else 0]}.wav") as f_out:
        f_in.seek(frames // 2)
        f_out.seek(frames // 2)
        x, y = f_in.read(44100), f_out.read(44100)
    gain = 0.4 if family == "demucs" else 0.1
    assert np.abs(y - gain * x).max() < 2e-4  # PCM_16 steps, no drift at minute ten
    rows = [json.loads(line) for line in (tmp_path / "ray" / ".ripper-dist" / "rows.jsonl").read_text().splitlines()] \
        if (tmp_path / "ray" / ".ripper-dist" / "rows.jsonl").exists() else []
    assert not rows  # compacted at the end of the job
