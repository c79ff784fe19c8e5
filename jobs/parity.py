"""Parity of `ripper-dist separate` with upstream `demucs` on released-size checkpoints (random weights), in dB SDR.

    python jobs/parity.py [--engine local|ray] [--models htdemucs,htdemucs_ft,htdemucs_6s] [--seconds 11.3]

Builds released-size checkpoints in the official `.th` format (htdemucs-like, a 4-model bag with one-hot weights like
htdemucs_ft, a 6-source model), odd-length tracks (stereo 44.1 kHz and mono 48 kHz), separates them through the CLI
(FLOAT, no clipping) and compares every stem with upstream `apply_model` (shifts 0) on the same weights.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from ripper_dist.cli import main as cli
from ripper_export.random_demucs import make_bag_repo
from ripper_export.reference import sdr_db, upstream_stems

BAGS = {"htdemucs": dict(n_models=1), "htdemucs_6s": dict(n_models=1, sources=6),
        "htdemucs_ft": dict(n_models=4, weights=[[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--models", default="htdemucs,htdemucs_ft,htdemucs_6s")
    ap.add_argument("--seconds", type=float, default=11.3)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ripper-dist-parity")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tracks = args.dir / "tracks"
    tracks.mkdir(parents=True, exist_ok=True)
    for name, sr, ch in [("stereo44", 44100, 2), ("mono48", 48000, 1)]:
        n = int(args.seconds * sr) + 7  # odd length
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * 110 * t)[:, None] + 0.1 * rng.standard_normal((n, ch))
        sf.write(tracks / f"{name}.wav", x.astype(np.float32), sr, subtype="FLOAT")
    worst_all = np.inf
    for model in args.models.split(","):
        repo = args.dir / f"repo-{model}"
        if not (repo / f"{model}.yaml").exists():
            make_bag_repo(repo, model, size="released", **BAGS[model])
        out = args.dir / f"out-{model}-{args.engine}"
        rc = cli(["separate", "--engine", args.engine, "--force", "--no-progress", "--repo", str(repo), "-n", model,
                  "--subtype", "FLOAT", "--clip-mode", "none", "-o", str(out), str(tracks)])
        if rc != 0:
            sys.exit(f"{model}: separate failed (exit {rc})")
        df = pd.read_parquet(out / "metadata.parquet")
        for row in df.itertuples():
            ref = upstream_stems(Path(row.input_path), repo=repo, name=model)
            sdrs = {s: sdr_db(ref[s], sf.read(out / p, always_2d=True)[0]) for s, p in dict(row.stem_paths).items()}
            worst = min(sdrs.values())
            worst_all = min(worst_all, worst)
            print(f"{model:<12} {Path(row.input_path).name:<14} {row.sample_rate} Hz {row.channels} ch  "
                  + "  ".join(f"{s} {v:.1f}" for s, v in sdrs.items()) + f"  (min {worst:.1f} dB)", flush=True)
    print(f"worst stem SDR vs upstream demucs: {worst_all:.1f} dB ({'PASS' if worst_all >= 60 else 'FAIL'} >= 60 dB)")
    sys.exit(0 if worst_all >= 60 else 1)


if __name__ == "__main__":
    os.environ.setdefault("RIPPER_DIST_CACHE", str(Path(tempfile.gettempdir()) / "ripper-dist-parity" / "cache"))
    main()
