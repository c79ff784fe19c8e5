"""The Ray job: tracks -> spans -> ONNX Runtime actors -> span parts -> stems assembled on the workers -> rows.

The driver touches no audio sample. It plans nothing heavier than a list of paths, schedules, draws the progress bar
and records the manifest; what reaches it per track is one metadata row (a few hundred bytes).

Stages of one Ray Dataset, streaming (no barrier, no ordering: a slow span stalls nothing else):
1. `_plan` (CPU tasks, one per track): probe, hash, the family's one pass over the track (Demucs: normalisation
   statistics), and the cut into spans (`span_work.plan_track`). A long track, or a short one when there are fewer
   tracks than actors, becomes several spans, so its work spreads over the actors; a span is at most
   `SPAN_SECONDS_MAX` long, which bounds every process's memory however long the track. A bad file becomes one row
   carrying its error.
2. `SpanSeparator` (the actor pool: one actor per GPU, or CPU actors with ORT threads matched to the cores): runs the
   span (`span_work.run_span`, the same work unit as the local engine) and streams its output into a span part; a
   CPU actor given a whole track as one span writes its stems directly instead (no part round trip).
3. `_finish` (CPU tasks): the task that sees the last span of a track claims it, assembles the stems from the parts
   in order (resampling, clipping, encoding: never on a GPU actor), publishes them and builds the track's row
   (or passes on the row of a track its actor already wrote).

Filesystems: by default every node reads the inputs and writes OUT directly (NFS or one machine). With
`--no-shared-fs`, planning and finishing are pinned to the driver's node and the actors read their windows from, and
send their parts to, a `node_io.NodeIO` actor there: inputs and stems never need to exist on a worker's disk.

Faults: Ray Data restarts dead actors and reruns their batches; a part is published by rename and a track is claimed
once, so a rerun span changes nothing. A Python error in a span becomes that track's failed row. A track the job did
not finish (driver killed) is redone by the next run; its leftover parts are removed first.
"""
from __future__ import annotations

import functools
import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from . import ray_connect
from .error_log import format_traceback, one_line
from .families import Family
from .manifest import Manifest, RowContext
from .options import SeparateOptions
from .parts import TrackParts, clean_leftovers, parts_root
from .models import graph_bytes
from .placement import ActorShape, actor_shape, usable_cores
from .progress import Progress
from .span_work import TrackPlan, check_unchanged, open_reader, plan_track, run_span, stem_sink
from .stem_sink import StemLayout, StemOutput
from .watchdog import Deadline, Limits, guard, run_with_deadline

SPAN_SECONDS_MAX = 120  # per span: ~170 MB of htdemucs float32 stems in flight at most, ~5% calls run twice at cuts
SPAN_SECONDS_MIN = 15   # a span shorter than this spends more on its edge chunks than spreading gains
ROW_COLUMNS = ("kind", "track_idx", "seconds", "duration_s", "row")  # all the driver receives


class RayJob(Protocol):
    """What the Ray engine takes of a planned job (`separator.Job` is one): the tracks to do and where their rows and
    stems go. Structural, so this module depends on neither the job planner nor the command line."""

    opts: SeparateOptions
    family: Family
    todo: list                # `inputs.TrackInput`s: .path, .track
    key: str                  # the options key: names the span parts, marks the rows
    manifest: Manifest
    load_s: float             # loading time so far; starting Ray is added to it (not in the x-realtime)
    placement: str            # set here: the actor pool, for the summary

    @property
    def bundle(self): ...     # .graphs: the ONNX graph bytes, one per sub-model

    @property
    def out_dir(self) -> Path: ...

    @property
    def layout(self) -> StemLayout: ...

    def rows(self, engine: str) -> RowContext: ...

    def record(self, row: dict) -> dict: ...

    def stem_folders(self) -> list[Path]: ...


