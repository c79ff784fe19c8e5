"""Demucs `apply_model` as a chunk plan plus a streaming overlap-add, in plain numpy.

Upstream (`demucs.apply.apply_model` + `Separator.separate_tensor`) does, for a track of `L` samples:

1. normalise the mix with the statistics of its channel mean (`ref = mix.mean(0)`,
   `(mix - ref.mean()) / (ref.std() + 1e-8)`), undone on the output;
2. for a bag, run every sub-model, multiply its output by its per-source weight, divide by the per-source total;
3. with `shifts=N`, pad the track by `max_shift` on both sides, and for each of N passes draw
   `offset = random.randint(0, max_shift)`, process the view `[offset, L + max_shift - offset)` of the padded signal
   and keep its output from `max_shift - offset`; average the passes;
4. split (the view) at `range(0, len, stride)`, `stride = int((1 - overlap) * segment)`; each chunk is padded centred
   to the model's input length with real neighbouring audio (zeros outside the track), run, centre-trimmed, weighted
   by a triangle window; per pass, `out = sum(w * chunk) / sum(w)`.

Here all of that is mapped into *track coordinates*: `plan_chunks` returns one `ChunkTask` per model call, which says
where the model's input window starts in the track and which track samples its output contributes to (chunks of a
shifted view that fall entirely outside the track are dropped: they only touch samples that upstream throws away).
A task can run anywhere; `OverlapAdd` takes the outputs in any order and hands back the finished prefix of the result.

The per-pass division by the sum of weights is done per chunk: the sum of the triangle weights of a pass is known
from the plan alone, so each chunk's contribution is `w / sum_w(pass) * model_weight[s] / (passes * total_weight[s])
* output`, and the whole result is a plain sum of contributions (commutative, one buffer for all models and passes).
This is the same arithmetic as upstream, regrouped; it agrees with `apply_model` to float32 rounding.

No I/O, no Ray, no ONNX Runtime, no torch.
"""
from __future__ import annotations

import bisect
import heapq
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Protocol, Sequence, Union

import numpy as np

__all__ = [
    "ChunkTask",
    "MixStats",
    "OverlapAdd",
    "WeightIndex",
    "denormalize",
    "mix_stats",
    "normalize",
    "plan_chunks",
    "read_window",
    "stride_for",
    "triangle_weight",
]

# --------------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True, order=True)
class ChunkTask:
    """One model call. Plain ints, so `asdict()` is a table row and `ChunkTask.from_dict` reads it back.

    Coordinates are track samples at the model's sample rate (they may be negative or beyond the track: those
    samples are zeros).

    - `model`, `shift`, `index`: sub-model in the bag, shift pass, chunk number within that (model, pass) in upstream
      order. Together they identify the task (`key`).
    - `offset`, `length`: the upstream chunk (`TensorChunk(view, o, segment)`) in track coordinates: it starts at
      `offset` and is `length <= segment` long (shorter at the end of the view).
    - `segment`: the split length of this model; the triangle weight has this length and `weight[:length]` is used.
    - `window_start`: track sample at index 0 of the model's input (`chunk_samples` long).
    - `input_len`: input indices `[0, input_len)` hold the track (zeros outside it), `[input_len, chunk_samples)` are
      zeros (HTDemucs pads on the right to its training length when it is given less). Model output index `j`
      belongs to track sample `window_start + j`.
    - `keep_start`, `keep_len`: the track samples (inside `[0, L)`) that this output contributes to.
    """

    model: int
    shift: int
    index: int
    offset: int
    length: int
    segment: int
    window_start: int
    input_len: int
    keep_start: int
    keep_len: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.model, self.shift, self.index)

    @property
    def keep_end(self) -> int:
        return self.keep_start + self.keep_len

    @property
    def out_start(self) -> int:
        """Index into the model output of the first kept sample."""
        return self.keep_start - self.window_start

    @property
    def weight_start(self) -> int:
        """Index into the triangle weight of the first kept sample."""
        return self.keep_start - self.offset

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "ChunkTask":
        return cls(**{f.name: int(row[f.name]) for f in fields(cls)})


