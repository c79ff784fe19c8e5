"""`--precision bf16`: OpenVINO feeds the attention/feed-forward MatMuls bf16 on the CPU's bf16 units, the rest
stays f32; the graph is checked against fp32 once, its SDR lands in the metadata and the manifest, and a CPU
without bf16 units (or a GPU device) is refused in one line before anything is exported.

The accuracy tests need AVX512_BF16 or AMX (skipped elsewhere); the refusal is tested everywhere by injecting the
CPU flags, and against the real CPU where it lacks the units.
"""
import json

import numpy as np
import onnx
import pandas as pd
import pytest

from ripper_dist import cpu_backend, openvino_model
from ripper_dist.cli import main
from ripper_dist.export_cache import BF16_MIN_SDR_DB, bf16_graph
from ripper_dist.onnx_model import OnnxRunner, read_info
from ripper_dist.openvino_model import OpenVinoRunner, available, bf16_model, cpu_config
from ripper_export.bf16 import BF16_FP32_SCOPES, bf16_matmuls
from ripper_export.fp16 import music_like
from ripper_export.metrics import sdr_db
from ripper_export.onnx_export import export_demucs
from ripper_export.random_demucs import make_bag_repo, make_htdemucs_checkpoint
from ripper_export.random_roformer import make_roformer_checkpoint
from ripper_export.roformer_export import export_roformer
from upstream import write_tone

