"""Span parts: where the separated spans of a long track wait until the last one is done, then become stems.

A span's output (model-rate float32, the selected stems) is written as one raw file per span, frame-interleaved
(frames x stems x channels), published by rename; a small JSON beside it says who made it. The worker that finishes
the last span claims the track (an exclusive create, so exactly one does, however the spans race) and assembles the
stem files from the parts in order, then removes them. Nothing here knows about Ray: the same folder works on a
shared filesystem (every worker writes its parts) and on the driver's node (parts arrive through `node_io`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import write_text

PARTS_DIR = ".ripper-dist/parts"
#: Temporary names this package writes beside a stem (`StemWriter`: `.<stem>.<ext>.<12 hex>.tmp|.f32`; `atomic_path`:
#: `.<name>.<8 random>.tmp`): the only files the cleanup removes from a track folder.
TEMP_NAME = re.compile(r"^\.[^/]+\.(wav|flac)\.([0-9a-f]{12}\.(tmp|f32)|[a-z0-9_]{8}\.tmp)$")


def parts_root(out_dir: Path, options_key: str) -> Path:
    return Path(out_dir) / PARTS_DIR / options_key


def clean_leftovers(out_dir: Path, options_key: str, folders) -> None:
    """Remove what an interrupted run (or a worker killed mid-write) left in OUT: the span parts of this options key,
    the stems' temporary files (`TEMP_NAME`, nothing else) in the given track folders, and those folders if that left
    them empty. Never a finished file: those appear by rename only."""
    out_dir = Path(out_dir)
    shutil.rmtree(parts_root(out_dir, options_key), ignore_errors=True)
    for empty in (out_dir / PARTS_DIR, (out_dir / PARTS_DIR).parent):
        try:
            empty.rmdir()  # only if nothing else (another options key, the manifest journal) is in there
        except OSError:
            pass
    for folder in folders:
        folder = Path(folder)
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if TEMP_NAME.match(name):
                (folder / name).unlink(missing_ok=True)
        try:
            folder.rmdir()  # a failed track's folder, now empty
        except OSError:
            pass


class PartWriter:
    """Stream (stems, C, n) blocks into a part file; `close()` publishes it, `abort()` removes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        self._f = open(self._tmp, "wb")
        self.samples = 0

    def write(self, block: np.ndarray) -> None:
        frames = np.ascontiguousarray(np.moveaxis(np.asarray(block, dtype="<f4"), -1, 0))  # (n, stems, C)
        self._f.write(frames.tobytes())
        self.samples += block.shape[-1]

    def close(self) -> Path:
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def read_part(path: Path, stems: int, channels: int, block: int = 1 << 17) -> Iterator[np.ndarray]:
    """(stems, C, n) blocks of a part file, in order."""
    frame = stems * channels * 4
    with open(path, "rb") as f:
        while True:
            buf = f.read(block * frame)
            if not buf:
                return
            if len(buf) % frame:
                raise ValueError(f"{path}: truncated part ({len(buf)} bytes is not a whole number of frames)")
            yield np.moveaxis(np.frombuffer(buf, dtype="<f4").reshape(-1, stems, channels), 0, -1)


class TrackParts:
    """The parts folder of one track: `OUT/.ripper-dist/parts/<options key>/<track>/`."""

    def __init__(self, root: Path, track: str, n_spans: int):
        self.dir = Path(root) / track
        self.n_spans = int(n_spans)

    def part(self, span: int) -> Path:
        return self.dir / f"span-{span:05d}-of-{self.n_spans:05d}.f32"

    def writer(self, span: int) -> PartWriter:
        return PartWriter(self.part(span))

    def mark(self, span: int, meta: dict) -> None:
        """Record that `span` is complete (after its part was published)."""
        write_text(self.part(span).with_suffix(".json"), json.dumps(meta))

    def metas(self) -> list[dict]:
        out = []
        for k in range(self.n_spans):
            try:
                out.append(json.loads(self.part(k).with_suffix(".json").read_text()))
            except (OSError, ValueError):
                return []
        return out

    def complete(self) -> bool:
        return all(self.part(k).with_suffix(".json").exists() for k in range(self.n_spans))

    def claim(self) -> bool:
        """True for exactly one caller per track: the one that assembles it (or records its failure)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.dir / ".final", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def blocks(self, stems: int, channels: int) -> Iterator[np.ndarray]:
        for k in range(self.n_spans):
            yield from read_part(self.part(k), stems, channels)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
