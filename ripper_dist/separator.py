"""A separation job, whichever engine runs it: options -> model and family -> resume decisions -> tracks -> rows.

The local engine runs each track as one span in this process; the Ray engine (`ray_pipeline`) spreads spans over an
actor pool and assembles stems on the workers. Both share what is decided here (which tracks to do, output names,
the options key that lets a rerun skip finished work) and the progress bar (audio seconds, x-realtime, ETA).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .error_log import ErrorLog, format_traceback, one_line
from .families import Family, family_for
from .hashing import options_key, sha256_file
from .inputs import TrackInput, assign_tracks, expand_inputs
from .manifest import Manifest, RowContext
from .models import ModelBundle, ModelChoice, export_model
from .options import SeparateOptions
from . import parts, placement
from .progress import Progress


@dataclass
class Job:
    opts: SeparateOptions
    bundle: ModelBundle
    family: Family
    tracks: list[TrackInput]
    todo: list[TrackInput]
    manifest: Manifest
    key: str
    skipped: int = 0
    started: float = field(default_factory=time.time)
    load_s: float = 0.0  # model export/loading before the first track (not counted in the x-realtime)
    refused: list[TrackInput] = field(default_factory=list)  # not regular files or unreadable: rows, never opened
    placement: str = ""  # where the model calls ran, for the summary (`placement`)

    @property
    def errors(self) -> ErrorLog:
        return ErrorLog(self.out_dir)

    def record(self, row: dict) -> dict:
        """Record a finished track: its row in the manifest, a failure's traceback in errors.log."""
        tb = row.pop("traceback", None)
        if row["status"] == "failed":
            self.errors.write(row["input_path"], row["error"], tb)
        self.manifest.record(row)
        return row

    @property
    def out_dir(self) -> Path:
        return self.opts.out

    @property
    def layout(self):
        return self.opts.layout()

    def stem_paths(self, track: TrackInput) -> dict[str, Path]:
        return self.layout.paths(track.track, self.family.stems, track.path)

    def stem_folders(self) -> list[Path]:
        """Every folder this job's stems go to (where an interrupted run may have left temporary files)."""
        return sorted({p.parent for t in self.tracks for p in self.stem_paths(t).values()})

    def rows(self, engine: str) -> RowContext:
        return RowContext(str(self.out_dir), self.opts.model_name, self.opts.format, self.opts.subtype, self.key,
                          engine, job_columns(self.opts, self.bundle, self.family, self.load_s))


def job_columns(opts: SeparateOptions, bundle: ModelBundle, family: Family, load_s: float) -> dict:
    """The metadata columns every row of a job shares: versions, the model's identity, the options as asked."""
    from . import __version__
    from .encoders import BITRATE_FORMATS, DEFAULT_BITRATE
    infos = [i for m in getattr(bundle, "members", [bundle]) for i in m.infos]  # an ensemble: all its members'
    parity = [float(v) for i in infos if (v := i.raw.get("ripper.parity_sdr_db")) not in (None, "")]
    reduced = [float(v) for i in infos for k in ("ripper.fp16_sdr_db", "ripper.bf16_sdr_db")
               if (v := i.raw.get(k)) not in (None, "")]
    segment = getattr(family, "segment_samples", None) or min(i.segment_samples for i in infos)
    return {"ripper_dist_version": __version__,
            "checkpoint_sha256": [i.raw.get("ripper.checkpoint_sha256") or "" for i in infos],
            "parity_sdr_db": min(parity) if parity else None, "precision": opts.precision,
            "precision_sdr_db": min(reduced) if reduced else None, "device": opts.device,
            "shifts": opts.shifts, "overlap": getattr(family, "overlap", None),
            "segment_s": segment / family.sample_rate if family.kind == "demucs" else None,
            "num_overlap": getattr(family, "num_overlap", None), "tta": bool(opts.tta), "stems": list(family.stems),
            "two_stems": opts.two_stems, "other_method": (opts.other_method or "add") if opts.two_stems else None,
            "clip_mode": opts.clip_mode,
            "bitrate_kbps": (opts.bitrate or DEFAULT_BITRATE) if opts.format in BITRATE_FORMATS else None,
            "load_s": round(load_s, 3)}


def resume_options(opts: SeparateOptions, bundle: ModelBundle, family: Family) -> dict:
    """Everything that changes the files written: the model's identity, the family's own options, the output."""
    return {"model": bundle.identity(), "family": family.kind, **family.resume_options(), "format": opts.format,
            "subtype": opts.subtype, "clip": opts.clip_mode, "bitrate": opts.bitrate, "sample_rate": opts.sample_rate,
            "filename": opts.filename}


