"""The Ray job: tracks -> chunk rows in a Ray Dataset -> ONNX Runtime actor pool -> streaming overlap-add -> stems.

Stages:
1. `flat_map(_plan_track)` (a task per track): probes the file and emits one row per chunk, no audio: for Demucs the
   engine's `ChunkTask` fields plus the track's normalisation statistics (read once, block by block); for RoFormer
   the MSST chunk fields. A bad file becomes a single error row. Rows of a track come out in track order.
2. `map_batches(ChunkSeparator)` (an actor pool): each actor holds one ONNX Runtime session per sub-model, built from
   ONNX bytes shipped through the object store (no shared filesystem for models). It decodes each chunk's window by
   seeking (`AudioReader`), normalises, runs the graph and returns only the kept part of the output. One actor per
   GPU (`num_gpus=1`, CUDA device 0 as Ray sets CUDA_VISIBLE_DEVICES) or CPU actors with ORT threads matched.
3. The driver iterates the output in order (`preserve_order`) and feeds each track's `TrackOutput` (the same
   overlap-add and stem writers as the local engine); a track's files are published and its metadata row recorded as
   soon as its last chunk arrives. Memory: a few chunks per track in flight, however many tracks the archive holds.

Fault tolerance: Ray Data restarts dead actors and reruns their batches; with ordered output nothing is duplicated,
and the reducer ignores a chunk it has already added in any case. Python errors in a chunk become an error on that
track's row, never a crash of the job.
"""
from __future__ import annotations

import collections
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np

from .audio import AudioError, AudioReader, mix_stats, probe
from .chunking import ChunkTask, MixStats, read_window
from .onnx_model import batch_plan
from .separator import Job, Progress, done_row, failed_row
from .sources import sha256_file
from .track_output import TrackOutput

_TASK_FIELDS = [f for f in ChunkTask.__dataclass_fields__]
_MSST_FIELDS = ["index", "start", "length", "fade_in", "fade_out"]


class DemucsScheme:
    """Demucs `apply_model` chunks: normalisation statistics per track, centred windows, streaming overlap-add."""

    def __init__(self, job: Job, args):
        self.planner = job.bundle.planner()
        self.models = job.models
        self.sample_rate, self.channels = self.planner.sample_rate, self.planner.channels
        self.n_sources = len(self.planner.sources)
        seg = None if args.segment is None else int(args.segment * self.sample_rate)
        self.plan_kwargs = dict(shifts=args.shifts, overlap=args.overlap, seed=args.seed, segment_samples=seg)
        self.keep_max = max(self.planner.segment_samples) if seg is None else seg
        self.empty_row = {f: 0 for f in _TASK_FIELDS} | {"stat_total": 0.0, "stat_total_sq": 0.0, "stat_count": 0}

    def tasks(self, length: int) -> list[ChunkTask]:
        tasks = [t for t in self.planner.plan(length, **self.plan_kwargs) if t.model in self.models]
        return sorted(tasks, key=lambda t: (t.keep_start, t.model, t.shift, t.index))

    def rows(self, reader: AudioReader) -> list[dict]:
        stats = mix_stats(reader)
        common = {"stat_total": stats.total, "stat_total_sq": stats.total_sq, "stat_count": stats.count}
        return [common | t.as_dict() for t in self.tasks(reader.length)]

    @staticmethod
    def _stats(batch, i) -> MixStats:
        return MixStats(float(batch["stat_total"][i]), float(batch["stat_total_sq"][i]), int(batch["stat_count"][i]))

    @staticmethod
    def task(batch, i) -> ChunkTask:
        return ChunkTask.from_dict({f: batch[f][i] for f in _TASK_FIELDS})

    def model_input(self, batch, i, reader: AudioReader, runners: dict) -> tuple[int, ChunkTask, np.ndarray]:
        task = self.task(batch, i)
        window = read_window(reader, task, runners[task.model].chunk_samples, stats=self._stats(batch, i))
        return task.model, task, window

    @staticmethod
    def kept(task: ChunkTask, output: np.ndarray) -> np.ndarray:
        return output[:, :, task.out_start:task.out_start + task.keep_len]

    @staticmethod
    def add(out: TrackOutput, task: ChunkTask, kept: np.ndarray) -> int:
        return out.add(task, kept, kept=True)

    def track_output(self, job: Job, track, info, batch, i, length: int) -> TrackOutput:
        p = self.planner
        return TrackOutput(tasks=self.tasks(length), length=length, sources=p.sources, channels=p.channels,
                           weights=p.weights, stem_map=job.stem_map, out_paths=job.stem_paths(track),
                           model_rate=self.sample_rate, info=info, fmt=job.fmt, subtype=job.subtype, clip=job.clip,
                           stats=self._stats(batch, i))


