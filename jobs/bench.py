"""Benchmarks: x-realtime and peak memory of ripper-dist against its baselines, side by side in one run.

    python jobs/bench.py engine   [--seconds 60] [--model htdemucs|htdemucs_ft] [--threads N]
        upstream demucs `apply_model` (torch, shifts 0) vs the ripper-dist engine vs a bare ONNX Runtime loop over the
        same chunks, on released-size random weights; prints the engine/upstream ratio and GFLOP/s vs the CPU peak.
    python jobs/bench.py cli      [--seconds 60]
        whole-process `ripper-dist separate --engine local` vs the upstream `demucs` CLI on the same file.
    python jobs/bench.py pipeline [--tracks 10] [--seconds 20]
        the Ray job vs the single-process engine on the same tracks and cores (Ray overhead).
    python jobs/bench.py memory   [--small 20] [--large 200] [--long-minutes 30]
        peak RSS of the Ray driver and peak object-store use: many short tracks vs few, and one long track.
    python jobs/bench.py roformer [--config vocals]
        Mel-Band RoFormer: the torch reference vs the ONNX engine, one chunk and a short track.

Each contender runs in its own child process, so its peak RSS (`ru_maxrss` of that child) is its own.
Models are exported (and cached) before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTDEMUCS_GFLOP_PER_SEGMENT = 224.5   # released htdemucs, one 7.8 s segment (REFERENCE section 4)
CPU_PEAK_GFLOPS_2_CORES = 190.0       # this machine class, two AVX-512 cores (REFERENCE section 4)


def _work_dir() -> Path:
    d = Path(os.environ.get("RIPPER_DIST_BENCH_DIR", Path(tempfile.gettempdir()) / "ripper-dist-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _repo(model: str) -> tuple[Path, str]:
    """A released-size random-weight repo for `model` (htdemucs: 1 model; htdemucs_ft: 4-model one-hot bag)."""
    from ripper_export.random_demucs import make_bag_repo
    repo = _work_dir() / f"repo-{model}"
    if not (repo / f"{model}.yaml").exists():
        if model == "htdemucs_ft":
            make_bag_repo(repo, model, 4, [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)],
                          size="released")
        elif model == "htdemucs_6s":
            make_bag_repo(repo, model, 1, size="released", sources=6)
        else:
            make_bag_repo(repo, model, 1, size="released")
    return repo, model


def _track(seconds: float, name: str = "track", sr: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    import numpy as np
    import soundfile as sf
    path = _work_dir() / "tracks" / f"{name}-{seconds:g}s-{sr}-{channels}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        n = int(seconds * sr)
        t = np.arange(n) / sr
        sig = 0.3 * np.sin(2 * np.pi * 110 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)) + 0.05 * rng.standard_normal(n)
        x = np.stack([sig, np.roll(sig, 100)], 1)[:, :channels].astype(np.float32)
        sf.write(path, x, sr, subtype="PCM_16")
    return path


# -- contenders (run inside child processes) ----------------------------------------------------------------------------

def _load_mix(path: str):
    from ripper_dist.audio import read_audio
    return read_audio(path, 44100, 2)


def child_upstream(repo: str, name: str, track: str, overlap: float, threads: int) -> dict:
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model
    torch.set_num_threads(threads)
    model = get_model(name, repo=Path(repo))
    mix = torch.from_numpy(_load_mix(track))
    t0 = time.perf_counter()
    ref = mix.mean(0)
    wav = (mix - ref.mean()) / (ref.std() + 1e-8)
    with torch.no_grad():
        out = apply_model(model, wav[None], shifts=0, split=True, overlap=overlap, progress=False)[0]
    out = out * (ref.std() + 1e-8) + ref.mean()
    return {"wall_s": time.perf_counter() - t0, "out": _save(out.numpy())}


def _save(arr) -> str:
    import numpy as np
    path = _work_dir() / f"out-{os.getpid()}.npy"
    np.save(path, arr)
    return str(path)


def _bag(repo: str, name: str, threads: int):
    from ripper_dist.export_cache import export_demucs_source
    from ripper_dist.models import ModelBundle
    from ripper_dist.sources import resolve_demucs
    bundle = ModelBundle.from_exported(export_demucs_source(resolve_demucs(name, repo=Path(repo))))
    return bundle.demucs_bag("cpu", threads)


def child_engine(repo: str, name: str, track: str, overlap: float, threads: int, batch_size: int = 1) -> dict:
    from ripper_dist.engine import separate_array
    bag = _bag(repo, name, threads)
    mix = _load_mix(track)
    t0 = time.perf_counter()
    out = separate_array(bag, mix, overlap=overlap, batch_size=batch_size)
    return {"wall_s": time.perf_counter() - t0, "out": _save(out),
            "chunks": len(bag.plan(mix.shape[1], overlap=overlap))}


def child_bare(repo: str, name: str, track: str, overlap: float, threads: int) -> dict:
    """The floor: the same number of graph runs on ready-made inputs, nothing else."""
    import numpy as np
    bag = _bag(repo, name, threads)
    mix = _load_mix(track)
    tasks = bag.plan(mix.shape[1], overlap=overlap)
    x = np.random.default_rng(0).standard_normal((1, 2, bag.runners[0].chunk_samples)).astype(np.float32)
    t0 = time.perf_counter()
    for t in tasks:
        bag.runners[t.model](x)
    return {"wall_s": time.perf_counter() - t0, "chunks": len(tasks)}


def child_cli(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    rc = subprocess.call(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"wall_s": time.perf_counter() - t0, "rc": rc}


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def child_ray_job(argv: list[str]) -> dict:
    """The Ray driver in this process; a thread samples the object store's shared memory (/dev/shm) meanwhile."""
    import threading

    from ripper_dist.cli import main as cli_main
    base, peak, stop = _shm_used(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _shm_used() - base)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    rc = cli_main(argv)
    stop.set()
    th.join()
    return {"wall_s": time.perf_counter() - t0, "rc": rc, "object_store_peak_mb": peak[0] / 2 ** 20}


