"""The placement rule's choices: which engine, how many actors of how many threads (ripper_dist.placement)."""
from __future__ import annotations

import pytest

from ripper_dist.placement import ActorShape, actor_shape, choose_engine, cpu_threads


@pytest.mark.parametrize("kw, engine", [
    (dict(n_tracks=1), "local"),                      # one track here: Ray's start costs more than it spreads
    (dict(n_tracks=6), "local"),                      # a small folder on 2 cores: measured fastest in one process
    (dict(n_tracks=8), "local"),
    (dict(n_tracks=9), "ray"),                        # more than 4 tracks per core: Ray's actors
    (dict(n_tracks=6, cores=16), "ray"),              # a big machine: narrow actors
    (dict(n_tracks=28, cores=7), "local"),
    (dict(n_tracks=2, cores=8), "ray"),
    (dict(n_tracks=1, address="10.0.0.1:6379"), "ray"),
    (dict(n_tracks=1, shared_fs=False), "ray"),
    (dict(n_tracks=1, actors=2), "ray"),              # -j 2 on one track: its spans on two actors
    (dict(n_tracks=3, actors=2), "ray"),
    (dict(n_tracks=1, actors=1), "local"),
    (dict(n_tracks=50_000), "ray"),
])
def test_engine(kw, engine):
    args = dict(address=None, shared_fs=True, actors=None, cores=2) | kw
    assert choose_engine("auto", **args) == engine
    for explicit in ("local", "ray"):
        assert choose_engine(explicit, **args) == explicit


@pytest.mark.parametrize("cpus, threads, actors", [
    (1, 1, 1), (2, 1, 2), (4, 1, 4), (7, 1, 7),      # small nodes: one thread per actor
    (8, 2, 4), (12, 3, 4), (16, 4, 4), (64, 4, 16),  # big nodes: at most 4 threads, sessions bounded
])
def test_cpu_pool(cpus, threads, actors):
    shape = actor_shape(gpu_kind=None, cpus=cpus, gpus=0)
    assert (shape.threads, shape.actors, shape.device, shape.num_gpus) == (threads, actors, "cpu", 0)
    assert cpu_threads(cpus) == threads
    assert shape.actors * shape.threads <= cpus
    assert shape.num_cpus < shape.threads  # room left for planning/finishing tasks (0.25 CPU each)


def test_user_choices_win_and_gpus():
    assert actor_shape(gpu_kind=None, cpus=16, gpus=0, actors=3, threads=2) == ActorShape(3, 2, 1.5, 0, "cpu")
    assert actor_shape(gpu_kind=None, cpus=16, gpus=0, threads=8).actors == 2
    g = actor_shape(gpu_kind="cuda", cpus=32, gpus=8)
    assert (g.actors, g.num_gpus, g.num_cpus, g.threads, g.device) == (8, 1, 0.5, 1, "cuda:0")
    assert actor_shape(gpu_kind="tensorrt", cpus=8, gpus=2, actors=1).device == "tensorrt:0"
    with pytest.raises(RuntimeError, match="no GPUs"):
        actor_shape(gpu_kind="cuda", cpus=8, gpus=0)
    assert g.describe() == "8 GPU actors x 1 thread"
    assert actor_shape(gpu_kind=None, cpus=2, gpus=0).describe() == "2 CPU actors x 1 thread"


def test_usable_cores_is_the_affinity_mask():
    import os
    from ripper_dist.placement import usable_cores
    assert usable_cores() == len(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})  # a container's cpuset, or taskset
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
