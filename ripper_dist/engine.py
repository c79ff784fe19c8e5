"""The single-process separator: a bag of Demucs graphs + the chunk plan + overlap-add -> stems.

A *runner* is anything with `chunk_samples` and `__call__(batch (B, C, chunk_samples) float32) -> (B, S, C,
chunk_samples)`: an ONNX Runtime session wrapper in production, a numpy function in tests. The engine reads model
inputs window by window (from memory or from the file), feeds each sub-model batches of its own chunks, and reduces the
outputs with `chunking.OverlapAdd` in track order, so finished samples leave as soon as they are final: memory is a
few segments, whatever the track length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from .audio import AudioReader, mix_stats as file_mix_stats, probe, resampled_length
from .chunking import ChunkTask, MixStats, OverlapAdd, mix_stats, normalize, plan_chunks, read_window
from .track_output import TrackOutput, needed_models, select_stems

__all__ = ["DemucsBag", "Runner", "separate_array", "separate_file", "separate_track"]

Progress = Callable[[int], None]


class Runner(Protocol):
    """One exported (sub-)model."""

    chunk_samples: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, C, chunk_samples) -> float32 (B, S, C, chunk_samples)."""
        ...


@dataclass
class DemucsBag:
    """A bag of Demucs sub-models (a single model is a bag of one).

    runners: one per sub-model. weights: per model per source (None = all ones), as `BagOfModels.weights`.
    segment_samples: split length per model (an int applies to all), `int(model.segment * samplerate)`.
    input_samples: per model, how much of the graph input is the centred track window (upstream `valid_length`);
        None = upstream HTDemucs: the graph length, or the `segment_samples` override of `separate_*` when given
        (HTDemucs centres a chunk on the override length and pads the rest of its input with zeros).
    """

    runners: list
    weights: list[list[float]] | None
    segment_samples: list[int] | int
    sources: list[str]
    sample_rate: int = 44100
    channels: int = 2
    input_samples: list[int] | int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n = len(self.runners)
        if n == 0:
            raise ValueError("a bag needs at least one runner")
        self.sources = list(self.sources)
        if self.weights is None:
            self.weights = [[1.0] * len(self.sources) for _ in range(n)]
        self.weights = [[float(w) for w in row] for row in self.weights]
        if len(self.weights) != n or any(len(row) != len(self.sources) for row in self.weights):
            raise ValueError(f"weights must be {n} rows (models) of {len(self.sources)} values (sources)")
        if isinstance(self.segment_samples, (int, np.integer)):
            self.segment_samples = [int(self.segment_samples)] * n
        self.segment_samples = [int(s) for s in self.segment_samples]
        if len(self.segment_samples) != n:
            raise ValueError(f"segment_samples: expected {n} values, got {len(self.segment_samples)}")
        if isinstance(self.input_samples, (int, np.integer)):
            self.input_samples = [int(self.input_samples)] * n
        for m, r in enumerate(self.runners):
            if self.segment_samples[m] > int(r.chunk_samples):
                raise ValueError(f"model {m}: segment {self.segment_samples[m]} > graph length {r.chunk_samples}")

    @property
    def chunk_samples(self) -> list[int]:
        return [int(r.chunk_samples) for r in self.runners]

    @property
    def max_shift(self) -> int:
        return int(0.5 * self.sample_rate)

    def plan(self, length: int, *, shifts: int = 0, overlap: float = 0.25, seed: int = 0,
             segment_samples: int | None = None) -> list[ChunkTask]:
        """The chunk plan of this bag for a track of `length` model-rate samples (see `chunking.plan_chunks`).

        segment_samples: upstream `apply_model(segment=...)` in samples, for every model; at most the graph length.
        """
        chunks = self.chunk_samples
        if segment_samples is None:
            segs = self.segment_samples
            inputs = self.input_samples or chunks
        else:
            segment_samples = int(segment_samples)
            if segment_samples > min(chunks):
                raise ValueError(f"segment {segment_samples} samples is longer than the graph length {min(chunks)}: "
                                 "a Transformer model cannot use a longer segment than it was trained for")
            segs = [segment_samples] * len(chunks)
            inputs = self.input_samples or segs
        return plan_chunks(length, segment_samples=segs, chunk_samples=chunks, overlap=overlap, shifts=shifts,
                           seed=seed, max_shift=self.max_shift, n_models=len(self.runners), input_samples=inputs)


