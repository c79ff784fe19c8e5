"""Which runtime runs a graph on the CPU: ONNX Runtime or OpenVINO, both reading the same ONNX file.

Neither wins everywhere (kernels differ per instruction set and per graph), so `--backend auto` (the default)
measures both once per machine and graph and remembers the answer in `backends.json` in the user cache. ONNX
Runtime stays unless OpenVINO is at least `MARGIN` faster: a switch for noise would make outputs differ between
machines for nothing. GPU devices always use ONNX Runtime (CUDA/TensorRT providers).
"""
from __future__ import annotations

import contextlib
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "openvino")
#: OpenVINO must be this much faster (time ratio) for `auto` to choose it.
MARGIN = 0.10
#: timed runs of each backend, after one untimed warm-up each (the minimum counts)
TIMED_RUNS = 2


def machine_key() -> str:
    """CPU model, the instruction-set flags that pick kernels, cores and runtime versions: a cached choice is only
    reused where all of these match (a cluster's nodes differ; an upgrade changes kernels). Not the threads of the
    session: one machine makes one choice, so the local engine and Ray actors (fewer threads each) on it write the
    same bytes."""
    import onnxruntime
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                           "amx_tile", "avx_vnni"})
    versions = [f"ort{onnxruntime.__version__}"]
    with contextlib.suppress(ImportError):
        import openvino
        versions.append(f"ov{openvino.__version__.split('-')[0]}")
    from .placement import usable_cores
    return "|".join([cpu, ",".join(isa), f"{usable_cores()}cores", *versions])


def graph_key(graph: bytes | str | Path) -> str:
    """The graph's architecture, not its weights (`onnx_metadata.architecture_key`, read without parsing them): speed
    depends on it only, so a bag's members (and any checkpoint of the same model) share one measurement, and
    however the graphs of a job are grouped (local engine per model, Ray actor over all) the choice is the same."""
    from .onnx_metadata import architecture_key
    return architecture_key(graph)


def _cache_file() -> Path:
    from .sources import cache_dir
    return cache_dir() / "backends.json"


