"""`ripper-dist doctor`: providers are started, not just listed; a failure comes with its reason."""
import re

import onnxruntime as ort

from ripper_dist import doctor
from ripper_dist.cli import main


def test_cpu_provider_starts_and_runs():
    assert doctor.check_provider("CPUExecutionProvider") == (True, "started and ran")


def test_reasons_are_short_and_clean():
    text = ("\x1b[1;31m2026-12-05 08:37:45.5 [E:onnxruntime:Default, provider_bridge_ort.cc:2430 operator()] "
            "/src/provider_bridge_ort.cc:2043 onnxruntime::Provider& Get() [ONNXRuntimeError] : 1 : FAIL : "
            "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open\x1b[m\n"
            "Failed to load libcublas.so.13: no such file\n*************** EP Error ***************\nall fine here\n")
    (reason,) = doctor._reasons(text)
    assert reason.startswith(": 1 : FAIL : Failed to load library") and "\x1b" not in reason


def test_report_every_provider_with_a_verdict(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = {m.group(1): (m.group(2), m.group(3)) for m in
             re.finditer(r"^  (\w+ExecutionProvider)\s+(OK  |FAIL) (.*)$", out, re.M)}
    wanted = [p for p in ort.get_available_providers() if p in doctor.PROVIDERS]
    assert sorted(lines) == sorted(wanted) and lines["CPUExecutionProvider"][0] == "OK  "
    for verdict, detail in lines.values():
        assert detail.strip() and (verdict == "OK  ") == (detail == "started and ran")
    assert re.search(r"^NVML: \d+ GPUs", out, re.M) and re.search(r"^Ray: this node: \d+ GPUs", out, re.M)
    assert "CPU: " in out and "OpenVINO" in out
    # --device: the exit status follows the verdict of that provider
    assert main(["doctor", "-d", "cpu"]) == 0
    if "CUDAExecutionProvider" in lines:
        capsys.readouterr()
        assert main(["doctor", "-d", "cuda"]) == (0 if lines["CUDAExecutionProvider"][0] == "OK  " else 1)
        if lines["CUDAExecutionProvider"][0] == "FAIL":
            assert "--device cuda: cannot start here" in capsys.readouterr().out


def test_cluster_address_reports_gpus_and_workers_niceness(capsys):
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2})  # Ray's default nice 15
    try:
        assert main(["doctor", "--address", cluster.address]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Ray: "))
        assert f"cluster at {cluster.address}: 2 GPUs; workers at nice 15" in line and "RAY_worker_niceness=0" in line
    finally:
        ray.shutdown()
        cluster.shutdown()
