"""Where a job's model calls run: this process (the local engine) or Ray actors, and each actor's shape.

Pure functions of what the job is and what the node or cluster has, shared by `separator` (which engine) and
`ray_pipeline` (which actors), so the rule is read and tested in one place. The choices are measured on a node as a
user runs it (`python jobs/bench.py folder`, docs/BENCHMARKS.md "A folder by default"), not assumed:

- one track on this machine runs locally: Ray's start, its actors and their sessions (5 to 8 s on two cores) cost
  more than spreading its chunks gains; so does a small folder (up to 4 tracks per core) on a machine of up to 7
  cores (6 x 20 s on 2 cores: local 72.4 s, Ray's two 1-thread actors 81.0 s, `demucs -j 2` 81.8 s);
- a bigger folder, a bigger machine, a cluster address, `-j N` or `--no-shared-fs` run on Ray;
- on the CPU, narrow actors (1 ORT thread each up to 7 cores) beat one wide session: an op parallelised over every
  core waits for its slowest thread, and any other work on the node (decoding, encoding, planning) is such a thread;
  from 8 cores on, actors of up to 4 threads keep the number of sessions (memory: a weight copy each) sane;
- on GPUs, one actor per GPU, half a logical CPU each so the CPU work around it still finds room.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

NARROW_UP_TO_CORES = 7  # up to this many CPUs per node, actors of one thread
MAX_THREADS_PER_ACTOR = 4
LOCAL_TRACKS_PER_CORE = 4  # auto: a folder of up to this many tracks per core on a small machine runs locally
ACTOR_CPU_SHARE = 0.75  # logical CPUs per ORT thread: planning and finishing tasks (0.25 CPU) always find room


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's cpuset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ActorShape:
    """The Ray actor pool: `actors` sessions of `threads` ORT threads, each reserving num_cpus/num_gpus."""

    actors: int
    threads: int
    num_cpus: float
    num_gpus: float
    device: str  # what each actor's session runs on (a GPU actor sees its one GPU as index 0)

    def describe(self) -> str:
        what = "GPU" if self.num_gpus else "CPU"
        return (f"{self.actors} {what} actor{'s' if self.actors != 1 else ''} x {self.threads} "
                f"thread{'s' if self.threads != 1 else ''}")


def choose_engine(engine: str, *, n_tracks: int, address: str | None, shared_fs: bool, actors: int | None,
                  cores: int) -> str:
    """`--engine auto` -> "local" or "ray" (an explicit engine is kept). cores: what this machine gives the job."""
    if engine != "auto":
        return engine
    parallel = actors is not None and actors > 1  # -j N: N workers, even on one track (its spans)
    if address or not shared_fs or parallel:
        return "ray"
    if n_tracks <= 1:
        return "local"
    # A small folder on a small machine: one session over every core ran it fastest (6 x 20 s on 2 cores: 72.4 s,
    # against 81.0 s for two 1-thread actors, whose gain does not pay for Ray's start); an archive gets Ray's
    # actors (a crash costs one actor, decoding and encoding overlap the model), a big node its narrow actors.
    return "local" if cores <= NARROW_UP_TO_CORES and n_tracks <= LOCAL_TRACKS_PER_CORE * cores else "ray"


def cpu_threads(cpus: int) -> int:
    """ORT threads per CPU actor on a node of `cpus` logical CPUs."""
    return 1 if cpus <= NARROW_UP_TO_CORES else max(1, min(MAX_THREADS_PER_ACTOR, cpus // 4))


def actor_shape(*, gpu_kind: str | None, cpus: int, gpus: int, actors: int | None = None,
                threads: int | None = None) -> ActorShape:
    """The pool for a cluster with `cpus` logical CPUs and `gpus` GPUs. gpu_kind: "cuda"/"tensorrt" for a GPU job,
    None for the CPU; actors/threads: the user's `-j`/`--threads`, which win."""
    if gpu_kind is not None:
        if gpus < 1:
            raise RuntimeError(f"--device {gpu_kind}: the Ray cluster has no GPUs")
        return ActorShape(actors or gpus, threads or 1, 0.5, 1, f"{gpu_kind}:0")  # Ray sets CUDA_VISIBLE_DEVICES
    threads = threads or cpu_threads(cpus)
    return ActorShape(actors or max(1, cpus // threads), threads, ACTOR_CPU_SHARE * threads, 0, "cpu")
