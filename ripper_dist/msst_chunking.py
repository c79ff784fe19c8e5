"""MSST `demix` (the RoFormer chunking of ZFTurbo's Music-Source-Separation-Training) as pure numpy functions.

Semantics (``utils/model_utils.py: demix``, generic mode), with C = chunk size:

- ``step = C // num_overlap``, ``fade = C // 10``, ``border = C - step``;
- when ``L > 2 * border`` (and ``border > 0``) the track is reflect-padded by ``border`` at both ends;
- chunks start at ``0, step, 2*step, ...`` while the start is inside the padded track; a chunk shorter than C is
  padded to C, reflecting when it holds more than ``C // 2`` samples, with zeros otherwise;
- each output is weighted by a window of ones with a linear fade-in and fade-out of ``fade`` samples (0 -> 1 and
  1 -> 0, ``linspace``), cut to the chunk's valid length; the first chunk has no fade-in, and otherwise the last
  chunk has no fade-out (MSST's ``if``/``elif`` with ``batch_size=1``; here it is decided per chunk, so results do not
  depend on batching, unlike MSST with ``batch_size > 1``);
- sum of weighted outputs / sum of windows (0 where no weight: MSST's ``nan_to_num``), then the border is cropped.

The pieces are separable for a distributed pipeline: `plan_chunks` (plain ints), `source_span` + `read_chunk`
(a worker needs only the samples of its chunk), `MsstOverlapAdd` (chunk outputs in any order, finished samples streamed out, optionally for a span), and `demix`, the
single-process composition. `output_stems`/`add_complement` implement the stems rule: the model's stems are
``training.instruments``, or only ``target_instrument`` when the config names one, in which case the complement
(mix minus target) is added under the other instrument's name.

numpy only: no torch, no ONNX Runtime.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "MsstChunk",
    "MsstPlan",
    "plan_chunks",
    "chunk_window",
    "source_span",
    "read_chunk",
    "MsstOverlapAdd",
    "demix",
    "model_sources",
    "complement_name",
    "output_stems",
    "add_complement",
]


@dataclass(frozen=True)
class MsstChunk:
    """One model call. `start` is in padded-track coordinates; `length` valid samples (<= chunk size)."""
    index: int
    start: int
    length: int
    fade_in: int      # 1 = the window fades in (0 for the first chunk)
    fade_out: int     # 1 = the window fades out (0 for the last chunk, unless it is also the first)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MsstPlan:
    length: int           # samples of the track
    chunk_size: int
    num_overlap: int
    step: int
    fade: int
    border: int
    pad: int              # reflect padding at each end (border, or 0 for short tracks)
    padded_length: int
    chunks: tuple[MsstChunk, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chunks"] = [c.to_dict() for c in self.chunks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MsstPlan":
        d = dict(d)
        d["chunks"] = tuple(MsstChunk(**c) for c in d["chunks"])
        return cls(**d)


def plan_chunks(length: int, chunk_size: int, num_overlap: int) -> MsstPlan:
    """The chunk tasks MSST's `demix` runs for a track of `length` samples."""
    length, chunk_size, num_overlap = int(length), int(chunk_size), int(num_overlap)
    if length <= 0:
        raise ValueError(f"track length must be > 0, got {length}")
    if chunk_size < 10:
        raise ValueError(f"chunk_size must be >= 10 (fade = chunk_size // 10), got {chunk_size}")
    if not 1 <= num_overlap <= chunk_size:
        raise ValueError(f"num_overlap must be in [1, chunk_size], got {num_overlap}")
    step = chunk_size // num_overlap
    fade = chunk_size // 10
    border = chunk_size - step
    pad = border if (length > 2 * border and border > 0) else 0
    padded = length + 2 * pad
    chunks = []
    for index, start in enumerate(range(0, padded, step)):
        first = start == 0
        last = start + step >= padded
        chunks.append(MsstChunk(index=index, start=start, length=min(chunk_size, padded - start),
                                fade_in=0 if first else 1, fade_out=0 if (last and not first) else 1))
    return MsstPlan(length=length, chunk_size=chunk_size, num_overlap=num_overlap, step=step, fade=fade,
                    border=border, pad=pad, padded_length=padded, chunks=tuple(chunks))


def _fades(fade: int) -> tuple[np.ndarray, np.ndarray]:
    ramp = np.linspace(0.0, 1.0, fade).astype(np.float32)
    return ramp, np.linspace(1.0, 0.0, fade).astype(np.float32)


def chunk_window(plan: MsstPlan, chunk: MsstChunk) -> np.ndarray:
    """float32 ``(chunk_size,)`` weight of this chunk's output (cut it to ``chunk.length`` when accumulating)."""
    w = np.ones(plan.chunk_size, dtype=np.float32)
    fade_in, fade_out = _fades(plan.fade)
    if plan.fade > 0:
        if chunk.fade_out:
            w[-plan.fade:] = fade_out
        if chunk.fade_in:
            w[:plan.fade] = fade_in
    return w