def _execute(bag: DemucsBag, tasks: Sequence[ChunkTask], window: Callable[[ChunkTask, int], np.ndarray],
             batch_size: int, consume: Callable[[list[ChunkTask], np.ndarray], None]) -> None:
    """Run every task in track order, batched per sub-model; hand each batch's outputs (B, S, C, chunk) to
    `consume` as soon as it is computed."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    queues: dict[int, list[ChunkTask]] = {}
    n_sources, channels = len(bag.sources), bag.channels

    def flush(m: int) -> None:
        queue = queues.pop(m)
        runner = bag.runners[m]
        chunk = int(runner.chunk_samples)
        batch = np.stack([window(t, chunk) for t in queue])
        out = np.asarray(runner(batch))
        if out.shape != (len(queue), n_sources, channels, chunk):
            raise ValueError(f"runner {m} returned shape {out.shape}, expected "
                             f"{(len(queue), n_sources, channels, chunk)}")
        consume(queue, out.astype(np.float32, copy=False))

    for t in sorted(tasks, key=lambda t: (t.keep_start, t.model, t.shift, t.index)):
        queues.setdefault(t.model, []).append(t)
        if len(queues[t.model]) >= batch_size:
            flush(t.model)
    for m in sorted(queues):
        flush(m)


def separate_array(bag: DemucsBag, mix: np.ndarray, *, shifts: int = 0, overlap: float = 0.25, seed: int = 0,
                   transition_power: float = 1.0, batch_size: int = 1, segment_samples: int | None = None,
                   progress: Progress | None = None) -> np.ndarray:
    """Separate a (C, L) float32 mix at the model's rate: (S, C, L) float32, as upstream `separate_tensor`.

    progress: called with the number of newly finished output samples (their sum is L), e.g. `tqdm.update`.
    """
    mix = np.asarray(mix, dtype=np.float32)
    if mix.ndim != 2 or mix.shape[0] != bag.channels:
        raise ValueError(f"mix must be ({bag.channels}, samples), got {mix.shape}")
    length = mix.shape[1]
    stats = mix_stats(mix)
    norm = normalize(mix, stats)
    tasks = bag.plan(length, shifts=shifts, overlap=overlap, seed=seed, segment_samples=segment_samples)
    acc = OverlapAdd(tasks, length=length, n_sources=len(bag.sources), channels=bag.channels, weights=bag.weights,
                     transition_power=transition_power, stats=stats)
    out = np.empty((len(bag.sources), bag.channels, length), dtype=np.float32)
    pos = 0

    def emit(block: np.ndarray) -> None:
        nonlocal pos
        n = block.shape[-1]
        if n:
            out[:, :, pos:pos + n] = block
            pos += n
            if progress is not None:
                progress(n)

    def consume(batch_tasks: list[ChunkTask], outputs: np.ndarray) -> None:
        for t, o in zip(batch_tasks, outputs):
            acc.add(t, o)
        emit(acc.pop_ready())

    _execute(bag, tasks, lambda t, n: read_window(norm, t, n), batch_size, consume)
    emit(acc.finish())
    assert pos == length
    return out


def _stem_path(out_dir: Path, filename: str, track: Path, stem: str, ext: str) -> Path:
    name, _, trackext = track.name.rpartition(".")
    if not name:
        name, trackext = track.name, ""
    return out_dir / filename.format(track=name, trackext=trackext, stem=stem, ext=ext)


def separate_track(bag: DemucsBag, path: str | os.PathLike, out_paths: Mapping[str, str | os.PathLike], *,
                   stem_map: Mapping[str, Sequence[int]] | None = None, fmt: str = "wav", subtype: str = "PCM_16",
                   clip: str = "rescale", shifts: int = 0, overlap: float = 0.25, seed: int = 0,
                   transition_power: float = 1.0, batch_size: int = 1, segment_samples: int | None = None,
                   progress: Progress | None = None) -> dict[str, Path]:
    """Separate one audio file into the stem files `out_paths` ({stem: path}), streaming.

    The file is read at the model rate and channel count (`AudioReader`), normalised with statistics of the whole
    track (one extra read pass), separated, and each stem written back at the file's sample rate and frame count (mono
    files give mono stems: the mean of the model's two channels; others get the model's channels) through
    `track_output.TrackOutput` (the same code the Ray reducer uses). Memory does not grow with the track length.

    stem_map: stem -> indices of the model sources summed into it (None: each stem of `out_paths` is the source of
    that name). Sub-models whose weights are 0 for every source used are not run (their runner is never called).
    progress: called with the number of newly finished model-rate samples (their sum is the model-rate length).
    Each file appears atomically; on error no temporary files are left and no new stem file appears.
    Returns {stem: path}.
    """
    path = Path(path)
    out_paths = {s: Path(p) for s, p in out_paths.items()}
    if stem_map is None:
        stem_map = select_stems(bag.sources, list(out_paths), None)
    stem_map = {s: list(v) for s, v in stem_map.items()}
    if set(stem_map) != set(out_paths):
        raise ValueError(f"stems {sorted(stem_map)} and output paths {sorted(out_paths)} differ")
    info = probe(path)
    with AudioReader(path, bag.sample_rate, bag.channels) as reader:
        length = reader.length
        stats: MixStats = file_mix_stats(reader)
        tasks = bag.plan(length, shifts=shifts, overlap=overlap, seed=seed, segment_samples=segment_samples)
        needed = needed_models(bag.weights, stem_map)
        tasks = [t for t in tasks if t.model in needed]
        # reads come in track order per sub-model batch: let a sequential (mp3/ogg) reader keep enough behind
        reader.history = max(reader.history, (batch_size + 2) * max(bag.chunk_samples))
        track = TrackOutput(tasks=tasks, length=length, sources=bag.sources, channels=bag.channels,
                            weights=bag.weights, stats=stats, stem_map=stem_map, out_paths=out_paths,
                            model_rate=bag.sample_rate, info=info, fmt=fmt, subtype=subtype, clip=clip,
                            transition_power=transition_power)

        def consume(batch_tasks: list[ChunkTask], outputs: np.ndarray) -> None:
            n = sum(track.add(t, o) for t, o in zip(batch_tasks, outputs))
            if n and progress is not None:
                progress(n)

        try:
            _execute(bag, tasks, lambda t, n: read_window(reader, t, n, stats=stats), batch_size, consume)
        except BaseException:
            track.abort()
            raise
        paths, n = track.finish()
        if n and progress is not None:
            progress(n)
    return dict(paths)


def separate_file(bag: DemucsBag, path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  stems: Sequence[str] | None = None, fmt: str = "wav", subtype: str = "PCM_16",
                  clip: str = "rescale", shifts: int = 0, overlap: float = 0.25, seed: int = 0,
                  transition_power: float = 1.0, batch_size: int = 1, segment_samples: int | None = None,
                  filename: str = "{track}/{stem}.{ext}", progress: Progress | None = None) -> dict:
    """`separate_track` with output names from a template: `out_dir / filename.format(track=<input name without
    extension>, trackext=..., stem=..., ext=fmt)`. stems: which sources to write (None = all).

    Returns {"stems": {stem: path str}, "duration_s", "sample_rate", "channels" (of the stems), "frames",
    "model_frames"}.
    """
    path = Path(path)
    wanted = list(select_stems(bag.sources, stems, None))
    info = probe(path)
    out_paths = {s: _stem_path(Path(out_dir), filename, path, s, fmt) for s in wanted}
    paths = separate_track(bag, path, out_paths, fmt=fmt, subtype=subtype, clip=clip, shifts=shifts,
                           overlap=overlap, seed=seed, transition_power=transition_power, batch_size=batch_size,
                           segment_samples=segment_samples, progress=progress)
    return {
        "stems": {s: str(p) for s, p in paths.items()},
        "duration_s": info.duration_s,
        "sample_rate": info.sample_rate,
        "channels": 1 if info.channels == 1 else bag.channels,
        "frames": info.frames,
        "model_frames": resampled_length(info.frames, info.sample_rate, bag.sample_rate),
    }


def separate_track_msst(runner, path: str | os.PathLike, out_paths: dict[str, Path], *, instruments: Sequence[str],
                        target_instrument: str | None, stem_map: dict[str, list[int]], num_overlap: int,
                        fmt: str = "wav", subtype: str = "PCM_16", clip: str = "rescale", batch_size: int = 1,
                        progress: Progress | None = None) -> dict[str, Path]:
    """RoFormer: one file through MSST `demix` (chunk size = the graph length) into stem files.

    The track is held at the model rate (MSST reflect-pads and normalises over the whole track); the stems are the
    model's plus, with a target instrument, the complement `mix - target` (`track_output.MsstTrackOutput`, shared
    with the Ray reducer).
    """
    from .msst_chunking import plan_chunks as msst_plan, read_chunk
    from .track_output import MsstTrackOutput
    info = probe(path)
    sr, channels = runner.info.sample_rate, runner.info.channels
    with AudioReader(path, sr, channels) as reader:
        mix = reader.read_all()
    plan = msst_plan(mix.shape[1], runner.chunk_samples, num_overlap)
    track = MsstTrackOutput(plan=plan, n_sources=len(runner.info.sources), channels=channels,
                            instruments=instruments, target_instrument=target_instrument, stem_map=stem_map,
                            out_paths={s: Path(p) for s, p in out_paths.items()}, model_rate=sr, info=info, fmt=fmt,
                            subtype=subtype, clip=clip, read_mix=lambda: mix)
    step = max(1, int(batch_size))
    for i in range(0, len(plan.chunks), step):
        chunks = plan.chunks[i:i + step]
        outputs = runner(np.stack([read_chunk(mix, plan, c) for c in chunks]))
        n = sum(track.add(c, o) for c, o in zip(chunks, outputs))
        if progress is not None and n:
            progress(n)
    paths, n = track.finish()
    if progress is not None and n:
        progress(n)
    return paths
