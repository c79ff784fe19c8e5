"""Run a process as if the CPU had AVX2 and no AVX-512: every runtime's AVX2 kernels, measured on an AVX-512 machine.

    python jobs/isa_cap.py [--check] -- COMMAND [ARG...]

torch and oneDNN (so OpenVINO) have switches that cap their kernels; ONNX Runtime's MLAS has none and reads CPUID
itself, so `isa_cap.c` (built here with the system C compiler, once per source version) hides the AVX-512 bits of
CPUID from the whole process through Linux's CPUID faulting. `env()` is what `jobs/bench.py --isa avx2` gives its
children; `--check` prints what a capped Python sees (torch's dispatch level) and which CPUID leaves it asked.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("isa_cap.c")

#: Caps that runtimes offer themselves, set beside the CPUID mask so each also says AVX2 in its own logs.
#: glibc picks its string functions at start-up, before the preloaded library runs, so it gets its own tunable.
SWITCHES = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL",
}


def build(cache: Path | None = None) -> Path:
    """Compile isa_cap.c into a shared library (cached by the source's hash) and return its path."""
    src = SOURCE.read_bytes()
    cache = Path(cache or os.environ.get("RIPPER_DIST_BENCH_DIR", Path(tempfile.gettempdir()) / "ripper-dist-bench"))
    lib = cache / f"isa_cap-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"isa_cap: no C compiler ({cc}); install gcc or set CC") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"isa_cap: {cc} failed:\n{e.stderr}") from None
    os.replace(tmp, lib)
    return lib


def env(cache: Path | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment variables that run a child process with AVX2 kernels only (to merge into its environment)."""
    base = os.environ if base is None else base
    preload = " ".join(p for p in (str(build(cache)), base.get("LD_PRELOAD", "")) if p)
    return {**SWITCHES, "LD_PRELOAD": preload}


CHECK = r"""
import json, onnxruntime
out = {"onnxruntime": onnxruntime.__version__}
try:
    import torch
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
except ImportError:
    pass
flags = set(open("/proc/cpuinfo").read().split())
out["kernel_says_avx512f"] = "avx512f" in flags
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="print what a capped Python sees, with the CPUID report")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run capped (after --)")
    args = ap.parse_args(argv)
    cmd = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    if args.check:
        cmd = [sys.executable, "-c", CHECK]
    if not cmd:
        ap.error("give a command after --, or --check")
    child_env = os.environ | env() | ({"ISA_CAP_REPORT": "1"} if args.check else {})
    try:
        return subprocess.run(cmd, env=child_env).returncode
    except FileNotFoundError:
        print(f"isa_cap: {cmd[0]}: command not found", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
