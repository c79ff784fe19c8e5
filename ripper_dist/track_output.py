"""The stems of one track being assembled: model outputs -> overlap-add -> stem files, streaming.

Shared by the local engine and the Ray reducer so both produce the same files from the same chunk outputs. Also knows
the stem selection rules: `--stems` (a subset) and `--two-stems X` (X plus `no_X`, the sum of the other sources, as
upstream demucs writes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .audio import AudioInfo, StemWriter
from .chunking import ChunkTask, MixStats, OverlapAdd


def select_stems(sources: Sequence[str], stems: Sequence[str] | None, two_stems: str | None) -> dict[str, list[int]]:
    """Output stem name -> indices of the model sources summed into it."""
    sources = list(sources)
    if two_stems:
        if two_stems not in sources:
            raise ValueError(f"--two-stems {two_stems!r}: the model has {sources}")
        i = sources.index(two_stems)
        return {two_stems: [i], f"no_{two_stems}": [j for j in range(len(sources)) if j != i]}
    if not stems:
        return {s: [i] for i, s in enumerate(sources)}
    unknown = [s for s in stems if s not in sources]
    if unknown:
        raise ValueError(f"unknown stem(s) {unknown}: the model has {sources}")
    return {s: [sources.index(s)] for s in dict.fromkeys(stems)}


def needed_models(weights: Sequence[Sequence[float]], stem_map: dict[str, list[int]]) -> set[int]:
    """Sub-models of a bag that contribute to the selected stems (a one-hot bag runs only the specialists needed)."""
    idx = {i for v in stem_map.values() for i in v}
    return {m for m, row in enumerate(weights) if any(row[i] != 0 for i in idx)}


class TrackOutput:
    """Accumulates one track's chunk outputs (any order) and streams finished samples into its stem writers."""

    def __init__(self, *, tasks: Sequence[ChunkTask], length: int, sources: Sequence[str], channels: int,
                 weights, stats: MixStats, stem_map: dict[str, list[int]], out_paths: dict[str, Path],
                 model_rate: int, info: AudioInfo, fmt: str, subtype: str, clip: str,
                 transition_power: float = 1.0):
        self.acc = OverlapAdd(tasks, length=length, n_sources=len(sources), channels=channels, weights=weights,
                              transition_power=transition_power, stats=stats)
        self.stem_map = stem_map
        out_channels = 1 if info.channels == 1 else channels
        self.writers = {s: StemWriter(p, in_rate=model_rate, out_rate=info.sample_rate, out_channels=out_channels,
                                      frames=info.frames, fmt=fmt, subtype=subtype, clip=clip)
                        for s, p in out_paths.items()}
        self.paths = dict(out_paths)
        self.out_channels = out_channels
        self.done_samples = 0

    @property
    def pending(self) -> int:
        return self.acc.pending

    def _emit(self, block: np.ndarray) -> int:
        n = block.shape[-1]
        if n:
            for stem, w in self.writers.items():
                idx = self.stem_map[stem]
                w.write(block[idx[0]] if len(idx) == 1 else block[idx].sum(axis=0))
            self.done_samples += n
        return n

    def add(self, task: ChunkTask, output: np.ndarray, *, kept: bool = False) -> int:
        """Add one model output (`kept`: only its kept part); returns how many model-rate samples became final."""
        self.acc.add(task, output, kept=kept)
        return self._emit(self.acc.pop_ready())

    def finish(self) -> tuple[dict[str, Path], int]:
        """Write the rest and publish the files atomically; returns (stem paths, samples emitted now)."""
        try:
            n = self._emit(self.acc.finish())
            for w in self.writers.values():
                w.close()
        except BaseException:
            self.abort()
            raise
        return self.paths, n

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


class MsstTrackOutput:
    """RoFormer: chunk outputs (any order) -> MSST overlap-add -> stems (+ the complement) -> files.

    MSST normalises by the sum of fade windows over the whole reflect-padded track, so the result is complete only
    when every chunk is in; the stems are written then, each atomically. The mix is read again only for the
    complement (mix minus target).
    """

    def __init__(self, *, plan, n_sources: int, channels: int, instruments, target_instrument, stem_map,
                 out_paths: dict[str, Path], model_rate: int, info: AudioInfo, fmt: str, subtype: str, clip: str,
                 read_mix):
        from .msst_chunking import MsstAccumulator
        self.acc = MsstAccumulator(plan, n_sources, channels)
        self.plan = plan
        self.instruments, self.target = list(instruments), target_instrument
        self.stem_map, self.paths = stem_map, dict(out_paths)
        self.model_rate, self.info = model_rate, info
        self.fmt, self.subtype, self.clip = fmt, subtype, clip
        self.read_mix = read_mix
        self.out_channels = 1 if info.channels == 1 else channels
        self._reported = 0

    @property
    def pending(self) -> int:
        return len(self.acc.missing)

    def add(self, chunk, output: np.ndarray) -> int:
        """Add one chunk output; returns model-rate samples to count as progress (chunk share of the track)."""
        self.acc.add(chunk, output)
        done = self.plan.length * (len(self.plan.chunks) - self.pending) // len(self.plan.chunks)
        n, self._reported = done - self._reported, done
        return n

    def finish(self) -> tuple[dict[str, Path], int]:
        from .audio import write_stem
        from .msst_chunking import add_complement
        separated = self.acc.result()
        mix = self.read_mix() if self.target else None
        _, stems = add_complement(mix, separated, self.instruments, self.target)
        written: dict[str, Path] = {}
        try:
            for stem, idx in self.stem_map.items():
                audio = stems[idx[0]] if len(idx) == 1 else stems[idx].sum(axis=0)
                self.paths[stem].parent.mkdir(parents=True, exist_ok=True)
                written[stem] = write_stem(self.paths[stem], audio, in_rate=self.model_rate,
                                           out_rate=self.info.sample_rate, out_channels=self.out_channels,
                                           frames=self.info.frames, fmt=self.fmt, subtype=self.subtype,
                                           clip=self.clip)
        except BaseException:
            for p in written.values():
                Path(p).unlink(missing_ok=True)
            raise
        return written, self.plan.length - self._reported

    def abort(self) -> None:
        """Nothing is on disk before `finish`."""