CHILDREN = {"upstream": child_upstream, "engine": child_engine, "bare": child_bare, "cli": child_cli,
            "ray_job": child_ray_job}


# -- reports ----------------------------------------------------------------------------------------------------------

def _machine() -> str:
    import onnxruntime
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "-"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, torch {tv}, onnxruntime {onnxruntime.__version__}"


def _run_measured(kind: str, **kw) -> dict:
    """Child process with its peak RSS from wait4 (its own, not the parent's)."""
    cmd = [sys.executable, __file__, "_child", kind, json.dumps(kw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{kind} failed with exit code {code}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


def bench_engine(args) -> None:
    import numpy as np
    repo, name = _repo(args.model)
    track = _track(args.seconds)
    _bag(str(repo), name, args.threads)  # export before timing
    common = dict(repo=str(repo), name=name, track=str(track), overlap=args.overlap, threads=args.threads)
    up = _run_measured("upstream", **common)
    eng = _run_measured("engine", **common, batch_size=args.batch_size)
    bare = _run_measured("bare", **common)
    a, b = np.load(up["out"]), np.load(eng["out"])
    sdr = 10 * np.log10(np.sum(a.astype(np.float64) ** 2) / max(np.sum((a.astype(np.float64) - b) ** 2), 1e-30))
    gflop = eng["chunks"] * HTDEMUCS_GFLOP_PER_SEGMENT
    print(f"# engine benchmark: {name}, {args.seconds:g} s stereo 44.1 kHz, overlap {args.overlap}, "
          f"{args.threads} threads, {eng['chunks']} chunks")
    print(f"# {_machine()}")
    print(f"{'contender':<28}{'wall s':>9}{'x-realtime':>12}{'GFLOP/s':>10}{'peak RSS MB':>13}")
    for label, r in [("upstream demucs apply_model", up), ("ripper-dist engine", eng), ("bare ONNX Runtime loop", bare)]:
        print(f"{label:<28}{r['wall_s']:>9.2f}{args.seconds / r['wall_s']:>12.3f}{gflop / r['wall_s']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}")
    print(f"engine / upstream speed: {up['wall_s'] / eng['wall_s']:.2f}x; engine overhead over bare ORT: "
          f"{(eng['wall_s'] / bare['wall_s'] - 1) * 100:.1f}%; engine vs upstream output: {sdr:.1f} dB SDR; "
          f"CPU peak {CPU_PEAK_GFLOPS_2_CORES * os.cpu_count() / 2:.0f} GFLOP/s")


def bench_cli(args) -> None:
    repo, name = _repo(args.model)
    track = _track(args.seconds)
    _bag(str(repo), name, args.threads)
    out = _work_dir() / "cli-out"
    ours = [sys.executable, "-m", "ripper_dist.cli", "separate", "--engine", "local", "--force", "--no-progress",
            "--repo", str(repo), "-n", name, "-o", str(out / "ours"), str(track)]
    theirs = [sys.executable, "-m", "demucs", "--repo", str(repo), "-n", name, "--shifts", "0", "-o",
              str(out / "demucs"), str(track)]
    r_up = _run_measured("cli", argv=theirs)
    r_ours = _run_measured("cli", argv=ours)
    print(f"# whole-process timing, {args.seconds:g} s track; {_machine()}")
    for label, r in [("demucs CLI", r_up), ("ripper-dist separate", r_ours)]:
        print(f"{label:<24} rc={r['rc']} {r['wall_s']:8.2f} s  {args.seconds / r['wall_s']:.3f}x realtime  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (parent; children not included)")
    print(f"ripper-dist / demucs speed: {r_up['wall_s'] / r_ours['wall_s']:.2f}x")


def bench_pipeline(args) -> None:
    repo, name = _repo(args.model)
    tracks = [_track(args.seconds, name=f"t{i}", seed=i) for i in range(args.tracks)]
    _bag(str(repo), name, args.threads)
    folder = tracks[0].parent
    out = _work_dir() / "pipeline-out"
    base = [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress", "--repo", str(repo),
            "-n", name, *map(str, tracks)]
    local = _run_measured("cli", argv=base + ["--engine", "local", "-o", str(out / "local")])
    ray_ = _run_measured("cli", argv=base + ["--engine", "ray", "-o", str(out / "ray")])
    audio = args.tracks * args.seconds
    print(f"# pipeline: {args.tracks} tracks x {args.seconds:g} s; {_machine()}; folder {folder}")
    for label, r in [("local engine (1 process)", local), ("Ray job (embedded Ray)", ray_)]:
        print(f"{label:<26} {r['wall_s']:8.2f} s  {audio / r['wall_s']:.3f}x realtime")
    print(f"Ray overhead: {(ray_['wall_s'] / local['wall_s'] - 1) * 100:.1f}% (includes starting Ray)")


def bench_memory(args) -> None:
    """Driver RSS and object-store peak must not grow with the number of tracks, nor with one long track."""
    from ripper_export.random_demucs import make_bag_repo
    repo = _work_dir() / "repo-small"
    if not (repo / "small.yaml").exists():
        make_bag_repo(repo, "small", 1, size="small")
    _bag(str(repo), "small", 1)
    rows = []
    cases = [(f"{args.small} tracks x {args.short_seconds:g} s", args.small, args.short_seconds),
             (f"{args.large} tracks x {args.short_seconds:g} s", args.large, args.short_seconds),
             (f"1 track x {args.long_minutes:g} min", 1, args.long_minutes * 60)]
    for label, n, secs in cases:
        folder = _work_dir() / "memory" / f"{n}x{secs:g}"
        if not folder.exists():
            folder.mkdir(parents=True)
            src = _track(secs, name="mem", seed=1)
            for i in range(n):
                os.link(src, folder / f"t{i:04d}.wav")
        out = _work_dir() / "memory-out" / folder.name
        r = _run_measured("ray_job", argv=["separate", "--engine", "ray", "--force", "--no-progress", "--repo",
                                           str(repo), "-n", "small", "-o", str(out), str(folder)])
        rows.append((label, n * secs, r))
    print(f"# memory: Ray driver peak RSS and object-store peak (/dev/shm), small random-weight model; {_machine()}")
    print(f"{'job':<26}{'audio s':>9}{'wall s':>9}{'x-realtime':>12}{'driver RSS MB':>15}{'obj store MB':>14}")
    for label, audio, r in rows:
        print(f"{label:<26}{audio:>9.0f}{r['wall_s']:>9.1f}{audio / r['wall_s']:>12.2f}{r['peak_rss_mb']:>15.0f}"
              f"{r['object_store_peak_mb']:>14.0f}")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, kw = sys.argv[2], json.loads(sys.argv[3])
        res = CHILDREN[kind](**kw)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for what in ("engine", "cli", "pipeline"):
        p = sub.add_parser(what)
        p.add_argument("--model", default="htdemucs", choices=["htdemucs", "htdemucs_ft", "htdemucs_6s"])
        p.add_argument("--seconds", type=float, default=60.0 if what != "pipeline" else 20.0)
        p.add_argument("--overlap", type=float, default=0.25)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--tracks", type=int, default=10)
    p = sub.add_parser("memory")
    p.add_argument("--small", type=int, default=20)
    p.add_argument("--large", type=int, default=200)
    p.add_argument("--short-seconds", type=float, default=5.0)
    p.add_argument("--long-minutes", type=float, default=30.0)
    args = ap.parse_args(argv)
    {"engine": bench_engine, "cli": bench_cli, "pipeline": bench_pipeline, "memory": bench_memory}[args.what](args)


if __name__ == "__main__":
    main()
