"""Model families: what the engines need to know about Demucs bags and MSST (RoFormer) models, in one interface.

A `Family` turns a track into model calls and model calls back into stems, for any *span* of the track (the unit of
work: a whole short track, or one part of a long one). The local engine and the Ray job both call
`Family.run_span`; neither branches on the family. A third family (MDX23C, SCNet ...) is one more subclass.

A family object holds no sessions and no graph bytes (it is shipped to every Ray worker); runners come from the
bundle (`ModelBundle.runners`) where the work runs.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from .chunking import MixStats, OverlapAdd, read_window
from .options import SeparateOptions

Emit = Callable[[np.ndarray], None]  # (stems, channels, n) model-rate samples of the selected stems, in track order

DEMUCS_OVERLAP = 0.25


def select_stems(sources: Sequence[str], stems: Sequence[str] | None, two_stems: str | None,
                 other_method: str | None = None) -> dict[str, list[int]]:
    """Output stem name -> indices of the model outputs summed into it (`--stems`, `--two-stems X` = X + no_X;
    `--other-method none` drops no_X; with `minus`, no_X maps to X's index and is written as mix - X, see
    `minus_stems`)."""
    sources = list(sources)
    if two_stems:
        if two_stems not in sources:
            raise ValueError(f"--two-stems {two_stems!r}: the model has {sources}")
        i = sources.index(two_stems)
        if other_method == "none":
            return {two_stems: [i]}
        if other_method == "minus":
            return {two_stems: [i], f"no_{two_stems}": [i]}
        return {two_stems: [i], f"no_{two_stems}": [j for j in range(len(sources)) if j != i]}
    if not stems:
        return {s: [i] for i, s in enumerate(sources)}
    unknown = [s for s in stems if s not in sources]
    if unknown:
        raise ValueError(f"--stems: unknown stem(s) {unknown}: the model has {sources}")
    return {s: [sources.index(s)] for s in dict.fromkeys(stems)}


def needed_models(weights: Sequence[Sequence[float]], stem_map: dict[str, list[int]]) -> set[int]:
    """Sub-models of a bag that contribute to the selected stems (a one-hot bag runs only the specialists needed)."""
    idx = {i for v in stem_map.values() for i in v}
    return {m for m, row in enumerate(weights) if any(row[i] != 0 for i in idx)}


def minus_stems(opts: SeparateOptions) -> frozenset[str]:
    """Stems written as the mix minus their outputs (`--two-stems X --other-method minus`: no_X = mix - X)."""
    return frozenset({f"no_{opts.two_stems}"} if opts.two_stems and opts.other_method == "minus" else ())


def combine(block: np.ndarray, stem_map: dict[str, list[int]], minus: frozenset[str] = frozenset(),
            mix: np.ndarray | None = None) -> np.ndarray:
    """(outputs, C, n) -> (selected stems, C, n): each stem is its output or the sum of several (no_X), or for a
    stem in `minus`, `mix` (C, n, the model-rate input on the same samples) minus its output."""
    def one(name, idx):
        x = block[idx[0]] if len(idx) == 1 else block[idx].sum(axis=0)
        return mix - x if name in minus else x
    return np.stack([one(name, idx) for name, idx in stem_map.items()])


def split_points(intervals: Sequence[tuple[int, int]], length: int, n_spans: int) -> list[tuple[int, int]]:
    """Cut [0, length) into `n_spans` spans of about equal length, each cut where the fewest model calls straddle it
    (a call that straddles a cut runs in both spans). intervals: the track samples each model call contributes to."""
    n_spans = max(1, min(int(n_spans), max(1, length)))
    if n_spans == 1 or not intervals:
        return [(0, length)]
    starts = np.sort(np.array([a for a, _ in intervals]))
    ends = np.sort(np.array([b for _, b in intervals]))
    candidates = np.unique(np.concatenate([starts, ends]))
    candidates = candidates[(candidates > 0) & (candidates < length)]
    cuts = []
    for k in range(1, n_spans):
        target = k * length / n_spans
        window = max(length / n_spans / 4, 1)
        near = candidates[np.abs(candidates - target) <= window]
        if near.size == 0:
            cut = int(round(target))
        else:  # straddling calls at c: started before c and ending after it
            straddle = np.searchsorted(starts, near, side="left") - np.searchsorted(ends, near, side="right")
            best = np.lexsort((np.abs(near - target), straddle))[0]
            cut = int(near[best])
        if cuts and cut <= cuts[-1] or cut <= 0 or cut >= length:
            continue
        cuts.append(cut)
    bounds = [0, *cuts, length]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class Family(ABC):
    """What a model family provides to the engines."""

    kind: str
    sample_rate: int
    channels: int
    outputs: list[str]                  # what the family can write (`--stems` chooses among them)
    stem_map: dict[str, list[int]]      # selected stem -> outputs summed into it
    models: set[int]                    # sub-models that have to run

    @property
    def stems(self) -> list[str]:
        return list(self.stem_map)

    @abstractmethod
    def resume_options(self) -> dict:
        """The options that change this family's output (the resume key is built from them alone)."""

    @abstractmethod
    def track_state(self, reader) -> dict:
        """Per-track values every span needs (plain floats: they travel in Ray rows), from one pass over the track."""

    @abstractmethod
    def call_intervals(self, length: int) -> list[tuple[int, int]]:
        """The track samples each model call contributes to (to cut spans where few calls straddle)."""

    @abstractmethod
    def run_span(self, runners: Sequence, reader, length: int, state: dict, span: tuple[int, int],
                 batch_size: int, emit: Emit) -> None:
        """Separate track samples [span) into `emit`: every model call touching the span, overlap-added with the
        weights of the whole track's plan, so concatenated spans equal the whole track (bitwise)."""

    def spans(self, length: int, n_spans: int) -> list[tuple[int, int]]:
        return split_points(self.call_intervals(length), length, n_spans)


