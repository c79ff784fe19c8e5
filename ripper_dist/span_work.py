"""The unit of work: one span of one track, from the input file to a sink of stem samples.

The local engine runs a track as one span straight into its stem files; the Ray job runs spans on its actors into
span parts (`parts.py`) and assembles them where the parts are. Both call `plan_track` and `run_span`, so the two
placements cannot drift apart: the same plan, the same model calls, the same overlap-add, the same samples.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .audio import AudioError, AudioReader
from .families import Family
from .hashing import sha256_file


@dataclass(frozen=True)
class TrackPlan:
    """What every span of a track needs to know, found in one pass over the file (plain values: a Ray row)."""

    length: int               # samples at the model rate
    in_rate: int
    frames: int               # input frames (the stems get exactly this many)
    in_channels: int
    duration_s: float
    input_sha256: str
    spans: tuple[tuple[int, int], ...]
    state: dict = field(default_factory=dict)  # the family's per-track values (Demucs: normalisation statistics)
    input_size: int = -1      # the input as planned: a file changed or deleted before its stems are published fails
    input_mtime_ns: int = -1
    container: str = ""       # for the row (input_container, input_codec); "" from a reader that does not say
    codec: str = ""

    def to_row(self) -> dict:
        d = asdict(self)
        d["spans"] = [list(s) for s in self.spans]
        return d

    @classmethod
    def from_row(cls, d: dict) -> "TrackPlan":
        d = dict(d)
        d["spans"] = tuple(tuple(int(v) for v in s) for s in d["spans"])
        return cls(**d)


class InputChangedError(OSError):
    """The input was changed or deleted while it was being separated: its stems would mix two versions."""


def check_unchanged(path, plan: "TrackPlan") -> None:
    """Raise InputChangedError unless `path` is still the file that was planned (size and mtime)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputChangedError(f"{path}: deleted during separation (its stems were not published)") from None
    if plan.input_size >= 0 and (st.st_size, st.st_mtime_ns) != (plan.input_size, plan.input_mtime_ns):
        raise InputChangedError(f"{path}: changed during separation (its stems were not published; a rerun "
                                "separates the new version)")


def open_reader(family: Family, path) -> AudioReader:
    return AudioReader(path, family.sample_rate, family.channels)


def plan_track(family: Family, reader, n_spans: Callable[[int], int] | int = 1, sha256: str | None = None) -> TrackPlan:
    """Probe, hash and read the track once (the family's statistics), and cut it into spans.

    n_spans: a number, or a function of the model-rate length (the Ray job: enough spans to spread a long track
    over the actors and to bound each span's memory)."""
    info = reader.info
    try:
        st = os.stat(reader.path)  # before the pass over the audio: a change during it is caught too
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = -1
    if reader.length == 0:
        raise AudioError(f"{reader.path}: no audio samples")
    state = family.track_state(reader)
    count = n_spans(reader.length) if callable(n_spans) else int(n_spans)
    return TrackPlan(length=reader.length, in_rate=info.sample_rate, frames=info.frames, in_channels=info.channels,
                     duration_s=info.duration_s, input_sha256=sha256 or sha256_file(reader.path),
                     spans=tuple(family.spans(reader.length, count)), state=state, input_size=size,
                     input_mtime_ns=mtime, container=getattr(info, "container", ""), codec=getattr(info, "codec", ""))


def run_span(family: Family, runners, reader, plan: TrackPlan, span: int, batch_size: int, sink,
             progress: Callable[[int], None] | None = None) -> dict:
    """Separate span number `span` of `plan` into `sink.write`; returns what the metadata row says about it."""
    started = time.time()
    t0 = time.perf_counter()

    def emit(block):
        sink.write(block)
        if progress is not None:
            progress(block.shape[-1])
    emit.side = getattr(sink, "side", None)  # per-stem arrays that are not audio (--explain's band masks)

    family.run_span(runners, reader, plan.length, plan.state, plan.spans[span], batch_size, emit)
    return {"started": started, "finished": time.time(), "compute_s": time.perf_counter() - t0,
            "samples": plan.spans[span][1] - plan.spans[span][0]}


def stem_sink(family: Family, plan: TrackPlan, out_paths: dict[str, Path], output=None, *, fmt: str = "wav",
              subtype: str | None = None, clip: str = "rescale"):
    """The sink of a track's stems: `output` (a `stem_sink.StemOutput`), or one made of fmt/subtype/clip."""
    from .stem_sink import StemOutput, StemSink
    output = output or StemOutput(fmt, subtype, clip)
    return StemSink(out_paths, model_rate=family.sample_rate, in_rate=plan.in_rate, frames=plan.frames,
                    input_channels=plan.in_channels, model_channels=family.channels, output=output)


def separate_track(family: Family, runners, path, out_paths: dict[str, Path], *, output=None, fmt: str = "wav",
                   subtype: str | None = None, clip: str = "rescale", batch_size: int = 1,
                   progress: Callable[[int], None] | None = None,
                   deadline=None, on_plan: Callable[[TrackPlan], None] | None = None
                   ) -> tuple[dict[str, Path], TrackPlan, dict]:
    """The local engine's track: one span, straight into the stem files. Returns (paths, plan, span info); the info
    carries the sink's `row_fields` under "stems".

    deadline: a `watchdog.Deadline`, told the track's duration once the header is read. on_plan: told the plan
    before any model run (the API's progress callback learns the exact model-rate length it will count up to)."""
    with open_reader(family, path) as reader:
        if deadline is not None:
            deadline.set_duration(reader.info.duration_s)
        plan = plan_track(family, reader, 1)
        if on_plan is not None:
            on_plan(plan)
        sink = stem_sink(family, plan, out_paths, output, fmt=fmt, subtype=subtype, clip=clip)
        try:
            info = run_span(family, runners, reader, plan, 0, batch_size, sink, progress)
            check_unchanged(path, plan)
            if deadline is not None:
                deadline.check()
        except BaseException:
            sink.abort()
            raise
    paths = sink.close()
    info["peaks"] = sink.peaks
    info["stems"] = sink.row_fields()
    return paths, plan, info