def source_span(plan: MsstPlan, chunk: MsstChunk) -> tuple[int, int]:
    """Half-open range of *track* samples that `read_chunk` needs for this chunk (reflection included)."""
    j = _reflect(np.arange(chunk.start, chunk.start + chunk.length) - plan.pad, plan.length)
    return int(j.min()), int(j.max()) + 1


def _reflect(j: np.ndarray, length: int) -> np.ndarray:
    """Reflect indices of the padded track into [0, length) (numpy/torch 'reflect': the edge is not repeated)."""
    j = np.where(j < 0, -j, j)
    return np.where(j >= length, 2 * (length - 1) - j, j)


def read_chunk(mix: np.ndarray, plan: MsstPlan, chunk: MsstChunk, offset: int = 0) -> np.ndarray:
    """The model input for `chunk`: float32 ``(channels, chunk_size)``.

    `mix` holds track samples ``[offset, offset + mix.shape[-1])`` (the whole track with offset 0, or just
    `source_span`), shape ``(channels, n)``.
    """
    mix = np.asarray(mix)
    j = _reflect(np.arange(chunk.start, chunk.start + chunk.length) - plan.pad, plan.length) - offset
    if j.size and (j.min() < 0 or j.max() >= mix.shape[-1]):
        raise ValueError(f"chunk {chunk.index} needs track samples {source_span(plan, chunk)}, got "
                         f"[{offset}, {offset + mix.shape[-1]})")
    part = mix[:, j].astype(np.float32, copy=False)
    missing = plan.chunk_size - chunk.length
    if missing:
        mode = "reflect" if chunk.length > plan.chunk_size // 2 else "constant"
        part = np.pad(part, ((0, 0), (0, missing)), mode=mode)
    return np.ascontiguousarray(part, dtype=np.float32)


def span_chunks(plan: MsstPlan, span: tuple[int, int] | None = None) -> list[MsstChunk]:
    """The chunks whose output reaches track samples [span) (default: the whole track; chunks lying wholly in the
    reflect padding are cropped away by MSST, so they are never run)."""
    start, stop = (0, plan.length) if span is None else span
    lo, hi = start + plan.pad, stop + plan.pad
    return [c for c in plan.chunks if c.start < hi and c.start + c.length > lo]