@contextlib.contextmanager
def _locked(path: Path):
    """One measurer per machine at a time (Ray actors start together; a measurement under contention is wrong)."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def choose(times: dict[str, float], margin: float = MARGIN) -> str:
    """The backend to use from measured seconds per chunk: OpenVINO only when faster by more than `margin`."""
    ort_s, ov_s = times.get("ort"), times.get("openvino")
    if ort_s is None or ov_s is None:
        return "ort" if ov_s is None else "openvino"
    return "openvino" if ov_s < (1 - margin) * ort_s else "ort"


def make_runner(backend: str, graph: bytes | str | Path, device: str = "cpu", threads: int | None = None, **kw):
    """A runner of a concrete backend (`ort` or `openvino`)."""
    if backend == "openvino":
        from .openvino_model import OpenVinoRunner
        return OpenVinoRunner(graph, device, threads, max_batch=kw.get("max_batch"))
    from .onnx_model import OnnxRunner
    return OnnxRunner(graph, device, threads, **kw)


def measure(graph: bytes | str | Path, threads: int | None, **kw) -> tuple[dict[str, float], dict]:
    """Seconds per chunk (batch 1) of each available backend; returns (times, {backend: runner} holding the chosen
    backend's runner when it is the one still built, else nothing).

    One backend is alive at a time, so a machine's first run peaks no higher than its later ones: both sessions of
    the RoFormer vocals graph at once would hold two copies of its 0.9 GB of weights and two arenas. ONNX Runtime is
    measured last, so when it wins (it is kept unless OpenVINO is `MARGIN` faster) its runner is the one in hand;
    when OpenVINO wins, it is built again (once per machine and graph)."""
    import gc

    from .error_log import one_line
    from .onnx_model import release_freed_heap, read_info
    from .openvino_model import available
    info = read_info(graph)
    x = (0.1 * np.random.default_rng(0).standard_normal((1, info.channels, info.chunk_samples))).astype(np.float32)
    times: dict[str, float] = {}
    runner = None
    for name in (["openvino"] if available() else []) + ["ort"]:
        runner = None
        gc.collect()
        release_freed_heap()  # the previous backend's memory leaves before the next one is built
        try:
            runner = make_runner(name, graph, "cpu", threads,
                                 **(kw if name == "ort" else {"max_batch": kw.get("max_batch")}))
            runner(x)  # warm-up: first-run allocations, OpenVINO's compilation for this shape
        except Exception as e:  # noqa: BLE001 - ONNX Runtime is the reference: its failure is the job's
            if name == "ort":
                raise
            runner = None
            print(f"--backend auto: OpenVINO cannot run this graph ({one_line(e)}); using ONNX Runtime",
                  file=sys.stderr, flush=True)
            continue
        runs = []
        for _ in range(TIMED_RUNS):
            t0 = time.perf_counter()
            runner(x)
            runs.append(time.perf_counter() - t0)
        times[name] = min(runs)
    return times, ({"ort": runner} if choose(times) == "ort" else {})


def resolve(backend: str, device: str, graph: bytes | str | Path, threads: int | None, **kw) -> tuple[str, object | None]:
    """(concrete backend, a runner for `graph` already built while measuring, or None)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: use one of {BACKENDS}")
    if device != "cpu":
        if backend == "openvino":
            raise ValueError(f"--backend openvino runs on the CPU only, not --device {device}")
        return "ort", None
    if backend != "auto":
        if backend == "openvino":
            from .openvino_model import available
            if not available():
                raise RuntimeError('--backend openvino: the openvino package is not installed '
                                   '(pip install -e ".[openvino]")')
        return backend, None
    from .openvino_model import available
    if not available():
        return "ort", None
    mkey, gkey = machine_key(), graph_key(graph)
    path = _cache_file()
    with _locked(path):
        known = _read(path).get(mkey, {}).get(gkey)
        if known:
            return known["backend"], None
        print("--backend auto: timing ONNX Runtime and OpenVINO on this graph (once per machine and model)",
              file=sys.stderr, flush=True)
        times, runners = measure(graph, threads, **kw)
        chosen = choose(times)
        print(f"--backend auto: {chosen} ({', '.join(f'{k} {v:.2f} s' for k, v in times.items())} per chunk; "
              f"cached in {path})", file=sys.stderr, flush=True)
        data = _read(path)
        data.setdefault(mkey, {})[gkey] = {"backend": chosen, "seconds_per_chunk": times, "threads": threads,
                                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        from .atomic import write_text
        write_text(path, json.dumps(data, indent=1, sort_keys=True))
    log.info("backend auto: %s (seconds per chunk %s)", chosen, times)
    return chosen, runners.get(chosen)


def backend_of(runners) -> str:
    """The backend name of built runners (for the metadata row): `ort`, `openvino`, or '' for injected runners."""
    return next((getattr(r, "backend", "") for r in runners if r is not None and hasattr(r, "backend")), "")


def make_runners(graphs: list, device: str, threads: int | None, backend: str = "auto", **kw) -> list:
    """One runner per graph (None stays None: a sub-model no selected stem needs). `auto` is resolved per graph
    architecture (`graph_key`): a bag's members share one measurement, an ensemble's Demucs and RoFormer members
    get their own."""
    out = []
    for g in graphs:
        if g is None:
            out.append(None)
            continue
        from .onnx_model import read_info
        if read_info(g).raw.get("ripper.precision") == "bf16":  # only OpenVINO implements it (openvino_model):
            if device != "cpu":                                     # it is implied (options refuse --backend ort)
                raise ValueError(f"a bf16 graph runs on OpenVINO on the CPU, not --device {device}")
            out.append(make_runner("openvino", g, device, threads, max_batch=kw.get("max_batch")))
            continue
        concrete, ready = resolve(backend, device, g, threads, **kw)  # a file stays a file: no second copy held
        if ready is not None:
            out.append(ready)
        elif concrete == "openvino":
            out.append(make_runner("openvino", g, device, threads, max_batch=kw.get("max_batch")))
        else:
            out.append(make_runner("ort", g, device, threads, **kw))
    return out
