"""Build a self-contained demo: a released-size htdemucs checkpoint with random weights in the official `.th` format
(upstream repo layout: `demo.yaml` + `<sig>-<sha8>.th`) and a few synthetic tracks (stereo 44.1 kHz, mono 48 kHz).

    python jobs/make_demo.py demo && ripper-dist separate demo/tracks --repo demo/models -n demo -o demo/stems

Pretrained weights need the internet (`-n htdemucs` downloads them); this demo runs anywhere.
"""
import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from ripper_export.random_demucs import make_bag_repo


def synth_track(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    """A little music-like signal: a bass line, a chord pad, a hi-hat-ish noise burst on each beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    beat = 0.5
    bass = 0.3 * np.sin(2 * np.pi * 55 * (1 + (t // (4 * beat)) % 2 * 0.5) * t)
    pad = sum(0.08 * np.sin(2 * np.pi * f * t + p) for f, p in [(220, 0), (277.2, 1), (329.6, 2)])
    env = np.exp(-30 * (t % beat))
    hat = 0.2 * env * rng.standard_normal(t.size)
    mono = bass + pad + hat
    if channels == 1:
        return mono[:, None].astype(np.float32)
    return np.stack([mono + 0.05 * np.sin(2 * np.pi * 440 * t), mono - 0.05 * np.sin(2 * np.pi * 440 * t)],
                    1).astype(np.float32) * 0.8


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--size", default="released", choices=["released", "small"])
    args = ap.parse_args()
    models = args.dest / "models"
    if not (models / "demo.yaml").exists():
        make_bag_repo(models, "demo", n_models=1, size=args.size)
    tracks = args.dest / "tracks"
    tracks.mkdir(parents=True, exist_ok=True)
    for name, secs, sr, ch in [("groove", 12.3, 44100, 2), ("mono_48k", 9.1, 48000, 1), ("short", 3.7, 44100, 2)]:
        path = tracks / f"{name}.wav"
        if not path.exists():
            sf.write(path, synth_track(secs, sr, ch, seed=len(name)), sr, subtype="PCM_16")
    print(f"demo checkpoint repo: {models}  tracks: {tracks}")


if __name__ == "__main__":
    main()