class DemucsFamily(Family):
    """Demucs v4 bags (a single model is a bag of one): upstream `apply_model` chunking, shifts, bag weights."""

    kind = "demucs"

    def __init__(self, bag, opts: SeparateOptions, explain: str | None = None):
        """bag: an `engine.DemucsBag` (its runners are not used here: only its plan, weights and shapes).
        explain="branches": the bag's graphs are explanation graphs (sources S + S.time + S.spec): each selected stem
        also gets its time-branch and spectral-branch terms, `STEM.time` and `STEM.spec`."""
        self.name = bag.name
        self.planner = dataclasses.replace(bag, runners=[_Shape(c) for c in bag.chunk_samples])
        self.sample_rate, self.channels = self.planner.sample_rate, self.planner.channels
        self.outputs = list(self.planner.sources)
        self.explain = explain
        self.minus = minus_stems(opts)
        n = len(self.outputs) // 3 if explain == "branches" else len(self.outputs)
        main = select_stems(self.outputs[:n], opts.stems, opts.two_stems, opts.other_method)
        # --explain: each stem's time- and spectral-branch terms (a `minus` stem is the mix minus a model output,
        # which no branch term describes, so it has none)
        self.stem_map = main if explain != "branches" else main | {
            f"{s}.{branch}": [i + k * n for i in idx]
            for k, branch in ((1, "time"), (2, "spec")) for s, idx in main.items() if s not in self.minus}
        # the mix mean that un-normalising adds to every output: the spectral terms give it back, so that the two
        # branch files sum to the stem
        self._spec_rows = [k for k, s in enumerate(self.stem_map) if explain and s.endswith(".spec")]
        self.models = needed_models(self.planner.weights, self.stem_map)
        self.shifts, self.seed = int(opts.shifts), int(opts.seed)
        self.overlap = DEMUCS_OVERLAP if opts.overlap is None else float(opts.overlap)
        if opts.num_overlap is not None:
            raise ValueError("--num-overlap: a RoFormer option; Demucs takes --overlap")
        if opts.tta:  # an exported Demucs .onnx: its family is known only now
            raise ValueError(f"--tta: a RoFormer option (MSST's test-time augmentation); {self.name} is a Demucs "
                             "model: use --shifts")
        self.segment_samples = None if opts.segment is None else int(round(opts.segment * self.sample_rate))
        if self.segment_samples is not None:
            longest = min(self.planner.chunk_samples)
            if self.segment_samples > longest:
                raise ValueError(f"--segment: {opts.segment:g} s is longer than the model's "
                                 f"{longest / self.sample_rate:.2f} s (a Transformer model cannot use a longer "
                                 "segment than it was trained for)")
            if self.segment_samples < 1:
                raise ValueError(f"--segment: {opts.segment:g} s is shorter than one sample")
        self.tasks(self.sample_rate)  # a plan that cannot be made (overlap with a tiny segment) fails here

    def resume_options(self) -> dict:
        return {"shifts": self.shifts, "seed": self.seed if self.shifts else None, "overlap": self.overlap,
                "segment_samples": self.segment_samples, "stems": self.stem_map, "minus": sorted(self.minus)}

    def tasks(self, length: int):
        tasks = self.planner.plan(length, shifts=self.shifts, overlap=self.overlap, seed=self.seed,
                                  segment_samples=self.segment_samples)
        return [t for t in tasks if t.model in self.models]

    def track_state(self, reader) -> dict:
        from .audio import mix_stats
        s = mix_stats(reader)
        return {"stat_total": float(s.total), "stat_total_sq": float(s.total_sq), "stat_count": int(s.count)}

    def call_intervals(self, length: int) -> list[tuple[int, int]]:
        return [(t.keep_start, t.keep_end) for t in self.tasks(length)]

    def run_span(self, runners, reader, length, state, span, batch_size, emit) -> None:
        from .engine import run_tasks
        stats = MixStats(float(state["stat_total"]), float(state["stat_total_sq"]), int(state["stat_count"]))
        acc = OverlapAdd(self.tasks(length), length=length, n_sources=len(self.outputs), channels=self.channels,
                         weights=self.planner.weights, stats=stats, span=span)
        if hasattr(reader, "history"):  # reads come in track order per sub-model batch
            reader.history = max(reader.history, (batch_size + 2) * max(self.planner.chunk_samples))
        pos = span[0]
        mean = np.float32(stats.total / max(stats.count, 1))

        def flush(block: np.ndarray) -> None:
            nonlocal pos
            n = block.shape[-1]
            if n:
                mix = reader.read(pos, pos + n) if self.minus else None
                pos += n
                stems = combine(block, self.stem_map, self.minus, mix)
                if self._spec_rows:
                    stems[self._spec_rows] -= mean
                emit(stems)

        def consume(batch_tasks, outputs) -> None:
            for t, o in zip(batch_tasks, outputs):
                acc.add(t, o)
            flush(acc.pop_ready())

        run_tasks(runners, acc.tasks, lambda t, n: read_window(reader, t, n, stats=stats), batch_size, consume,
                  n_sources=len(self.outputs), channels=self.channels)
        flush(acc.finish())