def load_model(opts: SeparateOptions) -> tuple:
    """(bundle, family) of `opts`: the graphs (exported and parity-checked on first use, cached) and the family that
    plans and runs them with these options; an ensemble's members combined. Shared by the job and the Python API."""
    if opts.is_ensemble:
        from .ensemble import load_ensemble
        return load_ensemble(opts)
    bundle = ModelBundle.from_exported(export_model(ModelChoice.of(opts), check=opts.check_model_shape))
    return bundle, family_for(bundle, opts)


def plan_job(opts: SeparateOptions, tracks: list[TrackInput] | None = None) -> Job:
    """Resolve the inputs, the model, its family, the options key and which tracks still need doing.

    tracks: given by a chained stage (stems of the previous stage, named after their original tracks); None expands
    `opts.inputs` (before the model is loaded, so a wrong path fails in a second, not after an export).
    """
    if tracks is None:
        tracks = assign_tracks(expand_inputs(list(opts.inputs)))
        if not tracks:
            raise ValueError("no input files found")
    opts.check_model_names()
    check_writable(opts.out)  # before any export or track: a read-only or full OUT is a setup error (exit 2)
    if opts.engine != "local" and opts.ray_address():  # no cluster there, or one wanting a token this process
        from .ray_connect import check                  # lacks: one line now, not after the export
        check(opts.ray_address())
    t0 = time.monotonic()
    bundle, family = load_model(opts)
    load_s = time.monotonic() - t0
    opts.out.mkdir(parents=True, exist_ok=True)
    key = options_key(resume_options(opts, bundle, family))
    manifest = Manifest(opts.out)
    todo, skipped = [], 0
    refused = [t for t in tracks if t.error]
    for t in tracks:
        if t.error:
            continue
        if not opts.force and t.path.exists():
            st = t.path.stat()
            if manifest.is_done(opts.model_name, str(t.path), key, st.st_size, st.st_mtime_ns,
                                sha256=lambda p=t.path: sha256_file(p)):
                skipped += 1
                continue
        todo.append(t)
    return Job(opts, bundle, family, tracks, todo, manifest, key, skipped, refused=refused, load_s=load_s)


def check_writable(out: Path) -> None:
    """Create a file in OUT, or in its nearest existing parent when OUT is not there yet (so a job that fails its
    setup leaves no empty OUT behind), or raise OSError naming OUT (read-only filesystem, permissions, disk full)."""
    import tempfile
    where = next((p for p in (out, *out.absolute().parents) if p.exists()), out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ripper-dist-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"-o {out}: cannot write there ({e.strerror})") from None


def clean_leftovers(job: Job) -> None:
    """Remove what an interrupted run left in OUT (see `parts.clean_leftovers`)."""
    parts.clean_leftovers(job.out_dir, job.key, job.stem_folders())


def summary(job: Job, rows: list[dict], wall_s: float) -> str:
    """wall_s: the separation's wall time, without the model's export and loading (`job.load_s`, shown apart)."""
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    audio = sum(r.get("duration_s") or 0 for r in done)
    where = job.layout.template.format(model=job.opts.model_name, track="<track>", trackext="<ext>", stem="<stem>",
                                       ext=job.opts.format)
    counts = (f"{len(done)} done, {len(failed)} failed, {job.skipped} skipped (already done) of {len(job.tracks)} "
              "inputs; ")
    if done:
        speed = (f"{audio:.1f} s of audio separated in {wall_s:.1f} s ({audio / max(wall_s, 1e-9):.2f}x realtime"
                 f"{f' on {job.placement}' if job.placement else ''}; model export/loading {job.load_s:.1f} s not "
                 "counted)")
    else:  # a rerun with everything done, or only failures: no speed to speak of
        speed = f"nothing separated (model export/loading {job.load_s:.1f} s)"
    lines = [counts + speed, f"stems in {job.out_dir / where}, metadata in {job.manifest.path}"]
    for r in failed[:20]:
        lines.append(f"  failed: {r['input_path']}: {r['error']}")
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (see metadata.parquet)")
    if failed:
        lines.append(f"  tracebacks in {job.errors.path}")
    return "\n".join(lines)


def total_duration(tracks: list[TrackInput], limits=None) -> float:
    """Seconds of audio by the files' headers (the local engine's bar; the Ray job learns them on the workers).
    limits: a `watchdog.Limits`; a header that cannot be read in time counts 0 (its track meets the deadline)."""
    from .audio import probe
    from .watchdog import Deadline, Limits, run_with_deadline
    limits = Limits(min(limits.track_s, 60.0) if limits and limits.track_s else 0.0, 0.0)
    total = 0.0
    for t in tracks:
        try:
            total += run_with_deadline(lambda d, p=t.path: probe(p), Deadline(limits, str(t.path))).duration_s
        except (ValueError, OSError):  # TimeoutError is an OSError
            pass
    return total