class MsstOverlapAdd:
    """Streaming MSST overlap-add: chunk outputs in -> finished track samples out, in order, bounded memory.

    A sample is final once every chunk covering it is in; MSST's division by the sum of fade windows is then done on
    it alone (the same float32 operations as MSST's whole-track `result / counter`, so the samples are identical).
    span: only track samples [start, stop) (one worker's share of a long track): the pending chunks are those that
    touch it (`self.chunks`, in plan order). `pop_ready()` returns the next final block (sources, channels, n);
    `finish()` the rest once every chunk is in. Memory: the samples between the last pop and the furthest chunk added.
    """

    def __init__(self, plan: MsstPlan, num_sources: int, channels: int, span: tuple[int, int] | None = None):
        self.plan = plan
        self.num_sources, self.channels = int(num_sources), int(channels)
        start, stop = (0, plan.length) if span is None else (int(span[0]), int(span[1]))
        if not 0 <= start < stop <= plan.length:
            raise ValueError(f"span [{start}, {stop}) is not inside the track [0, {plan.length})")
        self.start, self.stop = start, stop
        lo, hi = start + plan.pad, stop + plan.pad  # padded coordinates
        self.chunks = span_chunks(plan, (start, stop))
        self._pending = {c.index: c for c in self.chunks}
        self._lo, self._hi = lo, hi
        self._base = lo  # padded sample at buffer index 0
        self._sum = np.zeros((self.num_sources, self.channels, 0), dtype=np.float32)
        self._weight = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def missing(self) -> list[int]:
        return sorted(self._pending)

    def _ensure(self, n: int) -> None:
        if n > self._weight.shape[0]:
            cap = min(max(n, 2 * self._weight.shape[0], 1024), self._hi - self._base)
            s = np.zeros((self.num_sources, self.channels, cap), dtype=np.float32)
            w = np.zeros(cap, dtype=np.float32)
            s[..., :self._sum.shape[-1]] = self._sum
            w[:self._weight.shape[0]] = self._weight
            self._sum, self._weight = s, w

    def add(self, chunk: MsstChunk | int, output: np.ndarray) -> None:
        """`output`: ``(sources, channels, chunk_size)`` (or at least ``chunk.length`` samples long)."""
        if not isinstance(chunk, MsstChunk):
            chunk = self.plan.chunks[int(chunk)]
        if self._pending.get(chunk.index) != chunk:
            raise ValueError(f"chunk {chunk.index} is not pending (added twice, or outside the span)")
        output = np.asarray(output)
        n = chunk.length
        if output.shape[:2] != (self.num_sources, self.channels) or output.shape[-1] < n:
            raise ValueError(f"chunk output shape {output.shape}, expected ({self.num_sources}, {self.channels}, "
                             f">={n})")
        a, b = max(chunk.start, self._lo), min(chunk.start + n, self._hi)
        w = chunk_window(self.plan, chunk)[:n][a - chunk.start:b - chunk.start]
        self._ensure(b - self._base)
        self._sum[..., a - self._base:b - self._base] += output[..., a - chunk.start:b - chunk.start] * w
        self._weight[a - self._base:b - self._base] += w
        del self._pending[chunk.index]

    def _ready(self) -> int:
        first = min((c.start for c in self._pending.values()), default=self._hi)
        return min(max(first, self._lo), self._hi)

    def _pop(self, upto: int) -> np.ndarray:
        n = upto - self._base
        if n <= 0:
            return np.zeros((self.num_sources, self.channels, 0), dtype=np.float32)
        self._ensure(n)
        s, w = self._sum[..., :n], self._weight[:n]
        out = np.divide(s, w, out=np.zeros_like(s), where=w > 0)
        self._sum = self._sum[..., n:].copy()
        self._weight = self._weight[n:].copy()
        self._base = upto
        return out

    def pop_ready(self) -> np.ndarray:
        return self._pop(self._ready())

    def finish(self) -> np.ndarray:
        if self._pending:
            raise ValueError(f"chunks not added yet: {self.missing[:10]}")
        return self._pop(self._hi)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def demix(mix: np.ndarray, runner: Callable[[np.ndarray], np.ndarray], chunk_size: int, num_overlap: int,
          batch_size: int = 1) -> np.ndarray:
    """MSST `demix` of a ``(channels, L)`` track: `runner` maps ``(B, channels, chunk)`` to ``(B, S, channels,
    chunk)``; returns ``(S, channels, L)`` float32. The result does not depend on `batch_size`."""
    mix = np.asarray(mix, dtype=np.float32)
    if mix.ndim != 2:
        raise ValueError(f"mix must be (channels, samples), got {mix.shape}")
    plan = plan_chunks(mix.shape[-1], chunk_size, num_overlap)
    acc: MsstOverlapAdd | None = None
    blocks = []
    for batch in _batches(span_chunks(plan), max(1, int(batch_size))):
        x = np.stack([read_chunk(mix, plan, c) for c in batch])
        y = np.asarray(runner(x))
        if y.ndim != 4 or y.shape[0] != len(batch):
            raise ValueError(f"runner returned {y.shape}, expected ({len(batch)}, S, {mix.shape[0]}, {chunk_size})")
        if acc is None:
            acc = MsstOverlapAdd(plan, y.shape[1], mix.shape[0])
        for c, out in zip(batch, y):
            acc.add(c, out)
        blocks.append(acc.pop_ready())
    blocks.append(acc.finish())
    return np.concatenate(blocks, axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# stems


def model_sources(instruments: Sequence[str], target_instrument: str | None) -> list[str]:
    """What the model outputs: ``[target_instrument]`` when set, else the instruments (MSST rule)."""
    return [target_instrument] if target_instrument else list(instruments)


def complement_name(instruments: Sequence[str], target_instrument: str) -> str:
    """Name of mix minus target: the other instrument when there is exactly one, else ``instrumental``."""
    others = [i for i in instruments if i != target_instrument]
    return others[0] if len(others) == 1 else "instrumental"


def output_stems(instruments: Sequence[str], target_instrument: str | None) -> list[str]:
    """Stems written for a track: the model's, plus the complement when the config has a target instrument."""
    names = model_sources(instruments, target_instrument)
    if target_instrument:
        names.append(complement_name(instruments, target_instrument))
    return names


def add_complement(mix: np.ndarray, separated: np.ndarray, instruments: Sequence[str],
                   target_instrument: str | None) -> tuple[list[str], np.ndarray]:
    """``(names, stems)``: with a target instrument, append ``mix - target``; `separated` is ``(S, C, L)``."""
    separated = np.asarray(separated, dtype=np.float32)
    names = model_sources(instruments, target_instrument)
    if len(names) != separated.shape[0]:
        raise ValueError(f"{separated.shape[0]} separated stems for names {names}")
    if not target_instrument:
        return names, separated
    rest = np.asarray(mix, dtype=np.float32)[None] - separated[:1]
    return output_stems(instruments, target_instrument), np.concatenate([separated, rest], axis=0)
