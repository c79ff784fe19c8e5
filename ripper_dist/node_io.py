"""`--no-shared-fs`: the driver's node reads the inputs and keeps the parts for workers that cannot see its disks.

`NodeIO` is a threaded Ray actor pinned to the driver's node. Workers ask it for model-rate windows of an input
(decoded and resampled there, so only the samples a span needs cross the network, once) and send it their span parts
(written into the same parts folder a shared filesystem would hold); the stems are then assembled on that node by the
job's finishing tasks, which are pinned there too. `RemoteReader` and `RemoteParts` give workers the same interface
as a local `AudioReader` and `parts.TrackParts`, so the work unit does not know where its bytes live.
"""
from __future__ import annotations

import collections
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from .audio import AudioReader
from .parts import TrackParts

BLOCK_SECONDS = 10       # windows fetched per call (a chunk needs one or two; a span reads each block once)
SEND_BYTES = 8 << 20     # part bytes buffered by a worker before they are sent


class NodeIO:
    """Runs on the driver's node (see the module docstring). Thread-safe: one reader per (input, client)."""

    def __init__(self, sample_rate: int, channels: int, max_readers: int = 32):
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.max_readers = max_readers
        self._readers: collections.OrderedDict[tuple[str, str], tuple[threading.Lock, AudioReader]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def _reader(self, path: str, client: str) -> tuple[threading.Lock, AudioReader]:
        with self._lock:
            entry = self._readers.pop((path, client), None)
            if entry is None:
                entry = (threading.Lock(), AudioReader(path, self.sample_rate, self.channels))
            self._readers[(path, client)] = entry
            while len(self._readers) > self.max_readers:
                _, (lock, old) = self._readers.popitem(last=False)
                with lock:
                    old.close()
            return entry

    def info(self, path: str, client: str) -> dict:
        _, r = self._reader(path, client)
        return {"length": r.length, "frames": r.info.frames, "sample_rate": r.info.sample_rate,
                "channels": r.info.channels, "duration_s": r.info.duration_s}

    def read(self, path: str, client: str, start: int, stop: int) -> np.ndarray:
        lock, r = self._reader(path, client)
        with lock:
            return r.read(start, stop)

    def release(self, path: str, client: str) -> None:
        with self._lock:
            entry = self._readers.pop((path, client), None)
        if entry:
            with entry[0]:
                entry[1].close()

    # -- parts -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _tmp(part: Path, token: str) -> Path:
        return part.with_name(f".{part.name}.{token}.tmp")

    def write_part(self, root: str, track: str, n_spans: int, span: int, token: str, offset: int,
                   data: bytes) -> None:
        part = TrackParts(Path(root), track, n_spans).part(span)
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._tmp(part, token), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def publish_part(self, root: str, track: str, n_spans: int, span: int, token: str) -> None:
        part = TrackParts(Path(root), track, n_spans).part(span)
        tmp = self._tmp(part, token)
        if not tmp.exists():  # an empty span part: nothing was sent
            part.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()
        os.replace(tmp, part)

    def abort_part(self, root: str, track: str, n_spans: int, span: int, token: str) -> None:
        self._tmp(TrackParts(Path(root), track, n_spans).part(span), token).unlink(missing_ok=True)

    def mark(self, root: str, track: str, n_spans: int, span: int, meta: dict) -> None:
        TrackParts(Path(root), track, n_spans).mark(span, meta)


class RemoteReader:
    """An `AudioReader` lookalike whose samples come from `NodeIO` in aligned blocks (a few kept for reuse)."""

    def __init__(self, io, path: str, sample_rate: int, channels: int, keep: int = 4):
        import ray
        self._ray, self.io, self.path = ray, io, Path(path)
        self.client = uuid.uuid4().hex
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        meta = ray.get(io.info.remote(str(path), self.client))
        self.length = int(meta["length"])
        self.info = _Info(meta)
        self.block = BLOCK_SECONDS * self.sample_rate
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._keep = keep
        self.fetched_samples = 0

    def _get(self, k: int) -> np.ndarray:
        if k not in self._blocks:
            a = k * self.block
            b = min(a + self.block, self.length)
            self._blocks[k] = self._ray.get(self.io.read.remote(str(self.path), self.client, a, b))
            self.fetched_samples += b - a
            while len(self._blocks) > self._keep:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(k)
        return self._blocks[k]

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros((self.channels, stop - start), dtype=np.float32)
        s0, s1 = max(start, 0), min(stop, self.length)
        for k in range(s0 // self.block, (s1 - 1) // self.block + 1 if s1 > s0 else 0):
            a = k * self.block
            blk = self._get(k)
            lo, hi = max(s0, a), min(s1, a + blk.shape[-1])
            out[:, lo - start:hi - start] = blk[:, lo - a:hi - a]
        return out

    def close(self) -> None:
        self._ray.get(self.io.release.remote(str(self.path), self.client))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Info:
    def __init__(self, meta: dict):
        self.frames = int(meta["frames"])
        self.sample_rate = int(meta["sample_rate"])
        self.channels = int(meta["channels"])
        self.duration_s = float(meta["duration_s"])


class RemotePartWriter:
    """`parts.PartWriter` over `NodeIO`: the same bytes, sent in pieces of `SEND_BYTES` at explicit offsets."""

    def __init__(self, io, key: tuple):
        import ray
        self._ray, self.io, self.key = ray, io, key
        self.token = uuid.uuid4().hex[:12]
        self._buf: list[bytes] = []
        self._buffered = 0
        self._offset = 0
        self._pending: list = []
        self.samples = 0

    def write(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(np.moveaxis(np.asarray(block, dtype="<f4"), -1, 0)).tobytes()
        self._buf.append(data)
        self._buffered += len(data)
        self.samples += block.shape[-1]
        if self._buffered >= SEND_BYTES:
            self._send()

    def _send(self) -> None:
        if not self._buffered:
            return
        data = b"".join(self._buf)
        self._pending.append(self.io.write_part.remote(*self.key, self.token, self._offset, data))
        self._offset += len(data)
        self._buf, self._buffered = [], 0
        if len(self._pending) > 2:  # at most a few pieces in flight: bounded memory on both sides
            self._ray.get(self._pending.pop(0))

    def close(self) -> None:
        self._send()
        self._ray.get(self._pending)
        self._pending = []
        self._ray.get(self.io.publish_part.remote(*self.key, self.token))

    def abort(self) -> None:
        try:
            self._ray.get(self._pending)
        except Exception:  # noqa: BLE001 - the part is being dropped anyway
            pass
        self._ray.get(self.io.abort_part.remote(*self.key, self.token))


class RemoteParts:
    """`parts.TrackParts` for a worker: parts and marks land on the driver's node."""

    def __init__(self, io, root: Path, track: str, n_spans: int):
        self.io, self.root, self.track, self.n_spans = io, str(root), track, int(n_spans)

    def writer(self, span: int) -> RemotePartWriter:
        return RemotePartWriter(self.io, (self.root, self.track, self.n_spans, span))

    def mark(self, span: int, meta: dict) -> None:
        import ray
        ray.get(self.io.mark.remote(self.root, self.track, self.n_spans, span, meta))
