"""Nothing hangs: a deadline per track (per span and per finishing step under Ray) and a timeout per ONNX Runtime run.

An archive job must not stall on one input: a read blocked on a stalled network mount, a FIFO swapped in for a file,
a run that never returns. The work of a track runs in a daemon thread; the caller waits until the deadline and then
gives up on it: the track becomes a failed row (`TrackTimeoutError`) and the job goes on. A thread stuck in the kernel
cannot be killed, so it is abandoned (it holds no lock the job needs); one that comes back finds its deadline
cancelled and stops at its next model call, aborting its stem files. A model run is stopped from outside with ONNX
Runtime's `RunOptions.terminate` (`ChunkTimeoutError` after `--chunk-timeout`, or at once when its track expires).

Deadline = `--track-timeout` T seconds + T/20 seconds per second of audio once the duration is known (default T 600:
ten minutes plus 30 s per audio second, 0.03x realtime, far slower than any real run); 0 disables either limit.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
DEFAULT_TRACK_TIMEOUT_S = 600.0
DEFAULT_CHUNK_TIMEOUT_S = 600.0
PER_AUDIO_SECOND = 1 / 20       # of the track timeout, per second of audio
GRACE_S = 5.0                   # how long an expired track's thread gets to clean up before it is abandoned


class TrackTimeoutError(TimeoutError):
    """A track (or span) did not finish within its deadline."""


class ChunkTimeoutError(TimeoutError):
    """One ONNX Runtime run took longer than `--chunk-timeout`."""


@dataclass(frozen=True)
class Limits:
    """The two timeouts of a job (seconds; 0 = none); plain values, shipped to Ray workers."""

    track_s: float = DEFAULT_TRACK_TIMEOUT_S
    chunk_s: float = DEFAULT_CHUNK_TIMEOUT_S

    def budget(self, duration_s: float | None) -> float | None:
        if not self.track_s:
            return None
        return self.track_s * (1 + PER_AUDIO_SECOND * max(duration_s or 0.0, 0.0))


class Deadline:
    """The deadline of one piece of work; extended once its audio duration is known, cancelled when it expires."""

    def __init__(self, limits: Limits, what: str, duration_s: float | None = None):
        self.limits, self.what = limits, what
        self.started = time.monotonic()
        self.budget = limits.budget(duration_s)
        self.cancelled = threading.Event()
        self._runs: set = set()  # RunOptions of the model runs in progress
        self._lock = threading.Lock()

    @property
    def expires(self) -> float | None:
        return None if self.budget is None else self.started + self.budget

    def set_duration(self, duration_s: float) -> None:
        self.budget = self.limits.budget(duration_s)

    def message(self) -> str:
        return (f"{self.what}: no result after {time.monotonic() - self.started:.0f} s (deadline {self.budget:.0f} s: "
                f"--track-timeout {self.limits.track_s:g} s + {PER_AUDIO_SECOND * self.limits.track_s:g} s per "
                "audio second); a stalled read or a stuck run")

    def check(self) -> None:
        """Raise TrackTimeoutError in the worker thread once the deadline has passed."""
        if self.cancelled.is_set():
            raise TrackTimeoutError(self.message())

    def expire(self) -> None:
        self.cancelled.set()
        with self._lock:
            for ro in self._runs:
                ro.terminate = True

    def _started_run(self, ro) -> None:
        with self._lock:
            self._runs.add(ro)
            if self.cancelled.is_set():
                ro.terminate = True

    def _ended_run(self, ro) -> None:
        with self._lock:
            self._runs.discard(ro)


def run_with_deadline(fn: Callable[[Deadline], T], deadline: Deadline) -> T:
    """`fn(deadline)` within the deadline: its result or exception, or TrackTimeoutError when it runs out (the
    thread is told to stop and, after a short grace, abandoned). Without a track limit `fn` runs in this thread."""
    if deadline.budget is None:
        return fn(deadline)
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(deadline)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True, name=f"track {deadline.what}")
    th.start()
    try:
        while th.is_alive():
            left = deadline.expires - time.monotonic()
            if left <= 0:
                deadline.expire()
                th.join(GRACE_S)
                if "value" in box:  # finished (and published) just as time ran out
                    return box["value"]
                raise TrackTimeoutError(deadline.message())
            th.join(min(left, 0.5))
    except BaseException:  # Ctrl-C: stop the work too, so its files are aborted
        deadline.expire()
        th.join(GRACE_S)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


class GuardedRunner:
    """A runner whose calls stop when their track expires and whose ONNX Runtime runs are limited in time."""

    def __init__(self, runner, deadline: Deadline):
        self.runner, self.deadline = runner, deadline

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, batch):
        deadline = self.deadline
        deadline.check()
        if not getattr(self.runner, "accepts_run_options", False):
            return self.runner(batch)
        import onnxruntime as ort
        ro = ort.RunOptions()
        fired = threading.Event()
        timer = None
        if deadline.limits.chunk_s:
            def stop() -> None:
                fired.set()
                ro.terminate = True
            timer = threading.Timer(deadline.limits.chunk_s, stop)
            timer.daemon = True
            timer.start()
        deadline._started_run(ro)
        try:
            return self.runner(batch, run_options=ro)
        except Exception:
            if fired.is_set():
                raise ChunkTimeoutError(f"an ONNX Runtime run of {len(batch)} chunk(s) took more than "
                                        f"{deadline.limits.chunk_s:g} s (--chunk-timeout)") from None
            deadline.check()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            deadline._ended_run(ro)


def guard(runners: Sequence, deadline: Deadline) -> list:
    """The runners of a bag (None where a sub-model is not needed), guarded by `deadline`."""
    return [None if r is None else GuardedRunner(r, deadline) for r in runners]
