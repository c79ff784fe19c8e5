"""jobs/isa_cap.py: a capped process really runs AVX2 kernels (torch's dispatch and ONNX Runtime's MLAS threads), an
uncapped one on the same machine does not, and the program's own SIGSEGV handler still sees real faults."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
sys.path.insert(0, str(JOBS))
import isa_cap  # noqa: E402

CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split())

#: Runs MatMuls in ONNX Runtime on two threads and reports, per thread, how long ago the kernel last saw it use
#: AVX-512 state (/proc/<pid>/task/<tid>/arch_status: -1 never). Everything before the MatMuls (start-up) is older
#: than `since_ms`, so a thread with a value below it used AVX-512 during the MatMuls.
PROBE = r"""
import glob, json, os, time
import numpy as np, onnxruntime as ort, torch
from onnx import TensorProto, helper
n = 512
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
    [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                         .SerializeToString(), so, providers=["CPUExecutionProvider"])
a = np.ones((n, n), np.float32)
time.sleep(0.3)
t0 = time.monotonic()
for _ in range(20):
    s.run(None, {"a": a, "b": a})
since_ms = (time.monotonic() - t0) * 1000
used = [int(open(f).read().split()[-1]) for f in glob.glob(f"/proc/{os.getpid()}/task/*/arch_status")]
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(), "since_ms": since_ms,
                  "avx512_during": [u for u in used if 0 <= u < since_ms]}))
"""


def _probe(extra_env: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", PROBE], env=env | extra_env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    return isa_cap.build(tmp_path_factory.mktemp("isa_cap"))


def test_capped_process_runs_avx2_kernels(lib):
    # Only the CPUID mask: no torch/oneDNN switch, so torch's answer comes from what CPUID says.
    capped = _probe({"LD_PRELOAD": str(lib), "ISA_CAP_REPORT": "1"})
    if "cpuid_fault" not in CPU_FLAGS:
        assert capped.returncode == 3 and "cannot fault on CPUID" in capped.stderr, capped.stderr
        return
    assert capped.returncode == 0, capped.stderr
    seen = json.loads(capped.stdout.strip().splitlines()[-1])
    assert seen["torch"] in ("AVX2", "DEFAULT"), seen
    assert seen["avx512_during"] == [], seen  # no ORT thread touched AVX-512 state during the MatMuls
    assert "CPUID answered with AVX-512 hidden" in capped.stderr and " 0x7" in capped.stderr, capped.stderr

    # The control: the same probe uncapped does use AVX-512 on a CPU that has it, so the check above can fail.
    plain = _probe({})
    assert plain.returncode == 0, plain.stderr
    control = json.loads(plain.stdout.strip().splitlines()[-1])
    if "avx512f" in CPU_FLAGS:
        assert control["torch"].startswith("AVX512"), control
        assert control["avx512_during"], control
    else:
        assert control["avx512_during"] == [], control


def test_real_faults_still_reach_the_programs_handler(lib):
    # Python's faulthandler installs its SIGSEGV handler after ours; a real fault must reach it, not loop or vanish.
    code = "import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)"
    res = subprocess.run([sys.executable, "-c", code], env=os.environ | {"LD_PRELOAD": str(lib)},
                         capture_output=True, text=True, timeout=60)
    if "cpuid_fault" not in CPU_FLAGS:
        assert res.returncode == 3
        return
    assert res.returncode == -11, (res.returncode, res.stderr)
    assert "Fatal Python error: Segmentation fault" in res.stderr, res.stderr


def test_cli_runs_a_command_capped_and_passes_its_exit_code(tmp_path):
    env = os.environ | {"RIPPER_DIST_BENCH_DIR": str(tmp_path)}
    ok = subprocess.run([sys.executable, str(JOBS / "isa_cap.py"), "--", sys.executable, "-c",
                         "import os, sys; sys.exit(0 if 'isa_cap' in os.environ['LD_PRELOAD'] else 5)"],
                        env=env, capture_output=True, text=True, timeout=60)
    want = 0 if "cpuid_fault" in CPU_FLAGS else 3
    assert ok.returncode == want, ok.stderr
    bad = subprocess.run([sys.executable, str(JOBS / "isa_cap.py")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "give a command" in bad.stderr
    missing = subprocess.run([sys.executable, str(JOBS / "isa_cap.py"), "--", "no-such-command-here"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == (127 if want == 0 else 3), missing.stderr