@dataclass(frozen=True)
class JobSpec:
    """What the workers need to know about the job (no graphs: those travel once, as object refs)."""

    family: Family
    rows: RowContext
    parts_root: str
    layout: StemLayout
    output: StemOutput
    n_tracks: int
    actors: int
    io: object = None  # the NodeIO actor handle with --no-shared-fs
    limits: Limits = Limits()

    def n_spans(self, length: int) -> int:
        sr = self.family.sample_rate
        n = math.ceil(length / (SPAN_SECONDS_MAX * sr))
        if self.n_tracks < 2 * self.actors:  # too few tracks to keep every actor busy: spread each one
            n = max(n, min(self.actors, length // (SPAN_SECONDS_MIN * sr)))
        return max(1, n)

    def out_paths(self, track: str, path: str) -> dict:
        return self.layout.paths(track, self.family.stems, path)

    def parts(self, track: str, n_spans: int):
        if self.io is not None:
            from .node_io import RemoteParts
            return RemoteParts(self.io, self.parts_root, track, n_spans)
        return TrackParts(self.parts_root, track, n_spans)

    def reader(self, path: str):
        if self.io is not None:
            from .node_io import RemoteReader
            return RemoteReader(self.io, path, self.family.sample_rate, self.family.channels)
        return open_reader(self.family, path)


# -- stage 1: plan --------------------------------------------------------------------------------------------------
def _plan(row: dict, *, spec: JobSpec) -> list[dict]:
    base = {"track_idx": int(row["track_idx"]), "path": row["path"], "track": row["track"], "span": 0,
            "n_spans": 0, "plan": "", "error": "", "traceback": ""}

    def plan_it(deadline: Deadline) -> TrackPlan:
        with open_reader(spec.family, row["path"]) as reader:
            deadline.set_duration(reader.info.duration_s)
            return plan_track(spec.family, reader, spec.n_spans)

    try:
        plan = run_with_deadline(plan_it, Deadline(spec.limits, row["path"]))
    except Exception as e:  # noqa: BLE001 - any failure belongs on this track's row
        return [base | {"error": one_line(e), "traceback": format_traceback(e)}]
    text = json.dumps(plan.to_row())
    return [base | {"span": k, "n_spans": len(plan.spans), "plan": text} for k in range(len(plan.spans))]


# -- stage 2: separate spans ----------------------------------------------------------------------------------------
def onnx_runners(graphs: list, device: str, threads: int | None, max_batch: int, backend: str = "ort") -> list:
    """The actor's runners on `backend` (`auto` is resolved on the actor's own machine: cluster nodes differ).
    None: a sub-model no selected stem needs (never called). ORT does not busy-wait here (the actor shares its
    cores with planning and finishing tasks)."""
    from .cpu_backend import make_runners
    return make_runners(graphs, device, threads, backend, spin=False, max_batch=max_batch)


class SpanSeparator:
    """Actor: ONNX Runtime sessions for the (sub-)models the stems need; span rows in, span rows out (no audio)."""

    def __init__(self, graph_refs, *, spec: JobSpec, device: str, threads: int | None, batch_size: int,
                 fit_gpu: bool = False, make_runners=onnx_runners):
        import ray

        from .onnx_model import fit_runners
        from .cpu_backend import backend_of
        self.runners = make_runners(ray.get(list(graph_refs)), device, threads, batch_size)
        self.backend = backend_of(self.runners)
        if fit_gpu:  # `--batch-size auto`: each session measures what its GPU holds (and halves on OOM)
            batch_size = fit_runners(self.runners, batch_size)
        self.spec, self.batch_size = spec, batch_size
        # CPU actors encode one-span tracks themselves (the finishing task would cost the same CPU plus a part written
        # and read back); a GPU actor never waits on an encoder, and without a shared filesystem stems are written on
        # the driver's node.
        self.encode_here = device == "cpu" and spec.io is None
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")  # set by Ray for an actor that holds a GPU
        self.node = socket.gethostname()
        node_id = ray.get_runtime_context().get_node_id()[:8]  # hostnames can repeat (containers, one machine)
        self.actor = f"{self.node}:{os.getpid()}:{node_id}" + (f":gpu{gpu}" if gpu else "")

    def _whole(self, deadline: Deadline, path: str, track: str, plan: TrackPlan) -> tuple[dict, str]:
        """A one-span track on a CPU actor with the stems' folder at hand: straight into its stem files, as the local
        engine does (no part written and read back); returns (span info, the track's row)."""
        spec = self.spec
        sink = stem_sink(spec.family, plan, spec.out_paths(track, path), spec.output)
        try:
            with spec.reader(path) as reader:
                info = run_span(spec.family, guard(self.runners, deadline), reader, plan, 0, self.batch_size, sink)
            check_unchanged(path, plan)
            deadline.check()  # expired while the last blocks were written: the caller has given up on it
        except BaseException:
            sink.abort()
            raise
        paths = sink.close()
        row = spec.rows.done(path, track, plan=plan, paths=paths, started=info["started"], finished=time.time(),
                             node=self.node, worker=self.actor, backend=self.backend, compute_s=info["compute_s"],
                             **sink.row_fields())
        return info, json.dumps(row)

    def _one(self, deadline: Deadline, path: str, track: str, span: int, n_spans: int, plan: TrackPlan) -> dict:
        parts = self.spec.parts(track, n_spans)
        writer = parts.writer(span)
        try:
            with self.spec.reader(path) as reader:
                info = run_span(self.spec.family, guard(self.runners, deadline), reader, plan, span,
                                self.batch_size, writer)
            deadline.check()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        parts.mark(span, info | {"actor": self.actor, "node": self.node, "backend": self.backend})
        return info

    def __call__(self, batch: dict) -> dict:
        n = len(batch["track_idx"])
        errors = [str(e) for e in batch["error"]]
        tracebacks = [str(t) for t in batch["traceback"]]
        compute = np.zeros(n)
        rows = [""] * n
        for i in range(n):
            if errors[i]:
                continue
            try:
                plan = TrackPlan.from_row(json.loads(str(batch["plan"][i])))
                path, track, n_spans = str(batch["path"][i]), str(batch["track"][i]), int(batch["n_spans"][i])
                span = int(batch["span"][i])
                a, b = plan.spans[span]

                def work(deadline: Deadline):
                    if n_spans == 1 and self.encode_here:
                        return self._whole(deadline, path, track, plan)
                    return self._one(deadline, path, track, span, n_spans, plan), ""

                what = path if n_spans == 1 else f"{path} (span {span + 1} of {n_spans})"
                info, rows[i] = run_with_deadline(
                    work, Deadline(self.spec.limits, what, (b - a) / self.spec.family.sample_rate))
                compute[i] = info["compute_s"]
            except Exception as e:  # noqa: BLE001 - the track fails, the job goes on
                errors[i], tracebacks[i] = one_line(e), format_traceback(e)
        return {k: batch[k] for k in batch if k not in ("error", "traceback")} | {
            "error": np.array(errors, dtype=object), "traceback": np.array(tracebacks, dtype=object),
            "compute_s": compute, "row": np.array(rows, dtype=object)}


# -- stage 3: assemble finished tracks ------------------------------------------------------------------------------
def _assemble(spec: JobSpec, path: str, track: str, parts: TrackParts, plan: TrackPlan) -> dict:
    family = spec.family
    sink = stem_sink(family, plan, spec.out_paths(track, path), spec.output)
    try:
        for block in parts.blocks(len(family.stems), family.channels):
            sink.write(block)
        for name, arrays in parts.sides():
            sink.side(name, arrays)
        check_unchanged(path, plan)
    except BaseException:
        sink.abort()
        raise
    paths = sink.close()
    metas = parts.metas()
    actors = sorted({m["actor"] for m in metas})
    return spec.rows.done(path, track, plan=plan, paths=paths, started=min(m["started"] for m in metas),
                          finished=time.time(), node=",".join(sorted({m["node"] for m in metas})),
                          worker=",".join(actors), backend=",".join(sorted({m.get("backend", "") for m in metas})),
                          compute_s=sum(float(m.get("compute_s") or 0) for m in metas), **sink.row_fields())


def _finish(batch: dict, *, spec: JobSpec) -> dict:
    n = len(batch["track_idx"])
    kinds, seconds, durations, rows = [], np.zeros(n), np.zeros(n), []
    sr = spec.family.sample_rate
    for i in range(n):
        path, track = str(batch["path"][i]), str(batch["track"][i])
        n_spans, error, tb = int(batch["n_spans"][i]), str(batch["error"][i]), str(batch["traceback"][i])
        plan = TrackPlan.from_row(json.loads(str(batch["plan"][i]))) if str(batch["plan"][i]) else None
        durations[i] = plan.duration_s if plan else 0.0
        kind, row = "span", ""
        if str(batch["row"][i]):  # separated and written by the actor in one go
            kind, row = "done", str(batch["row"][i])
            seconds[i] = plan.length / sr
        elif plan is None:  # failed while planning: the track's only row
            kind, row = "failed", json.dumps(spec.rows.failed(path, track, error, traceback=tb))
        else:
            a, b = plan.spans[int(batch["span"][i])]
            seconds[i] = (b - a) / sr
            parts = TrackParts(spec.parts_root, track, n_spans)
            if error:
                if parts.claim():
                    kind, row = "failed", json.dumps(spec.rows.failed(path, track, error, traceback=tb))
                    parts.remove()
            elif parts.complete() and parts.claim():
                try:
                    done = run_with_deadline(lambda d: _assemble(spec, path, track, parts, plan),
                                             Deadline(spec.limits, f"{path} (writing its stems)", plan.duration_s))
                    kind, row = "done", json.dumps(done)
                except Exception as e:  # noqa: BLE001
                    kind, row = "failed", json.dumps(spec.rows.failed(path, track, one_line(e),
                                                                      traceback=format_traceback(e)))
                parts.remove()
        kinds.append(kind)
        rows.append(row)
    return {"kind": np.array(kinds, dtype=object), "track_idx": np.asarray(batch["track_idx"]),
            "seconds": seconds, "duration_s": durations, "row": np.array(rows, dtype=object)}


# -- the driver -----------------------------------------------------------------------------------------------------
RAY_LOG = ".ripper-dist/ray.log"


class NativeStderrToFile:
    """Send what native code writes to file descriptor 2 (Ray's C++ core worker and the raylet it spawns, e.g.
    `logging.cc:... Set ray log level`, `core_worker.cc:...`) to a file, while Python's `sys.stderr` (the progress bar,
    the summary, errors) keeps going to the terminal."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._saved_fd: int | None = None
        self._py_stderr = None

    def __enter__(self) -> "NativeStderrToFile":
        import sys
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            real = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest's capture): leave it alone
            real = False
        if real:
            self._py_stderr = sys.stderr
            sys.stderr = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, errors="backslashreplace")
        return self

    def __exit__(self, *exc) -> None:
        import sys
        if self._saved_fd is None:
            return
        if self._py_stderr is not None:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = self._py_stderr
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None


#: Ray starts its workers at nice 15 by default, so its own daemons stay responsive. Here the workers are the job's
#: compute: at nice 15 any low-priority work on the machine (a nice-19 build, an indexer) takes a third or more of
#: their CPU (docs/BENCHMARKS.md, "Shared machines"). A Ray started here runs them at normal priority; a cluster's
#: `ray start` needs RAY_worker_niceness=0 in its environment (cluster.yaml sets it), and the job warns otherwise.
WORKER_NICENESS = 0


def workers_niceness(timeout: float = 30.0) -> int | None:
    """The niceness of this cluster's worker processes (a zero-CPU task reads it), or None if it cannot be read."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)
    try:
        return int(ray.get(niceness.remote(), timeout=timeout))
    except Exception:  # noqa: BLE001 - a check, never a reason to fail the job
        return None


def niceness_advice(nice: int | None) -> str:
    """What to do about workers at `nice` ('' when they run at normal priority or it is unknown)."""
    if nice is None or nice <= WORKER_NICENESS:
        return ""
    return ("other work on its machines takes CPU from them (Ray's default is nice 15); start Ray with "
            "RAY_worker_niceness=0 in the environment, as cluster.yaml does")


def warn_if_workers_niced(out=None) -> int | None:
    """Say so when the connected cluster runs its workers below normal priority (Ray's default)."""
    nice = workers_niceness()
    if niceness_advice(nice):
        print(f"warning: this Ray cluster runs its workers at nice {nice}: {niceness_advice(nice)}",
              file=out or sys.stderr, flush=True)
    return nice


class RayEngine:
    """The Ray this command uses: an existing cluster (`--address`, RAY_ADDRESS) or an embedded one it starts and
    stops. Ray Data's global `DataContext` is set for the job and restored after it. Unless `-v`, Ray's own native
    log lines go to `OUT/.ripper-dist/ray.log`, not to the terminal."""

    def __init__(self, opts: SeparateOptions):
        self.opts = opts
        self.started_here = False
        self._saved: dict | None = None
        self._quiet: NativeStderrToFile | None = None

    def __enter__(self) -> "RayEngine":
        out = getattr(self.opts, "out", None)
        if not self.opts.verbose and out is not None:
            self._quiet = NativeStderrToFile(Path(out) / RAY_LOG).__enter__()
        try:
            self._init_ray()
        except BaseException:
            if self._quiet is not None:
                self._quiet.__exit__(None, None, None)
                self._quiet = None
            raise
        return self

    def _init_ray(self) -> None:
        import logging

        import ray
        if not ray.is_initialized():
            verbose = self.opts.verbose
            if not verbose:  # Ray's own INFO/WARNING chatter would bury the progress bar
                warnings.filterwarnings("ignore", module=r"ray\.")
            kwargs = dict(include_dashboard=False, log_to_driver=verbose,
                          logging_level=logging.INFO if verbose else logging.ERROR)
            address = self.opts.ray_address()
            if address:  # a cluster that is not there, or wants a token this process lacks: one line, at once
                log = "Ray's log lines: " + (f"{Path(self.opts.out) / RAY_LOG}, or -v" if self._quiet else "above")
                ray_connect.connect(address, log_hint=log, **kwargs)
                warn_if_workers_niced()
            else:
                ray_connect.start_local(num_cpus=self.opts.num_cpus or usable_cores(),
                                        _system_config={"worker_niceness": WORKER_NICENESS}, **kwargs)
            self.started_here = True

    def data_context(self, block_bytes: int) -> None:
        import logging

        import ray.data
        if not self.opts.verbose:  # after importing ray.data, which sets up its own loggers
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        names = ("target_max_block_size", "enable_progress_bars", "print_on_execution_start")
        self._saved = {n: getattr(ctx, n) for n in names} | {"preserve_order": ctx.execution_options.preserve_order}
        ctx.target_max_block_size = block_bytes
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = False  # rows are independent: no track waits for another

    def __exit__(self, *exc) -> None:
        import ray
        if self._saved is not None:
            import ray.data
            ctx = ray.data.DataContext.get_current()
            for n, v in self._saved.items():
                if n == "preserve_order":
                    ctx.execution_options.preserve_order = v
                else:
                    setattr(ctx, n, v)
        try:
            if self.started_here:
                ray_connect.disconnect()
        finally:
            if self._quiet is not None:
                self._quiet.__exit__(*exc)
                self._quiet = None


def pool_shape(opts: SeparateOptions, resources: dict) -> ActorShape:
    """The actor pool for this job on a cluster with `resources` (`placement.actor_shape`: the rule and why)."""
    from .device import is_gpu, parse_device
    kind = parse_device(opts.device)[0] if is_gpu(opts.device) else None
    return actor_shape(gpu_kind=kind, cpus=int(resources.get("CPU", 1)), gpus=int(resources.get("GPU", 0)),
                       actors=opts.actors, threads=opts.threads)


def block_bytes(n_tracks: int, actors: int) -> int:
    """Ray Data block size for the (small) rows: a block is one task. Enough tracks to keep every actor busy: a few
    dozen span rows per block, since each task costs the driver's scheduler milliseconds whatever its size (200 x
    10 s tracks: 2.3 ms of driver CPU per audio second with 4 KiB blocks and a task per track); fewer tracks: one row
    per block, so spans spread over the actors."""
    return 16 * 1024 if n_tracks >= 2 * actors else 1


def source_blocks(n_tracks: int, actors: int) -> int:
    """Planning tasks: one per track while tracks are few; batches of up to 8 tracks for archives."""
    return n_tracks if n_tracks < 2 * actors else min(n_tracks, max(4 * actors, math.ceil(n_tracks / 8)))


class _Totals:
    """Progress total while durations are learned on the workers: known seconds plus the mean for the rest."""

    def __init__(self, n_tracks: int):
        self.n, self.known, self.seconds = n_tracks, set(), 0.0

    def add(self, idx: int, seconds: float) -> float | None:
        """The new estimate when `idx` is a track not seen before (O(1): it runs for every row of an archive)."""
        if idx in self.known or not seconds:
            return None
        self.known.add(idx)
        self.seconds += seconds
        return self.seconds * self.n / len(self.known)


def run_ray(job: RayJob, *, make_runners=onnx_runners) -> list[dict]:
    """Run the job's tracks on Ray; returns their rows (also recorded in the manifest as they arrive).

    make_runners(graphs, device, threads, max_batch): builds an actor's runners (default: ONNX Runtime sessions)."""
    tracks = dict(enumerate(job.todo))
    if not tracks:
        return []
    opts = job.opts
    if make_runners is onnx_runners:
        make_runners = functools.partial(onnx_runners, backend=opts.backend)
    rows_out: list[dict] = []
    closed: set[int] = set()
    progress = None
    t0 = time.monotonic()
    with RayEngine(opts) as engine:
        job.load_s += time.monotonic() - t0  # starting Ray is loading too: not in the summary's x-realtime
        import ray
        import ray.data
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .onnx_model import batch_plan
        shape = pool_shape(opts, ray.cluster_resources())
        job.placement = f"Ray, {shape.describe()}"
        few = len(tracks) < 2 * shape.actors
        engine.data_context(block_bytes(len(tracks), shape.actors))
        family = job.family
        here: dict = {}
        io = None
        if not opts.shared_fs:
            from .node_io import NodeIO
            pin = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            here = {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}
            io = ray.remote(NodeIO).options(num_cpus=0, max_concurrency=16, scheduling_strategy=pin).remote(
                family.sample_rate, family.channels)
        spec = JobSpec(family=family, rows=job.rows("ray"), parts_root=str(parts_root(job.out_dir, job.key)),
                       layout=job.layout, output=opts.output(), n_tracks=len(tracks),
                       actors=shape.actors, io=io, limits=opts.limits())
        graph_refs = [ray.put(graph_bytes(g)) if m in family.models else None
                      for m, g in enumerate(job.bundle.graphs)]
        rows_per_call, fit_gpu = batch_plan(opts.batch_size, shape.device)
        items = [{"track_idx": i, "path": str(t.path), "track": t.track} for i, t in tracks.items()]
        ds = ray.data.from_items(items, override_num_blocks=source_blocks(len(items), shape.actors))
        ds = ds.flat_map(_plan, fn_kwargs=dict(spec=spec), num_cpus=0.25, **here)
        ds = ds.map_batches(
            SpanSeparator, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs=dict(graph_refs=graph_refs, spec=spec, device=shape.device,
                                       threads=shape.threads, batch_size=rows_per_call, fit_gpu=fit_gpu,
                                       make_runners=make_runners),
            # few tracks: one span per actor at a time, so a second actor is not left idle behind a busy first
            compute=ray.data.ActorPoolStrategy(size=shape.actors,
                                               max_tasks_in_flight_per_actor=1 if few else 2),
            num_cpus=shape.num_cpus, num_gpus=shape.num_gpus)
        ds = ds.map_batches(_finish, fn_kwargs=dict(spec=spec), batch_size=1, batch_format="numpy", num_cpus=0.25,
                            **here)
        progress = Progress(None, enabled=opts.progress)
        totals = _Totals(len(tracks))
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for i in range(len(batch["kind"])):
                    idx = int(batch["track_idx"][i])
                    total = totals.add(idx, float(batch["duration_s"][i]))
                    if total is not None:
                        progress.set_total(total)
                    if idx in closed:
                        continue
                    progress.update(float(batch["seconds"][i]))
                    if batch["kind"][i] != "span":
                        row = json.loads(str(batch["row"][i]))
                        closed.add(idx)
                        rows_out.append(job.record(row))
        finally:
            progress.close()
            for idx, t in tracks.items():  # tracks that never came back (the job was cut short)
                if idx not in closed:
                    row = spec.rows.failed(str(t.path), t.track, "incomplete: the job ended before this track did")
                    rows_out.append(job.record(row))
            job.manifest.compact()
            # parts, and temporary files of a worker killed mid-write (its span or track was redone elsewhere)
            clean_leftovers(job.out_dir, job.key, job.stem_folders())
    return rows_out