def run_local(job: Job) -> list[dict]:
    """Tracks one after another in this process: each track is one span of the shared work unit, under a deadline
    (`watchdog`); any exception fails its track only (its row, its traceback in errors.log)."""
    from .cpu_backend import backend_of
    from .onnx_model import batch_plan, fit_runners
    from .span_work import separate_track
    from .watchdog import Deadline, guard, run_with_deadline
    opts, family = job.opts, job.family
    t0 = time.monotonic()
    batch_size, fit_gpu = batch_plan(opts.batch_size, opts.device)
    runners = job.bundle.runners(opts.device, opts.threads, family.models, max_batch=batch_size,
                                 backend=opts.backend)
    backend = backend_of(runners)
    if fit_gpu:
        batch_size = fit_runners(runners, batch_size)
    from .device import is_gpu
    threads = opts.threads or placement.usable_cores()
    job.placement = (f"this process, {opts.device}" if is_gpu(opts.device) else
                     f"this process, {threads} {backend or 'cpu'} thread{'s' if threads != 1 else ''}")
    job.load_s += time.monotonic() - t0  # the sessions: loading, not separating
    rows_ctx = job.rows("local")
    progress = Progress(total_duration(job.todo, opts.limits()), enabled=opts.progress)
    rows = []
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        for track in job.todo:
            started = time.time()
            try:
                paths, plan, info = run_with_deadline(lambda d, track=track: separate_track(
                    family, guard(runners, d), track.path, job.stem_paths(track), output=opts.output(),
                    batch_size=batch_size, progress=lambda n: progress.update(n / family.sample_rate), deadline=d),
                    Deadline(opts.limits(), str(track.path)))
                row = rows_ctx.done(str(track.path), track.track, plan=plan, paths=paths, started=started,
                                    finished=time.time(), node=socket.gethostname(), worker=worker,
                                    backend=backend, compute_s=info["compute_s"], **info["stems"])
            except Exception as e:  # noqa: BLE001 - one track's failure is its row, never the job's end
                row = rows_ctx.failed(str(track.path), track.track, one_line(e), started_at=started,
                                      node=socket.gethostname(), worker=worker, traceback=format_traceback(e))
            rows.append(job.record(row))
    finally:
        progress.close()
        job.manifest.compact()
    return rows


def choose_engine(opts: SeparateOptions, n_todo: int) -> str:
    """`--engine auto` for this job (`placement.choose_engine`: the rule and why)."""
    return placement.choose_engine(opts.engine, n_tracks=n_todo, address=opts.ray_address(), shared_fs=opts.shared_fs,
                                   actors=opts.actors, cores=opts.num_cpus or placement.usable_cores())


def run_stage(opts: SeparateOptions, tracks: list[TrackInput] | None = None) -> int:
    job = plan_job(opts, tracks)
    clean_leftovers(job)
    refused = [job.record(job.rows("listing").failed(str(t.path), t.track, t.error)) for t in job.refused]
    t0, load_before = time.monotonic(), job.load_s
    try:
        if not job.todo:
            rows = []
        elif choose_engine(opts, len(job.todo)) == "ray":
            from .ray_pipeline import run_ray
            rows = run_ray(job)
        else:
            rows = run_local(job)
        rows = refused + rows
    finally:  # also what a worker of a killed earlier run wrote after the cleanup above
        clean_leftovers(job)
    job.manifest.compact()
    wall = time.monotonic() - t0 - (job.load_s - load_before)  # the local engine's sessions count as loading
    print(summary(job, rows, wall), file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def run_separation(opts: SeparateOptions) -> int:
    """Run the job, then each `--then STEM=MODEL` stage on the STEM files the previous stage wrote."""
    rc = run_stage(opts)
    for stem, model in opts.then:
        prev = Manifest(opts.out)
        tracks = [TrackInput(opts.out / r["stem_paths"][stem], r["track"])
                  for r in sorted(prev.rows_of(opts.model_name), key=lambda r: r["track"])
                  if r["status"] == "done" and stem in (r["stem_paths"] or {})]
        if not tracks:
            print(f"--then {stem}={model}: no finished track has a {stem!r} stem", file=sys.stderr)
            return rc or 1
        opts = opts.chained(stem, model)
        rc = max(rc, run_stage(opts, tracks))
    return rc