class MsstScheme:
    """RoFormer (MSST `demix`) chunks: reflect-padded plan, faded windows, the track reduced when complete."""

    def __init__(self, job: Job, args):
        b = job.bundle
        self.models = {0}
        self.sample_rate, self.channels = b.info.sample_rate, b.info.channels
        self.n_sources = len(b.info.sources)
        self.chunk, self.num_overlap = b.info.chunk_samples, args.num_overlap or b.num_overlap
        self.instruments, self.target = b.instruments, b.target_instrument
        self.keep_max = self.chunk
        self.empty_row = {f: 0 for f in _MSST_FIELDS}
        self._plans: dict[int, object] = {}

    def plan(self, length: int):
        from .msst_chunking import plan_chunks
        if length not in self._plans:
            self._plans = {length: plan_chunks(length, self.chunk, self.num_overlap)}
        return self._plans[length]

    def rows(self, reader: AudioReader) -> list[dict]:
        return [c.to_dict() for c in self.plan(reader.length).chunks]

    @staticmethod
    def task(batch, i):
        from .msst_chunking import MsstChunk
        return MsstChunk(**{f: int(batch[f][i]) for f in _MSST_FIELDS})

    def model_input(self, batch, i, reader: AudioReader, runners: dict):
        from .msst_chunking import read_chunk, source_span
        plan = self.plan(int(batch["track_length"][i]))
        chunk = self.task(batch, i)
        a, b = source_span(plan, chunk)
        return 0, chunk, read_chunk(reader.read(a, b), plan, chunk, offset=a)

    @staticmethod
    def kept(chunk, output: np.ndarray) -> np.ndarray:
        return output

    def add(self, out, chunk, kept: np.ndarray) -> int:
        return out.add(chunk, kept)

    def track_output(self, job: Job, track, info, batch, i, length: int):
        from .track_output import MsstTrackOutput

        def read_mix():
            with AudioReader(track.path, self.sample_rate, self.channels) as r:
                return r.read_all()

        return MsstTrackOutput(plan=self.plan(length), n_sources=self.n_sources, channels=self.channels,
                               instruments=self.instruments, target_instrument=self.target, stem_map=job.stem_map,
                               out_paths=job.stem_paths(track), model_rate=self.sample_rate, info=info, fmt=job.fmt,
                               subtype=job.subtype, clip=job.clip, read_mix=read_mix)


def _plan_track(row: dict, *, scheme) -> list[dict]:
    base = {"track_idx": int(row["track_idx"]), "path": row["path"], "error": "", "input_sha256": ""}
    try:
        base["input_sha256"] = sha256_file(Path(row["path"]))  # here, not on the driver: workers share the reading
        with AudioReader(row["path"], scheme.sample_rate, scheme.channels) as reader:
            if reader.length == 0:
                raise AudioError(f"{row['path']}: no audio samples")
            rows = scheme.rows(reader)
            length = reader.length
    except Exception as e:  # noqa: BLE001 - any failure belongs on this track's row
        return [base | scheme.empty_row | {"n_tasks": 0, "track_length": 0, "error": f"{type(e).__name__}: {e}"}]
    common = base | {"n_tasks": len(rows), "track_length": length}
    return [common | r for r in rows]


