"""jobs/isa_cap.py: a capped process really runs AVX2 kernels (torch's dispatch, ONNX Runtime's MLAS), an uncapped one
on the same machine does not, and the program's own SIGSEGV handler still sees real faults."""
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

#: What a process's runtimes chose: torch's dispatch level, and a digest of ONNX Runtime's Softmax output. MLAS has
#: AVX-512 Softmax kernels whose rounding differs from its AVX2 ones, so equal digests mean the same kernels ran.
#: (The kernel's arch_status, "AVX-512 state in use at the last context switch", cannot tell: state dirtied during
#: start-up, before the preloaded library runs, is inherited by every thread and lingers.)
PROBE = r"""
import hashlib, json
import numpy as np, onnxruntime as ort, torch
from onnx import TensorProto, helper
x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(x.shape)) for n in "xy"]
g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", info[:1], info[1:])
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
                         .SerializeToString(), so, providers=["CPUExecutionProvider"])
print(json.dumps({"torch": torch.backends.cpu.get_cpu_capability(),
                  "softmax": hashlib.sha256(s.run(None, {"x": x})[0].tobytes()).hexdigest()}))
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
    assert "CPUID answered with AVX-512 hidden" in capped.stderr and " 0x7" in capped.stderr, capped.stderr

    plain = [_probe({}) for _ in range(2)]
    assert all(p.returncode == 0 for p in plain), plain[0].stderr
    control = [json.loads(p.stdout.strip().splitlines()[-1]) for p in plain]
    assert control[0] == control[1]  # the digest is repeatable, so a difference is the kernels'
    if "avx512f" in CPU_FLAGS:
        assert control[0]["torch"].startswith("AVX512"), control
        assert seen["softmax"] != control[0]["softmax"]  # ONNX Runtime took other (AVX2) kernels under the cap
    else:
        assert seen == control[0]  # nothing to hide: the cap changes nothing


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