class MsstFamily(Family):
    """Mel-Band / BS-RoFormer through MSST's `demix` chunking; a target instrument adds its complement (mix - it)."""

    kind = "msst"

    def __init__(self, bundle, opts: SeparateOptions):
        from .msst_chunking import model_sources, output_stems
        from .options import refuse_demucs_options
        refuse_demucs_options(opts, bundle.family)  # also for a RoFormer given as an exported .onnx
        info = bundle.info
        self.name = bundle.name
        self.sample_rate, self.channels = info.sample_rate, info.channels
        self.chunk_size = info.chunk_samples
        self.num_overlap = int(opts.num_overlap or bundle.num_overlap)
        if self.num_overlap > self.chunk_size:
            raise ValueError(f"--num-overlap: {self.num_overlap} is more than the chunk's {self.chunk_size} samples")
        self.instruments, self.target = bundle.instruments, bundle.target_instrument
        self.n_model = len(model_sources(self.instruments, self.target))
        self.outputs = output_stems(self.instruments, self.target)
        self.stem_map = select_stems(self.outputs, opts.stems, opts.two_stems, opts.other_method)
        self.minus = minus_stems(opts)
        self.models = {0}
        self._plan = None
        self.tta = bool(opts.tta)
        # --explain: per-band masks (graph output `band_masks`), written beside the stems as STEM.masks.npy
        self.explain = bundle.explain
        self.hop = int(json.loads(info.raw.get("ripper.stft", "{}")).get("hop_length", 0) or 0)
        if self.explain == "band_masks" and not self.hop:
            raise ValueError(f"{bundle.name}: an explanation graph without its STFT hop (ripper.stft)")

    def resume_options(self) -> dict:
        # "tta" only when on: the keys of runs without it stay those of earlier versions (their tracks stay done)
        return {"num_overlap": self.num_overlap, "stems": self.stem_map, "minus": sorted(self.minus),
                **({"tta": True} if self.tta else {})}

    def run_model(self, runner, batch: np.ndarray) -> np.ndarray:
        """The model's outputs for a batch of chunks, with `--tta` the mean of MSST's three passes (`utils/
        model_utils.py: apply_tta`): the chunk, its channels swapped, its polarity inverted, each output transformed
        back, summed in MSST's order ((plain + swapped back) - inverted) and divided by 3 in float32.

        Per chunk, not per track as MSST: the overlap-add is linear and the reflect padding commutes with both
        transforms, so this is MSST's result up to float rounding, and a chunk's result is the same in whichever span
        it runs (spans then concatenate to the one-span track bit for bit). A mono model's swap is the identity, so
        its plain pass is reused (MSST runs it twice); a mono input to a stereo model has two equal channels and runs
        all three passes, as in MSST, which duplicates mono input for stereo models."""
        out = np.asarray(runner(batch))
        if not self.tta:
            return out
        out = np.array(out, dtype=np.float32)  # a copy: a runner may return a buffer it reuses
        if batch.shape[1] > 1:
            swapped = np.asarray(runner(np.ascontiguousarray(batch[:, ::-1])))
            out += swapped[:, :, ::-1]
        else:
            out += out
        out -= np.asarray(runner(np.negative(batch)))
        out /= np.float32(3)
        return out

    def plan(self, length: int):
        from .msst_chunking import plan_chunks
        if self._plan is None or self._plan.length != length:
            self._plan = plan_chunks(length, self.chunk_size, self.num_overlap)
        return self._plan

    def track_state(self, reader) -> dict:
        return {}

    def spans(self, length: int, n_spans: int) -> list[tuple[int, int]]:
        # the band masks of a track are averaged over every chunk that covers a frame: one span holds them all
        return [(0, length)] if self.explain else super().spans(length, n_spans)

    def call_intervals(self, length: int) -> list[tuple[int, int]]:
        p = self.plan(length)
        return [(max(c.start - p.pad, 0), min(c.start + c.length - p.pad, length)) for c in p.chunks]

    def run_span(self, runners, reader, length, state, span, batch_size, emit) -> None:
        from .msst_chunking import MsstOverlapAdd, read_chunk, source_span
        plan = self.plan(length)
        acc = MsstOverlapAdd(plan, self.n_model, self.channels, span=span)
        runner = runners[0]
        pos = span[0]
        complement = len(self.outputs) > self.n_model

        def flush(block: np.ndarray) -> None:
            nonlocal pos
            n = block.shape[-1]
            if not n:
                return
            mix = reader.read(pos, pos + n) if complement or self.minus else None
            if complement:  # mix minus target, on the same samples
                block = np.concatenate([block, mix[None] - block[:1]], axis=0)
            pos += n
            emit(combine(block, self.stem_map, self.minus, mix))

        chunks = acc.chunks
        masks = _MaskGrid(length, self.hop, plan.pad) if self.explain == "band_masks" else None
        for k in range(0, len(chunks), max(1, int(batch_size))):
            batch = chunks[k:k + max(1, int(batch_size))]
            inputs = []
            for c in batch:
                a, b = source_span(plan, c)
                inputs.append(read_chunk(reader.read(a, b), plan, c, offset=a))
            if masks is not None:
                outputs, band_masks = runner.run_explained(np.stack(inputs))
                for c, m in zip(batch, band_masks):
                    masks.add(c, m)
            else:
                outputs = self.run_model(runner, np.stack(inputs))
            if outputs.shape != (len(batch), self.n_model, self.channels, self.chunk_size):
                raise ValueError(f"the graph returned {outputs.shape}, expected "
                                 f"{(len(batch), self.n_model, self.channels, self.chunk_size)}")
            for c, o in zip(batch, outputs):
                acc.add(c, o)
            flush(acc.pop_ready())
        flush(acc.finish())
        side = getattr(emit, "side", None)
        if masks is not None and side is not None:
            grid = masks.result()  # (model outputs, bands, frames)
            side("masks", {s: grid[i] for s, i in zip(self.outputs, range(self.n_model)) if s in self.stem_map})