class ChunkSeparator:
    """Actor: ONNX Runtime sessions for every (sub-)model; (chunk rows) -> (kept outputs)."""

    def __init__(self, graph_refs, *, scheme, device: str, threads: int | None, batch_size: int,
                 fit_gpu: bool = False):
        import ray

        from .onnx_model import OnnxRunner, fit_runners
        graphs = ray.get(list(graph_refs))
        # Test hooks: run ORT on the CPU inside actors scheduled on logical GPUs (placement tests), and slow chunks
        # down so a fault can be injected mid-run.
        device = os.environ.get("RIPPER_DIST_ORT_DEVICE_OVERRIDE") or device
        self.delay = float(os.environ.get("RIPPER_DIST_CHUNK_DELAY", 0))
        spin = os.environ.get("RIPPER_DIST_ORT_SPIN", "0") == "1"  # actors share cores with the driver and planners
        self.runners = {m: OnnxRunner(g, device, threads, spin=spin, max_batch=batch_size)
                        for m, g in enumerate(graphs) if g is not None}
        if fit_gpu:  # `--batch-size auto`: each session measures what its GPU holds (and halves on OOM)
            fit_runners(self.runners.values(), batch_size)
        self.scheme, self.batch_size = scheme, batch_size
        self.readers: collections.OrderedDict[str, AudioReader] = collections.OrderedDict()
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.actor = f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")

    def _reader(self, path: str) -> AudioReader:
        s = self.scheme
        r = self.readers.pop(path, None) or AudioReader(path, s.sample_rate, s.channels)
        self.readers[path] = r
        while len(self.readers) > 4:
            self.readers.popitem(last=False)[1].close()
        return r

    def __call__(self, batch: dict) -> dict:
        s = self.scheme
        n = len(batch["track_idx"])
        out = np.zeros((n, s.n_sources, s.channels, s.keep_max), dtype=np.float32)
        errors = [str(e) for e in batch["error"]]
        pending: dict[int, list] = collections.defaultdict(list)
        t0 = time.perf_counter()
        if self.delay:
            time.sleep(self.delay * n)
        for i in range(n):
            if errors[i]:
                continue
            try:
                m, task, window = s.model_input(batch, i, self._reader(str(batch["path"][i])), self.runners)
                pending[m].append((i, task, window))
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{type(e).__name__}: {e}"
        for m, items in pending.items():
            runner = self.runners[m]
            for k in range(0, len(items), self.batch_size):
                part = items[k:k + self.batch_size]
                try:
                    res = runner(np.stack([w for _, _, w in part]))
                except Exception as e:  # noqa: BLE001
                    for i, _, _ in part:
                        errors[i] = f"{type(e).__name__}: {e}"
                    continue
                for (i, task, _), o in zip(part, res):
                    kept = s.kept(task, o)
                    out[i, :, :, :kept.shape[-1]] = kept
        result = {k: batch[k] for k in batch if k != "error"}
        result["error"] = np.array(errors, dtype=object)
        result["output"] = out
        result["actor"] = np.array([self.actor] * n, dtype=object)
        result["compute_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return result


def init_ray(args) -> None:
    """Start the embedded local Ray, or join the cluster at `--address`; a no-op when Ray is already up.

    Whether this command started Ray (and so must stop it) is remembered on `args`.
    """
    import ray
    if ray.is_initialized():
        return
    address = getattr(args, "address", None)
    import logging
    verbose = bool(getattr(args, "verbose", False))
    if not verbose:  # Ray's own INFO/WARNING chatter (token auth, deprecations) would bury the progress bar
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"ray\.")
    kwargs = dict(include_dashboard=False, log_to_driver=verbose,
                  logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=getattr(args, "num_cpus", None) or os.cpu_count(), **kwargs)
    args._ray_started_here = True


