"""GPU installs for CUDA 13 (`gpu`) and CUDA 12 (`gpu-cu12`) drivers: the extras pin consistent builds, the runtime
libraries of either build are found in the wheels, and `doctor` names the extra a driver needs (decided from
injected versions: this machine has no GPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from ripper_dist import doctor, gpu_libs

import tomllib  # noqa: E402  (Python 3.11+, as CI runs)
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
LINUX_X86 = {"platform_system": "Linux", "platform_machine": "x86_64"}


def _extras():
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def _req(extra: str, name: str) -> Requirement:
    (req,) = [Requirement(r) for r in _extras()[extra] if Requirement(r).name == name]
    return req


def test_extras_pin_one_build_each_with_its_own_cuda_wheels():
    extras = _extras()
    assert set(gpu_libs.EXTRA_FOR_MAJOR.values()) <= set(extras)
    cu13, cu12 = _req("gpu", "onnxruntime-gpu"), _req("gpu-cu12", "onnxruntime-gpu")
    # 1.27 on are CUDA 13 builds, up to 1.26 CUDA 12 (PyPI metadata of their `cuda` extra): disjoint pins
    assert Version("1.31.1") in cu13.specifier and Version("1.26.0") not in cu13.specifier
    assert Version("1.26.0") in cu12.specifier and Version("1.27.0") not in cu12.specifier
    assert Version("1.22.0") in cu12.specifier and Version("1.21.1") not in cu12.specifier  # cuDNN 9 builds only
    assert {"cuda", "cudnn"} <= cu12.extras and {"cuda", "cudnn"} <= cu13.extras
    assert str(_req("gpu-cu12", "nvidia-cublas-cu12").specifier) in ("<13,>=12", ">=12,<13")
    assert Version("13.1") in _req("gpu", "nvidia-cublas").specifier
    # Linux x86-64 only (no onnxruntime-gpu wheels elsewhere), like the base dependency
    for extra in ("gpu", "gpu-cu12"):
        for r in map(Requirement, extras[extra]):
            assert r.marker is not None and r.marker.evaluate(LINUX_X86)
            assert not r.marker.evaluate({"platform_system": "Darwin", "platform_machine": "arm64"})


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def test_cu12_extra_resolves_to_a_cuda12_build():
    """pip resolves the `gpu-cu12` pins (metadata only, nothing installed) to an onnxruntime-gpu whose `cuda` extra
    brings CUDA 12 wheels, and the `gpu` pins to one bringing CUDA 13 wheels."""
    if _pip("index", "versions", "onnxruntime-gpu").returncode != 0:
        pytest.skip("no package index reachable")
    for extra, suffix in (("gpu-cu12", "-cu12"), ("gpu", "")):
        spec = str(_req(extra, "onnxruntime-gpu")).split(";")[0]
        res = _pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--report", "-", spec)
        assert res.returncode == 0, res.stderr[-2000:]
        (item,) = json.loads(res.stdout)["install"]
        runtime = [d for d in item["metadata"]["requires_dist"] if d.startswith("nvidia-cuda-runtime")]
        assert runtime, item["metadata"]["version"]
        name = Requirement(runtime[0]).name
        if suffix:
            assert name.endswith("-cu12") and Version(item["metadata"]["version"]) < Version("1.27")
        else:
            assert not name.endswith("-cu12") and Version(item["metadata"]["version"]) >= Version("1.31")


@pytest.mark.parametrize("driver, built, extra, says", [
    ((12, 4), "13.0", "gpu-cu12", 'newer than the driver\'s: pip install -e ".[gpu-cu12]"'),
    ((12, 8), "12.8", "gpu-cu12", "fits"),
    ((13, 0), "13.0", "gpu", "fits"),
    ((13, 1), "12.8", "gpu", 'works with it; pip install -e ".[gpu]"'),
    ((12, 2), None, "gpu-cu12", 'CPU build: pip install -e ".[gpu-cu12]"'),
    ((11, 8), "13.0", None, "upgrade the NVIDIA driver"),
    (None, "13.0", None, "no NVIDIA driver"),
])
def test_driver_decides_the_extra(driver, built, extra, says):
    got, line = gpu_libs.driver_advice(driver, built)
    assert got == extra and says in line, line


def test_libraries_follow_the_build_and_are_found_in_either_wheel_layout(tmp_path):
    assert all(n.endswith((".so.12", ".so.10", ".so.11", ".so.9")) for n in gpu_libs.cuda_libs(12))
    assert "libcudart.so.13" in gpu_libs.cuda_libs(13) and "libcudart.so.12" in gpu_libs.cuda_libs(12)
    assert gpu_libs.cuda_major("12.8") == 12 and gpu_libs.cuda_major("") is None
    files = ["cuda_runtime/lib/libcudart.so.12", "cublas/lib/libcublas.so.12", "cublas/lib/libcublasLt.so.12",
             "cu13/lib/libcudart.so.13", "cudnn/lib/libcudnn.so.9"]
    for f in files:
        (tmp_path / "nvidia" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nvidia" / f).write_bytes(b"")
    found = gpu_libs.wheel_libs(gpu_libs.cuda_libs(12), roots=[tmp_path / "nvidia"])
    assert set(found) == {"libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12", "libcudnn.so.9"}
    assert found["libcudart.so.12"].parent.name == "lib"
    found13 = gpu_libs.wheel_libs(gpu_libs.cuda_libs(13), roots=[tmp_path / "nvidia"])
    assert set(found13) == {"libcudart.so.13", "libcudnn.so.9"}


def test_doctor_names_the_extra_for_the_driver(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "nvml_gpus", lambda: (["0: Some GPU, 24 GiB (23 free)"], "driver 550.54"))
    monkeypatch.setattr(gpu_libs, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(gpu_libs, "cuda_version", lambda: "13.0")
    monkeypatch.setattr(doctor, "check_provider", lambda name: (True, "started and ran"))
    assert doctor.report() == 0
    out = capsys.readouterr().out
    assert "driver supports CUDA 12.4: extra `gpu-cu12`" in out and "built for CUDA 13.0" in out
