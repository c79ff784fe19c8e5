"""What `ripper-dist evaluate` costs: seconds per track (BSS Eval v4 via museval, 4 stereo stems at 44.1 kHz) and how
the Ray engine scales with CPUs (one task per track).

    python jobs/bench_evaluate.py [--seconds 30] [--tracks 4] [--cpus 1 2]   # --cpus alone: the local run only

Synthetic references and estimates (reference + noise + leakage), written once; each configuration runs in a fresh
evaluation (`--force`).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

STEMS = ("drums", "bass", "other", "vocals")


def make_job(root: Path, tracks: int, seconds: float) -> tuple[Path, Path]:
    from ripper_dist.manifest import Manifest
    refs, out = root / "refs", root / "out"
    rng = np.random.default_rng(0)
    n = int(seconds * 44100)
    manifest = Manifest(out)
    for k in range(tracks):
        ref = {s: (0.2 * rng.standard_normal((n, 2))).astype(np.float32) for s in STEMS}
        paths = {}
        for i, s in enumerate(STEMS):
            (refs / f"t{k}").mkdir(parents=True, exist_ok=True)
            sf.write(refs / f"t{k}" / f"{s}.wav", ref[s], 44100, subtype="FLOAT")
            est = ref[s] + 0.1 * ref[STEMS[(i + 1) % 4]] + 0.02 * rng.standard_normal((n, 2)).astype(np.float32)
            (out / f"t{k}").mkdir(parents=True, exist_ok=True)
            sf.write(out / f"t{k}" / f"{s}.wav", est, 44100, subtype="FLOAT")
            paths[s] = f"t{k}/{s}.wav"
        manifest.record({"input_path": str(root / "in" / f"t{k}.wav"), "track": f"t{k}", "status": "done",
                         "model": "bench", "stem_paths": paths})
    manifest.compact()
    return refs, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tracks", type=int, default=4)
    ap.add_argument("--cpus", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
    from ripper_dist.evaluate import EvaluateOptions, run_evaluation
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        refs, out = make_job(Path(tmp), a.tracks, a.seconds)
        t0 = time.perf_counter()
        rows, _ = run_evaluation(EvaluateOptions(out=out, references=refs, engine="local", force=True))
        local = time.perf_counter() - t0
        print(f"local, {a.tracks} tracks of {a.seconds:g} s: {local:.1f} s = {local / a.tracks:.1f} s per track "
              f"({local / a.tracks / a.seconds:.2f} s per audio second)")
        from ripper_dist.evaluate import bleed_full, l1_freq  # MSST's scores: their share of the local time
        t0 = time.perf_counter()
        for k in range(a.tracks):
            for s in STEMS:
                x, sr = sf.read(refs / f"t{k}" / f"{s}.wav", dtype="float32", always_2d=True)
                y, _ = sf.read(out / f"t{k}" / f"{s}.wav", dtype="float32", always_2d=True)
                l1_freq(x, y), bleed_full(x, y, sr)
        msst = time.perf_counter() - t0
        print(f"  of which MSST's l1_freq + bleedless/fullness: {msst / a.tracks:.2f} s per track "
              f"({100 * msst / local:.0f}%)")
        for cpus in a.cpus:
            t0 = time.perf_counter()
            run_evaluation(EvaluateOptions(out=out, references=refs, engine="ray", num_cpus=cpus, force=True))
            wall = time.perf_counter() - t0
            print(f"ray, {cpus} CPUs: {wall:.1f} s wall for {a.tracks} tracks ({local / wall:.2f}x the local run, "
                  "Ray start included)")


if __name__ == "__main__":
    main()
