"""Demucs bags in plain numpy: the bag (runners, weights, segments), its chunk plan, and batched execution.

A *runner* is anything with `chunk_samples` and `__call__(batch (B, C, chunk_samples) float32) -> (B, S, C,
chunk_samples)`: an ONNX Runtime session wrapper in production, a numpy function in tests. `run_tasks` feeds each
sub-model batches of its own chunks in track order; `families.DemucsFamily` reduces them per span with
`chunking.OverlapAdd`. `separate_array` is the in-memory composition (upstream `apply_model` on an array), used to
check parity with upstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from .chunking import ChunkTask, OverlapAdd, mix_stats, normalize, plan_chunks, read_window

__all__ = ["DemucsBag", "Runner", "run_tasks", "separate_array"]

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


def run_tasks(runners: Sequence, tasks: Sequence[ChunkTask], window: Callable[[ChunkTask, int], np.ndarray],
              batch_size: int, consume: Callable[[list[ChunkTask], np.ndarray], None], *, n_sources: int,
              channels: int) -> None:
    """Run `tasks` in track order, batched per sub-model; hand each batch's outputs (B, S, C, chunk) to `consume`
    as soon as it is computed. `window(task, chunk_samples)` gives a task's model input."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    queues: dict[int, list[ChunkTask]] = {}

    def flush(m: int) -> None:
        queue = queues.pop(m)
        runner = runners[m]
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

    run_tasks(bag.runners, tasks, lambda t, n: read_window(norm, t, n), batch_size, consume,
              n_sources=len(bag.sources), channels=bag.channels)
    emit(acc.finish())
    assert pos == length
    return out