def _pool_shape(args, resources: dict) -> dict:
    """Actors and their resources: one per GPU, or CPU actors whose ORT threads add up to the cores."""
    kind = args.device.split(":")[0]
    if kind in ("cuda", "tensorrt"):
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise RuntimeError(f"--device {args.device}: the Ray cluster has no GPUs")
        actors = args.actors or gpus
        return dict(actors=actors, num_gpus=1, num_cpus=0.5, threads=args.threads or 1,
                    device=f"{kind}:0")  # Ray sets CUDA_VISIBLE_DEVICES per actor
    cpus = int(resources.get("CPU", 1))
    # Several narrow actors beat one wide one: an ORT op parallelised over all cores stalls whenever the driver's
    # reducer or a planning task takes one of them (measured on 2 cores: 2 actors x 1 thread 6% over the local
    # engine, 1 actor x 2 threads 15%). Wider actors on big machines keep the number of sessions (memory) sane.
    threads = args.threads or max(1, min(4, cpus // 4))
    actors = args.actors or max(1, cpus // threads)
    # Logical CPUs a little under the threads, so the planning tasks (0.25 CPU) always find room beside the pool.
    return dict(actors=actors, num_gpus=0, num_cpus=0.75 * threads, threads=threads, device="cpu")


class StreamingReducer:
    """The driver's side: chunk outputs (in dataset order) -> per-track outputs -> files and manifest rows.

    Only tracks with chunks in flight have state; a finished track is written, recorded and forgotten. A chunk seen
    twice (a batch retried after an actor died) is ignored, so nothing is added twice.
    """

    def __init__(self, job: Job, scheme, tracks: dict, progress: Progress):
        self.job, self.scheme, self.tracks, self.progress = job, scheme, tracks, progress
        self.state: dict[int, dict] = {}
        self.closed: set[int] = set()
        self.rows: list[dict] = []

    def _record(self, idx: int, row: dict) -> None:
        self.closed.add(idx)
        self.state.pop(idx, None)
        self.job.manifest.record(row)
        self.rows.append(row)

    def fail(self, idx: int, error: str) -> None:
        st = self.state.get(idx)
        if st:
            st["out"].abort()
        self._record(idx, failed_row(self.job, self.tracks[idx], error, "ray",
                                     started_at=st["started"] if st else None))

    def _open(self, idx: int, batch, i) -> dict:
        track = self.tracks[idx]
        info = probe(track.path)
        out = self.scheme.track_output(self.job, track, info, batch, i, int(batch["track_length"][i]))
        for p in self.job.stem_paths(track).values():
            p.parent.mkdir(parents=True, exist_ok=True)
        st = self.state[idx] = {"out": out, "info": info, "seen": set(), "started": time.time(), "actors": set(),
                                "compute_s": 0.0, "sha256": str(batch["input_sha256"][i])}
        return st

    def consume(self, batch: dict) -> None:
        sr = self.scheme.sample_rate
        for i in range(len(batch["track_idx"])):
            idx = int(batch["track_idx"][i])
            if idx in self.closed:
                continue
            if batch["error"][i]:
                self.fail(idx, str(batch["error"][i]))
                continue
            try:
                st = self.state.get(idx) or self._open(idx, batch, i)
                task = self.scheme.task(batch, i)
                key = getattr(task, "key", task.index)
                if key in st["seen"]:
                    continue  # a retried batch delivered this chunk again
                st["seen"].add(key)
                st["actors"].add(str(batch["actor"][i]))
                st["compute_s"] += float(batch["compute_s"][i])
                self.progress.update(self.scheme.add(st["out"], task, batch["output"][i]) / sr)
                if st["out"].pending == 0:
                    paths, n = st["out"].finish()
                    self.progress.update(n / sr)
                    actors = sorted(st["actors"])
                    self._record(idx, done_row(
                        self.job, self.tracks[idx], "ray", paths=paths, info=st["info"], started=st["started"],
                        input_sha256=st["sha256"], elapsed=st["compute_s"],
                        node=",".join(sorted({a.split(":")[0] for a in actors})), worker=",".join(actors)))
            except Exception as e:  # noqa: BLE001 - the track fails, the job goes on
                self.fail(idx, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        """Tracks that never completed get a failed row (they will be redone by a rerun)."""
        for idx in list(self.state):
            self.fail(idx, "incomplete: not every chunk of the track came back")
        for idx in self.tracks:
            if idx not in self.closed:
                self.fail(idx, "incomplete: the track produced no chunks")


def _block_bytes(n_tracks: int, actors: int) -> int:
    """Target size of the chunk-row blocks (a block is one actor task), measured on two cores (docs/BENCHMARKS.md).

    Enough tracks to keep every actor busy: 8 KiB (a few dozen rows: a short track stays in one task, on one actor;
    10 tracks x 20 s: -1.7% against the local engine, where 1 KiB blocks cost +15-18%). Fewer tracks than that:
    1 KiB (a handful of rows), so one track's chunks spread over the actors (one 60 s track on two actors: 34.6 s
    with 8 KiB, 24.1 s with 1 KiB). A long track spreads either way (30 minutes: driver RSS 0.33 GB at 1 KiB and
    0.38 GB at 8 KiB; smaller blocks, 256 B, made it grow to 3.5 GB).
    """
    return 8 * 1024 if n_tracks >= 2 * actors else 1024


def run_ray(job: Job, args) -> list[dict]:
    import ray
    import ray.data

    bundle = job.bundle
    tracks = {i: t for i, t in enumerate(job.todo)}
    if not tracks:
        return []
    init_ray(args)
    progress = None
    reducer = None
    try:
        shape = _pool_shape(args, ray.cluster_resources())
        scheme = MsstScheme(job, args) if bundle.is_roformer else DemucsScheme(job, args)
        graph_refs = [ray.put(g) if m in scheme.models else None for m, g in enumerate(bundle.graphs)]
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the reducer then holds only the tracks in flight
        # Chunk rows are ~200 bytes: with the default 128 MiB blocks, all chunks of a long track would form one block,
        # i.e. one actor task (no spreading over actors) whose outputs pile up; every chunk output (megabytes) becomes
        # a block of its own either way. See _block_bytes for the size.
        ctx.target_max_block_size = _block_bytes(len(tracks), shape["actors"])
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = [{"track_idx": i, "path": str(t.path)} for i, t in tracks.items()]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(_plan_track, fn_kwargs=dict(scheme=scheme),
                         num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=max(2, shape["actors"])))
        rows, fit_gpu = batch_plan(args.batch_size, shape["device"])
        ds = ds.map_batches(
            ChunkSeparator, batch_size=rows, batch_format="numpy",
            fn_constructor_kwargs=dict(graph_refs=graph_refs, scheme=scheme, device=shape["device"],
                                       threads=shape["threads"], batch_size=rows, fit_gpu=fit_gpu),
            compute=ray.data.ActorPoolStrategy(size=shape["actors"]),
            num_cpus=shape["num_cpus"], num_gpus=shape["num_gpus"])
        progress = Progress(sum(_duration(t.path) for t in tracks.values()), enabled=not args.no_progress)
        reducer = StreamingReducer(job, scheme, tracks, progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            reducer.consume(batch)
        reducer.close()
    finally:
        if progress is not None:
            progress.close()
        job.manifest.compact()
        if getattr(args, "_ray_started_here", False):
            ray.shutdown()
            args._ray_started_here = False
    return reducer.rows if reducer else []


def _duration(path: Path) -> float:
    try:
        return probe(path).duration_s
    except (AudioError, OSError):
        return 0.0
