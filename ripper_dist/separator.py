"""A separation job, whichever engine runs it: inputs -> resume decisions -> tracks -> stems + metadata rows.

The local engine runs tracks one after another in this process; the Ray engine (`ray_pipeline`) spreads their chunks
over an actor pool. Both share the decisions made here (which tracks to do, output names, the options key that makes
a rerun skip finished work) and the progress bar (audio seconds, x-realtime, ETA).
"""
from __future__ import annotations

import copy
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .audio import AudioError, probe
from .inputs import TrackInput, assign_tracks, expand_inputs
from .manifest import Manifest, options_key
from .models import ModelBundle, export_model
from .sources import sha256_file
from .track_output import needed_models, select_stems


@dataclass
class Job:
    out_dir: Path
    bundle: ModelBundle
    tracks: list[TrackInput]
    todo: list[TrackInput]
    manifest: Manifest
    options: dict
    key: str
    stem_map: dict[str, list[int]]
    fmt: str
    subtype: str
    clip: str
    skipped: int = 0
    started: float = field(default_factory=time.time)

    def stem_paths(self, track: TrackInput) -> dict[str, Path]:
        return {s: self.out_dir / track.track / f"{s}.{self.fmt}" for s in self.stem_map}

    @property
    def models(self) -> set[int]:
        return needed_models(self.bundle.full_weights, self.stem_map)


def separation_options(args, bundle: ModelBundle) -> dict:
    return {"model": bundle.identity(), "shifts": args.shifts, "seed": args.seed if args.shifts else None,
            "overlap": args.overlap, "segment": args.segment, "num_overlap": getattr(args, "num_overlap", None),
            "stems": args.stems, "two_stems": args.two_stems, "format": args.format, "subtype": args.subtype,
            "clip": args.clip_mode}


def plan_job(args, tracks: list[TrackInput] | None = None) -> Job:
    """Resolve the model, the stems, the options key and which tracks still need doing.

    tracks: given by a chained stage (stems of the previous stage, named after their original tracks); None expands
    `args.inputs`.
    """
    out_dir = Path(args.out)
    bundle = ModelBundle.from_exported(export_model(args))
    stems = [s.strip() for s in args.stems.split(",")] if args.stems else None
    stem_map = select_stems(bundle.sources, stems, args.two_stems)
    if args.format == "flac" and args.subtype == "FLOAT":
        raise ValueError("flac cannot hold FLOAT samples: use --subtype PCM_16 or PCM_24, or --format wav")
    opts = separation_options(args, bundle)
    key = options_key(opts)
    tracks = tracks if tracks is not None else assign_tracks(expand_inputs(args.inputs))
    if not tracks:
        raise ValueError("no input files found")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    todo, skipped = [], 0
    for t in tracks:
        if not args.force and t.path.exists():
            st = t.path.stat()
            if manifest.is_done(str(t.path), key, st.st_size, st.st_mtime_ns, sha256=lambda p=t.path: sha256_file(p)):
                skipped += 1
                continue
        todo.append(t)
    return Job(out_dir, bundle, tracks, todo, manifest, opts, key, stem_map, args.format, args.subtype,
               args.clip_mode, skipped)


def base_row(job: Job, track: TrackInput, engine: str) -> dict:
    row = {"input_path": str(track.path), "track": track.track, "model": job.bundle.name, "format": job.fmt,
           "subtype": job.subtype, "options_key": job.key, "engine": engine, "node": socket.gethostname(),
           "worker": f"pid-{os.getpid()}"}
    try:
        st = track.path.stat()
        row["input_size"], row["input_mtime_ns"] = st.st_size, st.st_mtime_ns
    except OSError:
        pass
    return row


def failed_row(job: Job, track: TrackInput, error: str, engine: str, **extra) -> dict:
    row = base_row(job, track, engine)
    row.update(status="failed", error=error, stem_paths={}, finished_at=time.time(), **extra)
    return row


def done_row(job: Job, track: TrackInput, engine: str, *, paths: dict[str, Path], info, started: float,
             elapsed: float | None = None, **extra) -> dict:
    """elapsed: the track's processing seconds (default: wall time since `started`; the Ray job passes the summed
    compute time of its chunks, since its chunks run concurrently with other tracks')."""
    finished = time.time()
    elapsed = finished - started if elapsed is None else elapsed
    row = base_row(job, track, engine)
    row.update(status="done", error=None, duration_s=info.duration_s, sample_rate=info.sample_rate,
               channels=info.channels, stem_paths={s: str(Path(p).relative_to(job.out_dir)) for s, p in paths.items()},
               input_sha256=extra.pop("input_sha256", None) or sha256_file(track.path), started_at=started,
               finished_at=finished,
               elapsed_s=elapsed, realtime_x=info.duration_s / max(elapsed, 1e-9))
    row.update(extra)
    return row


class Progress:
    """One bar over audio seconds: shows x-realtime (audio seconds per wall second) and the ETA."""

    def __init__(self, total_s: float, enabled: bool = True, desc: str = "separating"):
        from tqdm import tqdm
        self.bar = tqdm(total=total_s, unit="s", desc=desc, disable=not enabled, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
                        file=sys.stderr)
        self.t0 = time.monotonic()
        self.done = 0.0

    def update(self, seconds: float) -> None:
        self.done += seconds
        if self.bar.total is not None and self.bar.n + seconds > self.bar.total:
            self.bar.total = self.bar.n + seconds  # durations from headers can be short by a few samples
        self.bar.update(seconds)
        self.bar.set_postfix_str(f"{self.done / max(time.monotonic() - self.t0, 1e-9):.2f}x realtime", refresh=False)

    def close(self) -> None:
        self.bar.close()


