"""`ripper-dist doctor`: what this machine can run, checked rather than assumed.

Each execution provider onnxruntime lists is started on a tiny graph (ORT lists CUDA in every onnxruntime-gpu
build, and falls back to the CPU silently when its libraries are missing), and a provider that does not start is
shown with the reason: the libraries the loader cannot find, or ORT's own message. GPUs are counted as NVML and as
Ray see them (Ray schedules GPU actors by its own count), and the CPU backends with the choice `--backend auto`
cached for this machine. With `--address`, the cluster's authentication too (a token required or not, and whether
this process's is accepted): a driver without it would only see `Failed to connect`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile

PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


def tiny_graph() -> bytes:
    """y = x * 2 over (1, 4) floats: enough for a provider to initialise and run."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@contextlib.contextmanager
def _captured_stderr():
    """ORT's C++ logs (the reason a provider failed) go to fd 2, not to sys.stderr: capture the descriptor."""
    buf = io.StringIO()
    with tempfile.TemporaryFile("w+") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read())


def check_provider(name: str) -> tuple[bool, str]:
    """(started, detail): a session on the tiny graph with `name` first; it started if ORT kept it and it ran."""
    import numpy as np
    import onnxruntime as ort
    from .gpu_libs import missing, preload
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT prints (Python) and logs (C++, fd 2) its reasons: both are collected and shortened into the report
    with _captured_stderr() as log, contextlib.redirect_stdout(io.StringIO()) as printed:
        if name != "CPUExecutionProvider":
            preload()
        try:
            sess = ort.InferenceSession(tiny_graph(), opts, providers=[name, "CPUExecutionProvider"])
            ok = sess.get_providers()[0] == name
            if ok:
                y = sess.run(None, {"x": np.ones((1, 4), np.float32)})[0]
                ok = bool(np.all(y == 2))
            err = ""
        except Exception as e:  # noqa: BLE001 - the reason is the result
            ok, err = False, f"{type(e).__name__}: {e}"
    if ok:
        return True, "started and ran"
    why = [err] if err else []
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        from .gpu_libs import EXTRA_FOR_MAJOR, TENSORRT_LIBS, cuda_libs, cuda_major
        libs = cuda_libs() + (TENSORRT_LIBS if name.startswith("Tensorrt") else ())
        gone = missing(libs)
        if gone:
            why.append("libraries not found: " + ", ".join(gone) + ' (pip install -e ".['
                       + EXTRA_FOR_MAJOR.get(cuda_major() or 13, "gpu") + ']"'
                       + (' or ".[tensorrt]"' if name.startswith("Tensorrt") else "") + ")")
    why += _reasons(log.getvalue() + printed.getvalue())
    return False, "; ".join(why) or "ORT fell back to the CPU without a message"


def _reasons(text: str, most: int = 2) -> list[str]:
    """ORT's failure lines without colours, timestamps and source locations, deduplicated."""
    import re
    out = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        if "rror" not in line and "ail" not in line:
            continue
        line = line.rsplit("] ", 1)[-1].strip()
        line = re.sub(r"^/\S+:\d+ ", "", line)
        if line and line not in out and not line.startswith(("Failed to load lib", "*")):  # listed above; banners
            out.append(line[:240])
    return out[:most]


def nvml_gpus() -> tuple[list[str], str]:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        return [], f"NVML unavailable: {e}"
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out.append(f"{i}: {name.decode() if isinstance(name, bytes) else name}, {mem.total / 2**30:.0f} GiB "
                   f"({mem.free / 2**30:.0f} free)")
    driver = pynvml.nvmlSystemGetDriverVersion()
    return out, f"driver {driver.decode() if isinstance(driver, bytes) else driver}"


def ray_gpus() -> str:
    """GPUs Ray would give this node (its own detection)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
        m = get_accelerator_manager_for_resource("GPU")
        n = m.get_current_node_num_accelerators()
        return f"this node: {n} GPUs" + (f" ({m.get_current_node_accelerator_type()})" if n else "")
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def ray_cluster(address: str) -> tuple[list[str], bool]:
    """(report lines, joined): the cluster's GPUs and workers' niceness, and its authentication (token required or
    not, and whether this process's token is accepted), probed before joining so that a refusal has its reason."""
    from .ray_connect import RayConnectError, connect, disconnect, probe
    try:
        auth = probe(address)
    except RayConnectError as e:
        return [f"Ray: cluster at {address}: {e}"], False
    lines = [f"Ray auth: {auth.describe()}"]
    if auth.problem():
        return [f"Ray: cluster at {address}: not joined (see the next line)"] + lines, False
    try:
        import ray
        connect(address, logging_level="ERROR")
        try:
            from .ray_pipeline import niceness_advice, workers_niceness
            nice = workers_niceness()
            advice = niceness_advice(nice)
            note = "" if nice is None else f"; workers at nice {nice}" + (f" ({advice})" if advice else "")
            return [f"Ray: cluster at {address}: {ray.cluster_resources().get('GPU', 0):g} GPUs{note}"] + lines, True
        finally:
            disconnect()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return [f"Ray: cluster at {address}: not joined ({type(e).__name__}: {e})"] + lines, False


def report(device: str | None = None, address: str | None = None, out=None) -> int:
    """Print the report; exit status 1 when `device` (cpu, cuda, tensorrt) cannot start or the cluster at `address`
    cannot be joined, else 0."""
    import onnxruntime as ort
    from .cpu_backend import _cache_file, _read, machine_key
    from .gpu_libs import cuda_version
    from .openvino_model import available
    out = out or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"onnxruntime {ort.__version__}" + (f" (built for CUDA {cuda_version()})" if cuda_version() else " (CPU build)"))
    results = {}
    for name in ort.get_available_providers():
        if name not in PROVIDERS:
            continue
        ok, detail = check_provider(name)
        results[PROVIDERS[name]] = ok
        p(f"  {name:<28} {'OK  ' if ok else 'FAIL'} {detail}")
    gpus, driver = nvml_gpus()
    p(f"NVML: {len(gpus)} GPUs, {driver}")
    for g in gpus:
        p(f"  {g}")
    if gpus:
        from .gpu_libs import driver_advice, driver_cuda_version
        p(f"  CUDA: {driver_advice(driver_cuda_version(), cuda_version())[1]}")
    joined = True
    if address:
        lines, joined = ray_cluster(address)
        for line in lines:
            p(line)
    else:
        p(f"Ray: {ray_gpus()}")
    p(f"CPU: {machine_key()}")
    if available():
        import openvino as ov
        p(f"  OpenVINO {ov.__version__.split('-')[0]}: devices {', '.join(ov.Core().available_devices)}")
    else:
        p("  OpenVINO: not installed (--backend auto uses ONNX Runtime)")
    cached = _read(_cache_file()).get(machine_key(), {})
    for key, entry in cached.items():
        p(f"  --backend auto for graph {key}: {entry['backend']} "
          f"({json.dumps({k: round(v, 3) for k, v in entry['seconds_per_chunk'].items()})} s per chunk)")
    if device:
        from .device import parse_device
        kind = parse_device(device)[0]
        if not results.get(kind):
            p(f"--device {device}: cannot start here")
            return 1
    return 0 if joined else 1