HAS_BF16 = available() and any(f in openvino_model.cpu_flags() for f in openvino_model.BF16_FLAGS)
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 units (AVX512_BF16/AMX) or no OpenVINO")
FAMILIES = ["htdemucs", "mel_band_roformer", "bs_roformer"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RIPPER_DIST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """fp32 graphs of small random models, each `model.onnx` in its own folder (as in the export cache)."""
    d = tmp_path_factory.mktemp("bf16")
    out = {}
    (d / "htdemucs").mkdir()
    export_demucs(make_htdemucs_checkpoint(d / "small.th", size="small"), d / "htdemucs" / "model.onnx")
    out["htdemucs"] = d / "htdemucs" / "model.onnx"
    for family in ("mel_band_roformer", "bs_roformer"):
        cfg, ckpt = make_roformer_checkpoint(d / f"{family}-ckpt", family)
        (d / family).mkdir()
        export_roformer(cfg, ckpt, d / family / "model.onnx", family=family, check_reference=False)
        out[family] = d / family / "model.onnx"
    return out


def _chunk(path, seed):
    info = read_info(path)
    return music_like(1, info.channels, info.chunk_samples, sample_rate=info.sample_rate, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matmuls_leave_the_sensitive_parts_fp32(graphs, family):
    m = onnx.load(str(graphs[family]))
    names = set(bf16_matmuls(m))
    producer = {o: n for n in m.graph.node for o in n.output}
    chosen = [producer[o] for o in names]
    assert chosen and all(n.op_type == "MatMul" for n in chosen)
    assert not any("/stft/" in n.name or "/istft/" in n.name for n in chosen)  # the real DFT stays fp32
    assert not any(s in n.name for n in chosen for s in BF16_FP32_SCOPES)
    assert not any(n.op_type in ("Conv", "ConvTranspose", "Softmax") for n in chosen)


@needs_bf16
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_graph_is_checked_and_above_the_floor(graphs, family):
    path = bf16_graph(graphs[family])
    meta = read_info(path).raw
    assert path.name == "model-bf16.onnx" and meta["ripper.precision"] == "bf16"
    assert BF16_MIN_SDR_DB <= float(meta["ripper.bf16_sdr_db"]) < 120  # really bf16: fp32 would agree to ~inf
    names = json.loads(meta["ripper.bf16_matmuls"])
    # on another chunk too, and batched: OpenVINO bf16 against ONNX Runtime fp32
    mix = np.concatenate([_chunk(graphs[family], 2), _chunk(graphs[family], 3)])
    runner = OpenVinoRunner(path, threads=2)
    assert runner.backend == "openvino" and runner.precision == "bf16"
    sdr = sdr_db(OnnxRunner(graphs[family], "cpu", 2)(mix), runner(mix))
    assert BF16_MIN_SDR_DB <= sdr < 120, sdr
    # the chosen MatMuls really run on bf16 kernels, and no norm/reduction/softmax does
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(bf16_model(core, path.read_bytes(), names), "CPU", cpu_config(2))
    ops = compiled.get_runtime_model().get_ordered_ops()
    bf16_types = {op.get_rt_info()["layerType"].astype(str) for op in ops
                  if op.get_rt_info()["runtimePrecision"].astype(str) == "bf16"}
    assert bf16_types & {"FullyConnected", "MatMul"}
    assert not bf16_types & {"MVN", "Reduce", "Softmax", "Convolution", "Deconvolution", "NormalizeL2"}


def test_refusal_without_bf16_units_is_one_line_before_any_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(openvino_model, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "no bf16 units" in openvino_model.bf16_problem("cpu")
    assert openvino_model.bf16_problem("cpu", {"amx_bf16"}) is None or not available()
    song = write_tone(tmp_path / "in" / "song.wav", 1.0)
    for extra in ([], ["--device", "cuda"]):
        code = main(["separate", "--no-progress", str(song), "-o", str(tmp_path / "out"), "--precision", "bf16",
                     *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].count("--precision") == 1, err
        assert ("no bf16 units" in err[0]) if not extra else ("CPU (OpenVINO) only" in err[0])
    assert not (tmp_path / "cache" / "onnx").exists()  # refused before any export
    assert main(["export", "-n", "htdemucs", "--precision", "bf16"]) == 2
    assert "no bf16 units" in capsys.readouterr().err


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16 units: the injected refusal above covers the message")
def test_this_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--precision: "):
        from ripper_dist.options import SeparateOptions
        SeparateOptions(inputs=(str(tmp_path),), precision="bf16")


@pytest.mark.skipif(not available(), reason="OpenVINO is not installed")
def test_bf16_refuses_onnx_runtime_backend(monkeypatch):
    from ripper_dist.options import SeparateOptions
    monkeypatch.setattr(openvino_model, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert SeparateOptions(precision="bf16").precision == "bf16"  # bf16 units: accepted
    with pytest.raises(ValueError, match="--backend: ort cannot run bf16"):
        SeparateOptions(precision="bf16", backend="ort")


@needs_bf16
def test_separate_bf16_row_says_precision_sdr_and_backend(tmp_path):
    repo = make_bag_repo(tmp_path / "repo", "tiny", 1, size="small")
    song = write_tone(tmp_path / "in" / "song.wav", 2.0, seed=3)
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["separate", "--no-progress", "--engine", "local", "--repo", str(repo), "-n", "tiny", str(song),
                     "-o", str(out), "--precision", precision]) == 0
        rows[precision] = pd.read_parquet(out / "metadata.parquet").iloc[0]
    bf, fp = rows["bf16"], rows["fp32"]
    assert bf.status == "done" and bf.precision == "bf16" and bf.backend == "openvino"
    assert bf.precision_sdr_db >= BF16_MIN_SDR_DB and pd.isna(fp.precision_sdr_db)
    assert bf.options_key != fp.options_key  # part of the resume key
    # the bf16 graph is made once: a second run (another folder) finds it in the cache
    assert len(list((tmp_path / "cache" / "onnx").rglob("model-bf16.onnx"))) == 1


@needs_bf16
def test_runner_refuses_a_bf16_graph_on_a_cpu_without_the_units(graphs, monkeypatch):
    """A Ray node unlike the driver that checked the options: its actor refuses instead of emulating bf16."""
    path = bf16_graph(graphs["mel_band_roformer"])
    monkeypatch.setattr(openvino_model, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(ValueError, match="bf16 graph: this CPU has no bf16 units"):
        OpenVinoRunner(path)
    with pytest.raises(ValueError, match="not --device cuda"):
        cpu_backend.make_runners([path], "cuda:0", 1, "auto")