def summary(job: Job, rows: list[dict], wall_s: float) -> str:
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    audio = sum(r.get("duration_s") or 0 for r in done)
    lines = [f"{len(done)} done, {len(failed)} failed, {job.skipped} skipped (already done) of {len(job.tracks)} "
             f"inputs; {audio:.1f} s of audio in {wall_s:.1f} s ({audio / max(wall_s, 1e-9):.2f}x realtime)",
             f"stems in {job.out_dir}/<track>/, metadata in {job.manifest.path}"]
    for r in failed[:20]:
        lines.append(f"  failed: {r['input_path']}: {r['error']}")
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (see metadata.parquet)")
    return "\n".join(lines)


def total_duration(tracks: list[TrackInput]) -> float:
    total = 0.0
    for t in tracks:
        try:
            total += probe(t.path).duration_s
        except (AudioError, OSError):
            pass
    return total


def _track_separator(job: Job, args, progress: "Progress"):
    """A function track -> {stem: path} for this job's model family (Demucs bag or RoFormer)."""
    from .engine import separate_track, separate_track_msst
    from .onnx_model import batch_plan, fit_runners
    bundle = job.bundle
    batch_size, fit_gpu = batch_plan(args.batch_size, args.device)

    def fitted(runners: list) -> int:
        return fit_runners(runners, batch_size) if fit_gpu else batch_size

    common = dict(stem_map=job.stem_map, fmt=job.fmt, subtype=job.subtype, clip=job.clip)
    if bundle.is_roformer:
        runner = bundle.roformer_runner(args.device, args.threads, max_batch=batch_size)
        common["batch_size"] = fitted([runner])
        sr = runner.info.sample_rate
        return lambda track: separate_track_msst(
            runner, track.path, job.stem_paths(track), instruments=bundle.instruments,
            target_instrument=bundle.target_instrument, num_overlap=args.num_overlap or bundle.num_overlap,
            progress=lambda n: progress.update(n / sr), **common)
    bag = bundle.demucs_bag(args.device, args.threads, job.models, max_batch=batch_size)
    common["batch_size"] = fitted(bag.runners)
    segment = None if args.segment is None else int(args.segment * bag.sample_rate)
    return lambda track: separate_track(
        bag, track.path, job.stem_paths(track), shifts=args.shifts, seed=args.seed, overlap=args.overlap,
        segment_samples=segment, progress=lambda n: progress.update(n / bag.sample_rate), **common)


def run_local(job: Job, args) -> list[dict]:
    """Tracks one after another in this process (the single-process engine)."""
    progress = Progress(total_duration(job.todo), enabled=not args.no_progress)
    rows = []
    try:
        separate = _track_separator(job, args, progress)
        for track in job.todo:
            started = time.time()
            try:
                info = probe(track.path)
                paths = separate(track)
                row = done_row(job, track, "local", paths=paths, info=info, started=started)
            except (AudioError, OSError, ValueError) as e:
                row = failed_row(job, track, f"{type(e).__name__}: {e}", "local", started_at=started)
            job.manifest.record(row)
            rows.append(row)
    finally:
        progress.close()
        job.manifest.compact()
    return rows


def parse_chain(specs: list[str] | None) -> list[tuple[str, str]]:
    """`--then STEM=MODEL` -> [(stem, model)]: the stage after this one splits STEM's file with MODEL."""
    out = []
    for spec in specs or []:
        stem, sep, model = spec.partition("=")
        if not sep or not stem or not model:
            raise ValueError(f"--then {spec!r}: expected STEM=MODEL, e.g. other=htdemucs")
        out.append((stem.strip(), model.strip()))
    return out


def chained_args(args, stem: str, model: str):
    """The next stage's arguments: MODEL on STEM's files, written to OUT/STEM.MODEL/<track>/."""
    nxt = copy.copy(args)
    nxt.model, nxt.checkpoint, nxt.config = model, None, None
    nxt.repo = getattr(args, "then_repo", None)
    nxt.stems = nxt.two_stems = nxt.segment = nxt.num_overlap = None
    nxt.then = None
    nxt.out = Path(args.out) / f"{stem}.{model}"
    return nxt


def run_separation(args) -> int:
    """Run the job, then each `--then STEM=MODEL` stage on the STEM files the previous stage wrote."""
    rc = 0
    tracks = None
    for stage, (stem, model) in enumerate([(None, None)] + parse_chain(getattr(args, "then", None))):
        if stage:
            prev = Manifest(Path(args.out))
            tracks = [TrackInput(Path(args.out) / r["stem_paths"][stem], r["track"])
                      for r in sorted(prev.rows.values(), key=lambda r: r["track"])
                      if r["status"] == "done" and stem in (r["stem_paths"] or {})]
            if not tracks:
                print(f"--then {stem}={model}: no finished track has a {stem!r} stem", file=sys.stderr)
                return rc or 1
            args = chained_args(args, stem, model)
        rc = max(rc, run_stage(args, tracks))
    return rc


def choose_engine(args, job: Job) -> str:
    """`--engine auto`: Ray, except for one track on this machine, where starting Ray, its actors and their sessions
    (5 to 8 s on two cores) costs more than spreading the chunks gains (60 s track: 19.5 s local, 28.1 s Ray)."""
    engine = getattr(args, "engine", "local")
    if engine != "auto":
        return engine
    cluster = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    return "ray" if cluster or len(job.todo) > 1 else "local"


def run_stage(args, tracks: list[TrackInput] | None = None) -> int:
    t0 = time.monotonic()
    job = plan_job(args, tracks)
    engine = choose_engine(args, job)
    if engine == "ray":
        from .ray_pipeline import run_ray
        rows = run_ray(job, args)
    else:
        rows = run_local(job, args)
    print(summary(job, rows, time.monotonic() - t0), file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in rows) else 0