def _per_model(value: int | Sequence[int] | None, n_models: int, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n_models
    out = [int(v) for v in value]
    if len(out) != n_models:
        raise ValueError(f"{name}: expected {n_models} values (one per model), got {len(out)}")
    return out


def stride_for(segment_samples: int, overlap: float) -> int:
    """Upstream's split stride, `int((1 - overlap) * segment)` (same float arithmetic)."""
    return int((1 - overlap) * segment_samples)


def shift_offsets(shifts: int, max_shift: int, seed: int = 0, n_models: int = 1) -> list[list[int]]:
    """The random offsets of the shift passes, `[model][pass]`, drawn as upstream draws them from `random`.

    Upstream calls the module-level `random.randint(0, max_shift)` once per pass, model after model; seeding the global
    `random` with `seed` before `apply_model` gives the same sequence as `random.Random(seed)` here.
    """
    rng = random.Random(seed)
    return [[rng.randint(0, max_shift) for _ in range(shifts)] for _ in range(n_models)]


def plan_chunks(length: int, *, segment_samples: int | Sequence[int], chunk_samples: int | Sequence[int],
                overlap: float = 0.25, shifts: int = 0, seed: int = 0, max_shift: int | None = None,
                n_models: int = 1, input_samples: int | Sequence[int] | None = None) -> list[ChunkTask]:
    """Every model call of upstream `apply_model` on a track of `length` samples, in track coordinates.

    segment_samples: split length per model (int = same for all); `int(segment * samplerate)` upstream.
    chunk_samples: the graph's input length per model (HTDemucs: its training length).
    input_samples: how much of the graph input is the centred window of track audio (upstream `valid_length`);
        the rest of the input, on the right, is zeros. None = `chunk_samples` (HTDemucs without a `segment`
        override, or any model whose `valid_length` is the graph length). HTDemucs given `apply_model(segment=...)`
        centres its chunks on `segment` samples and pads the rest with zeros: use `input_samples=segment_samples`.
    shifts, seed, max_shift: the shift trick; `max_shift = int(0.5 * samplerate)`; offsets from `random.Random(seed)`.

    Returns tasks ordered by (model, shift pass, chunk index), upstream's order. Tasks whose output lies entirely
    outside the track (possible in a shifted pass when `segment <= max_shift`) are left out.
    """
    length = int(length)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if n_models < 1:
        raise ValueError("n_models must be >= 1")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if shifts < 0:
        raise ValueError("shifts must be >= 0")
    segs = _per_model(segment_samples, n_models, "segment_samples")
    chunks = _per_model(chunk_samples, n_models, "chunk_samples")
    inputs = _per_model(input_samples, n_models, "input_samples") or list(chunks)
    for m in range(n_models):
        if segs[m] < 1:
            raise ValueError(f"segment_samples must be >= 1, got {segs[m]}")
        if not segs[m] <= inputs[m] <= chunks[m]:
            raise ValueError(f"model {m}: need segment_samples ({segs[m]}) <= input_samples ({inputs[m]}) "
                             f"<= chunk_samples ({chunks[m]})")
        if stride_for(segs[m], overlap) < 1:
            raise ValueError(f"model {m}: segment {segs[m]} with overlap {overlap} gives a stride of 0")
    if shifts:
        if max_shift is None:
            raise ValueError("max_shift (int(0.5 * samplerate)) is required when shifts > 0")
        if max_shift < 0:
            raise ValueError("max_shift must be >= 0")
        offsets = shift_offsets(shifts, int(max_shift), seed, n_models)
        # The view of pass p starts at padded index offset, i.e. track sample offset - max_shift.
        view_starts = [[o - int(max_shift) for o in row] for row in offsets]
    else:
        view_starts = [[0] for _ in range(n_models)]

    tasks: list[ChunkTask] = []
    if length == 0:
        return tasks
    for m in range(n_models):
        seg, inp = segs[m], inputs[m]
        stride = stride_for(seg, overlap)
        for p, view_start in enumerate(view_starts[m]):
            view_len = length - view_start  # the view always ends at the end of the track
            for i, o in enumerate(range(0, view_len, stride)):
                start = view_start + o
                n = min(view_len - o, seg)
                keep_start = max(start, 0)
                keep_end = start + n  # <= length
                if keep_end <= keep_start:
                    continue
                tasks.append(ChunkTask(
                    model=m, shift=p, index=i, offset=start, length=n, segment=seg,
                    window_start=start - (inp - n) // 2, input_len=inp,
                    keep_start=keep_start, keep_len=keep_end - keep_start,
                ))
    return tasks


def triangle_weight(segment_samples: int, transition_power: float = 1.0) -> np.ndarray:
    """Upstream's chunk weight: `cat(arange(1, s//2 + 1), arange(s - s//2, 0, -1))`, scaled to max 1, `** power`."""
    s = int(segment_samples)
    if s < 1:
        raise ValueError("segment_samples must be >= 1")
    if transition_power < 1:
        raise ValueError("transition_power < 1 leads to weird behavior (upstream asserts >= 1)")
    w = np.concatenate([np.arange(1, s // 2 + 1), np.arange(s - s // 2, 0, -1)]).astype(np.float32)
    w = w / w.max()
    return (w ** np.float32(transition_power)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Normalisation


@dataclass(frozen=True)
class MixStats:
    """Running statistics of the channel-mean signal `ref = mix.mean(0)`: sum, sum of squares, count (float64).

    Blocks combine with `+` in any order, so a streaming reader (or a distributed reduce) can build them.
    """

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, block: np.ndarray) -> "MixStats":
        """Statistics of one (C, n) block of the mix at the model's rate and channel count."""
        block = np.asarray(block)
        if block.ndim != 2:
            raise ValueError(f"expected a (channels, samples) block, got shape {block.shape}")
        ref = block.astype(np.float64).mean(axis=0)
        return cls(float(ref.sum()), float(np.dot(ref, ref)), int(ref.shape[0]))

    def __add__(self, other: "MixStats") -> "MixStats":
        if not isinstance(other, MixStats):
            return NotImplemented
        return MixStats(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation (torch's `Tensor.std()`); 0 for fewer than two samples."""
        if self.count < 2:
            return 0.0
        var = (self.total_sq - self.total * self.total / self.count) / (self.count - 1)
        return float(np.sqrt(max(var, 0.0)))

    @property
    def scale(self) -> float:
        """The divisor upstream uses: `ref.std() + 1e-8`."""
        return self.std + 1e-8


def mix_stats(mix: np.ndarray) -> MixStats:
    """`MixStats` of a whole (C, L) mix."""
    return MixStats.of(mix)


def normalize(x: np.ndarray, stats: MixStats) -> np.ndarray:
    """`(x - mean) / (std + 1e-8)` in float32."""
    return ((np.asarray(x, dtype=np.float32) - np.float32(stats.mean)) / np.float32(stats.scale)).astype(
        np.float32, copy=False)


def denormalize(y: np.ndarray, stats: MixStats) -> np.ndarray:
    """Undo `normalize` on model output: `y * (std + 1e-8) + mean` in float32."""
    return (np.asarray(y, dtype=np.float32) * np.float32(stats.scale) + np.float32(stats.mean)).astype(
        np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------------
# Model input windows


class WindowSource(Protocol):
    """Anything that can hand out a (C, stop - start) range of a track of `length` samples (0 <= start <= stop <=
    length), e.g. `ripper_dist.audio.AudioReader`."""

    length: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


def read_window(mix: Union[np.ndarray, WindowSource], task: ChunkTask, chunk_samples: int, *,
                stats: MixStats | None = None) -> np.ndarray:
    """The model input of `task`: float32 (C, chunk_samples).

    Input index j is track sample `task.window_start + j` for j < `task.input_len` (zeros outside the track) and zero
    from `input_len` on. `mix` is a (C, L) array or a `WindowSource`. With `stats`, the track samples are normalised
    (the zeros outside the track stay zeros, as upstream pads the normalised mix).
    """
    if task.input_len > chunk_samples:
        raise ValueError(f"task needs {task.input_len} input samples, graph takes {chunk_samples}")
    if isinstance(mix, np.ndarray):
        if mix.ndim != 2:
            raise ValueError(f"expected a (channels, samples) mix, got shape {mix.shape}")
        channels, length = mix.shape
    else:
        length = int(mix.length)
        channels = None
    a = max(task.window_start, 0)
    b = min(task.window_start + task.input_len, length)
    if isinstance(mix, np.ndarray):
        part = mix[:, a:b] if b > a else mix[:, :0]
    else:
        part = np.asarray(mix.read(a, b)) if b > a else None
        if part is not None:
            channels = part.shape[0]
    if channels is None:  # nothing of the track in the window; ask the source for its channel count
        channels = int(getattr(mix, "channels"))
    out = np.zeros((channels, chunk_samples), dtype=np.float32)
    if b > a:
        if stats is not None:
            part = normalize(part, stats)
        out[:, a - task.window_start:b - task.window_start] = part
    return out


# --------------------------------------------------------------------------------------------------------------------
# Overlap-add


class WeightIndex:
    """Per-chunk weights normalised by the sum of weights of their (model, pass), computed from the plan alone.

    `normalized(task)` is `triangle[kept] / sum_w[kept]` where `sum_w` is upstream's `sum_weight` of that pass, over the
    kept track samples. Only the neighbouring chunks of the same pass are looked at.
    """

    def __init__(self, tasks: Sequence[ChunkTask], transition_power: float = 1.0):
        self.transition_power = float(transition_power)
        groups: dict[tuple[int, int], list[ChunkTask]] = {}
        for t in tasks:
            groups.setdefault((t.model, t.shift), []).append(t)
        self._groups: dict[tuple[int, int], tuple[list[ChunkTask], list[int], list[int]]] = {}
        for k, g in groups.items():
            g.sort(key=lambda t: t.index)
            starts = [t.keep_start for t in g]
            ends = [t.keep_end for t in g]
            if any(b < a for a, b in zip(starts, starts[1:])) or any(b < a for a, b in zip(ends, ends[1:])):
                raise ValueError("chunks of a pass must advance monotonically (not an upstream plan)")
            self._groups[k] = (g, starts, ends)
        self._tri: dict[int, np.ndarray] = {}

    def triangle(self, segment: int) -> np.ndarray:
        w = self._tri.get(segment)
        if w is None:
            w = self._tri[segment] = triangle_weight(segment, self.transition_power).astype(np.float64)
        return w

    def _kept_weight(self, t: ChunkTask, a: int, b: int) -> np.ndarray:
        w = self.triangle(t.segment)
        return w[a - t.offset:b - t.offset]

    def normalized(self, task: ChunkTask) -> np.ndarray:
        """float64 (keep_len,): this chunk's weight divided by its pass's sum of weights."""
        try:
            group, starts, ends = self._groups[(task.model, task.shift)]
        except KeyError:
            raise KeyError(f"task {task.key} is not in the plan") from None
        a, b = task.keep_start, task.keep_end
        lo = bisect.bisect_right(ends, a)   # first chunk ending after a
        hi = bisect.bisect_left(starts, b)  # first chunk starting at or after b
        total = np.zeros(b - a, dtype=np.float64)
        own = None
        for t in group[lo:hi]:
            s, e = max(a, t.keep_start), min(b, t.keep_end)
            if e <= s:
                continue
            total[s - a:e - a] += self._kept_weight(t, s, e)
            if t.index == task.index:
                own = t
        if own is None or own != task:
            raise KeyError(f"task {task.key} is not in the plan")
        return self._kept_weight(task, a, b) / total


class OverlapAdd:
    """Streaming reduction of one track's chunk outputs into the (S, C, L) result.

    `add(task, output)` accepts the tasks of `tasks` in any order, once each.
    span: only the result samples [start, stop) (a span of a long track done by one worker): only the tasks touching
    it are pending (`self.tasks`, in the order the engine runs them), with weights normalised over the whole plan, so
    the span equals the same samples of the whole-track result. `pop_ready()` returns the next block of
    the final result: the samples from the previous pop up to the first sample a still-missing task could touch.
    `finish()` returns the rest once every task has been added. Concatenating all popped blocks gives the result.

    Memory: one float32 (S, C, n) buffer, n = from the last pop to the furthest sample touched so far. Adding tasks
    roughly in track order (e.g. sorted by `keep_start`) keeps n to a few segments.

    weights: per model per source (`BagOfModels.weights`); None = all ones. Each sub-model's estimate is multiplied by
        its weight and the sum divided by the per-source total, as upstream. A source whose weights sum to 0 is an error.
    stats: if given, popped blocks are denormalised (`y * (std + 1e-8) + mean`).
    """

    def __init__(self, tasks: Sequence[ChunkTask], *, length: int, n_sources: int, channels: int,
                 weights: Sequence[Sequence[float]] | None = None, transition_power: float = 1.0,
                 stats: MixStats | None = None, dtype=np.float32, span: tuple[int, int] | None = None):
        self.length = int(length)
        self.start, self.stop = (0, self.length) if span is None else (int(span[0]), int(span[1]))
        if not 0 <= self.start < self.stop <= self.length:
            raise ValueError(f"span [{self.start}, {self.stop}) is not inside the track [0, {self.length})")
        self.n_sources = int(n_sources)
        self.channels = int(channels)
        self.stats = stats
        self.dtype = np.dtype(dtype)
        tasks = list(tasks)
        n_models = 1 + max((t.model for t in tasks), default=0)
        if weights is None:
            weights = [[1.0] * self.n_sources for _ in range(n_models)]
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != self.n_sources or w.shape[0] < n_models:
            raise ValueError(f"weights must be (models >= {n_models}, {self.n_sources}), got {w.shape}")
        totals = w.sum(axis=0)
        if np.any(totals == 0):
            raise ValueError("a source has a total weight of 0 across the bag (upstream divides by it)")
        passes: dict[int, set[int]] = {}
        for t in tasks:
            if not (0 <= t.keep_start and t.keep_end <= self.length and t.keep_len > 0):
                raise ValueError(f"task {t.key} keeps [{t.keep_start}, {t.keep_end}) outside [0, {self.length})")
            passes.setdefault(t.model, set()).add(t.shift)
        # factor[m][s] = weight[m][s] / (passes of m * total[s])
        self._factor = {m: w[m] / (len(ps) * totals) for m, ps in passes.items()}
        # weights are normalised over the whole plan; only the tasks touching the span are accumulated
        self._index = WeightIndex(tasks, transition_power)
        self._pending: dict[tuple[int, int, int], ChunkTask] = {}
        for t in tasks:
            if t.key in self._pending:
                raise ValueError(f"duplicate task {t.key} in the plan")
            if t.keep_end > self.start and t.keep_start < self.stop:
                self._pending[t.key] = t
        self.tasks = sorted(self._pending.values(), key=lambda t: (t.keep_start, t.model, t.shift, t.index))
        self._heap = [(max(t.keep_start, self.start), t.key) for t in self.tasks]
        heapq.heapify(self._heap)
        self._base = self.start  # track sample at buffer index 0 (= everything before has been popped)
        self._held: dict[tuple[int, int, int], tuple[int, int, np.ndarray]] = {}  # key -> (lo, hi, contribution)
        self.added_samples = 0  # sum of kept samples (inside the span) of added tasks (progress in "work")
        self.total_samples = sum(self._clip(t)[1] - self._clip(t)[0] for t in self.tasks)

    # -- state --------------------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Number of tasks not added yet."""
        return len(self._pending)

    @property
    def position(self) -> int:
        """Track sample where the next popped block starts."""
        return self._base

    @property
    def buffer_samples(self) -> int:
        """Track samples from `position` to the end of the furthest contribution held (what memory holds)."""
        return max((hi for _, hi, _ in self._held.values()), default=self._base) - self._base

    @property
    def ready(self) -> int:
        """Every sample before this one is final."""
        while self._heap and self._heap[0][1] not in self._pending:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else self.stop

    def _clip(self, task: ChunkTask) -> tuple[int, int]:
        return max(task.keep_start, self.start), min(task.keep_end, self.stop)

    # -- input --------------------------------------------------------------------------------------------------------
    def contribution(self, task: ChunkTask, output: np.ndarray, *, kept: bool = False) -> np.ndarray:
        """(S, C, keep_len) this task adds to the result, from its model output (S, C, >= out_start + keep_len),
        or with `kept`, from just the kept part (S, C, >= keep_len) (what a remote worker ships back)."""
        out = np.asarray(output)
        if out.ndim != 3 or out.shape[0] != self.n_sources or out.shape[1] != self.channels:
            raise ValueError(f"output must be ({self.n_sources}, {self.channels}, chunk), got {out.shape}")
        start = 0 if kept else task.out_start
        if out.shape[2] < start + task.keep_len or start < 0:
            raise ValueError(f"output of length {out.shape[2]} does not cover task {task.key}")
        kept = out[:, :, start:start + task.keep_len]
        w = self._index.normalized(task)
        coef = (self._factor[task.model][:, None, None] * w[None, None, :]).astype(self.dtype)
        return kept.astype(self.dtype, copy=False) * coef

    def add(self, task: ChunkTask, output: np.ndarray, *, kept: bool = False) -> None:
        """Add the model output (S, C, chunk_samples) of one task of the plan (`kept`: see `contribution`).

        Contributions are held until their samples are popped and summed then in the plan's order, so the result
        does not depend on the order tasks arrive in (bitwise: one span or many, any batching)."""
        if task.key not in self._pending or self._pending[task.key] != task:
            raise ValueError(f"task {task.key} is not pending (unknown, different, or already added)")
        contrib = self.contribution(task, output, kept=kept)
        lo, hi = self._clip(task)
        if lo < self._base:  # cannot happen: a pending task keeps `ready` at or before its start
            raise AssertionError("task starts before the popped prefix")
        self._held[task.key] = (lo, hi, contrib[:, :, lo - task.keep_start:hi - task.keep_start])
        del self._pending[task.key]
        self.added_samples += hi - lo

    # -- output -------------------------------------------------------------------------------------------------------
    def pop_ready(self) -> np.ndarray:
        """The final result from `position` to `ready` (possibly empty), (S, C, n) float32."""
        return self._pop(self.ready - self._base)

    def finish(self) -> np.ndarray:
        """The rest of the result; every task must have been added."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tasks were never added, e.g. {next(iter(self._pending))}")
        return self._pop(self.stop - self._base)

    def _pop(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros((self.n_sources, self.channels, 0), dtype=np.float32)
        a, b = self._base, self._base + n
        out = np.zeros((self.n_sources, self.channels, n), dtype=self.dtype)
        for key in sorted(self._held):
            lo, hi, contrib = self._held[key]
            x, y = max(lo, a), min(hi, b)
            if x < y:
                out[:, :, x - a:y - a] += contrib[:, :, x - lo:y - lo]
            if hi <= b:
                del self._held[key]
        self._base = b
        out = out.astype(np.float32, copy=False)
        if self.stats is not None:
            out = denormalize(out, self.stats)
        return out