class _MaskGrid:
    """Per-band masks of a whole track on one frame grid (frame f at track sample f * hop): each chunk's frames are
    placed where they fall in the track, frames of the reflect padding are dropped, overlapping chunks averaged."""

    def __init__(self, length: int, hop: int, pad: int):
        self.hop, self.pad = hop, pad
        self.frames = length // hop + 1
        self.sum = None
        self.count = np.zeros(self.frames, dtype=np.float64)

    def add(self, chunk, masks: np.ndarray) -> None:
        """masks: (outputs, bands, chunk frames) for a chunk starting at padded-track sample `chunk.start`."""
        if self.sum is None:
            self.sum = np.zeros(masks.shape[:2] + (self.frames,), dtype=np.float64)
        n = masks.shape[-1]
        pos = chunk.start - self.pad + np.arange(n) * self.hop          # track sample of each chunk frame
        valid = (np.arange(n) * self.hop < chunk.length) & (pos >= 0)
        f = np.rint(pos / self.hop).astype(np.int64)
        valid &= f < self.frames
        np.add.at(self.sum, (slice(None), slice(None), f[valid]), masks[..., valid])
        np.add.at(self.count, f[valid], 1.0)

    def result(self) -> np.ndarray:
        return (self.sum / np.maximum(self.count, 1.0)).astype(np.float32)


class _Shape:
    """A runner's shape without a session (planning needs only the graph length)."""

    def __init__(self, chunk_samples: int):
        self.chunk_samples = int(chunk_samples)

    def __call__(self, batch):
        raise RuntimeError("this sub-model has no session here")


def family_for(bundle, opts: SeparateOptions) -> Family:
    """The family of an exported model (`models.ModelBundle`), with the options checked against it."""
    if bundle.is_msst:
        return MsstFamily(bundle, opts)
    explain = bundle.explain
    from .engine import DemucsBag
    bag = DemucsBag([_Shape(i.chunk_samples) for i in bundle.infos], bundle.full_weights,
                    [i.segment_samples for i in bundle.infos], list(bundle.info.sources), bundle.info.sample_rate,
                    bundle.info.channels, name=bundle.name)
    return DemucsFamily(bag, opts, explain=explain)
