"""Exported ONNX graphs on disk, keyed by checkpoint sha256 and export options: the second run exports nothing.

A cache hit needs no torch. On a miss this module imports `ripper_export` (torch + demucs), which exports, checks
parity against upstream and embeds the metadata; the file appears atomically, so a crash never leaves a half graph.

A cached graph is trusted only with its record (`model.onnx.verify.json`: size and sha256 of the graph and its
external data, written after the export succeeded) and only when the files still match it: a graph truncated or
damaged later, or one without a record (a half-finished export), is exported again (converted again for fp16), or,
where that is impossible, the error names the folder to delete. One exporter at a time per cache entry (a lock file
in its folder); the next finds the finished graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path
from .hashing import sha256_file
from .sources import DemucsSource, cache_dir

#: Bump when the graph exported for the same checkpoint and options changes (cached graphs are then re-exported).
#: 2: factorised real DFT for the STFT/ISTFT.
from ripper_export.version import EXPORT_VERSION, ROFORMER_GRAPH_VERSION  # export side owns them; no torch
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16", "bf16")
#: An fp16 graph further than this from its fp32 graph (SDR on a music-like chunk, ONNX Runtime CPU) is refused.
#: Measured: 64-69 dB on htdemucs (small and released size) and small RoFormers; the naive conversion gives ~1 dB.
FP16_MIN_SDR_DB = 40.0
#: The same floor for a bf16 graph (OpenVINO, MatMuls with bf16 inputs) against the fp32 graph on ONNX Runtime.
#: Measured: 65.6 dB released-size htdemucs, 46.1 dB Mel-Band RoFormer at the vocals configuration, 49-71 dB on the
#: small random models (ripper_export.bf16, docs/BENCHMARKS.md).
BF16_MIN_SDR_DB = 40.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    """What the runtime needs: graph files plus bag weights (None = all ones)."""
    name: str
    family: str
    onnx_paths: tuple[Path, ...]
    weights: list[list[float]] | None


class ExportUnavailable(RuntimeError):
    """The export side (torch) is not installed and the graph is not cached."""


def _export_side(what: str):
    """Import `ripper_export.<what>`; without torch, one line that says what to install (or how to do without)."""
    import importlib
    try:
        return importlib.import_module(f"ripper_export.{what}")
    except ImportError as e:
        raise ExportUnavailable(
            f"exporting this checkpoint to ONNX (first use) needs {e.name or 'torch'}, which is not installed: "
            "pip install 'ripper-dist[export]' (or torch>=2.1 and demucs), or separate with an exported graph: "
            "--onnx FILE.onnx (from `ripper-dist export -o DIR` on a machine with torch)") from None


VERIFY_SUFFIX = ".verify.json"


def _graph_files(graph: Path) -> list[Path]:
    data = graph.with_name(graph.name + ".data")  # RoFormer graphs over the protobuf limit keep their weights there
    return [graph] + ([data] if data.exists() else [])


def record_graph(graph: Path) -> None:
    """Write the record of a finished graph (after it and its external data are in place)."""
    from .atomic import write_text
    files = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sha256_file(p)}
             for p in _graph_files(graph)}
    write_text(graph.with_name(graph.name + VERIFY_SUFFIX), json.dumps({"files": files}, indent=1))


def graph_problem(graph: Path) -> str | None:
    """Why the cached `graph` cannot be trusted (None: it matches its record). Size and mtime as recorded stand for
    an unchanged file (hashing a 170 MB graph costs about a second on every run); otherwise the sha256 decides (a
    cache copied elsewhere keeps working, a damaged one does not)."""
    if not graph.exists():
        return "missing"
    try:
        files = json.loads(graph.with_name(graph.name + VERIFY_SUFFIX).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no export record (an export that did not finish)"
    for name, want in files.items():
        p = graph.with_name(name)
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} is {size} bytes, {want['size']} when exported"
        if p.stat().st_mtime_ns != want.get("mtime_ns") and sha256_file(p) != want["sha256"]:
            return f"{name} differs from the exported file (sha256)"
    return None


@contextlib.contextmanager
def _entry_lock(folder: Path):
    """Exclusive lock of one cache entry (two commands exporting the same model: the second waits, then finds it)."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_entry(folder: Path, graph: Path) -> None:
    """Remove a graph that failed verification, its record and data, and temporary files of killed exports."""
    for p in folder.iterdir():
        if p.name.startswith(graph.name) or (p.name.startswith(".") and p.name.endswith(".tmp")) \
                or p.name.endswith(".onnx.tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def cached_graph(graph: Path, make) -> Path:
    """`graph` verified against its record, or made by `make(graph)` (under the entry's lock) and recorded.

    A graph that fails verification is removed and made again; if making it is impossible here (no torch), the error
    says which folder to delete."""
    if graph_problem(graph) is None:
        log.info("export cache hit: %s", graph)
        return graph
    with _entry_lock(graph.parent):
        problem = graph_problem(graph)
        if problem is None:  # another command finished it while this one waited
            return graph
        if problem != "missing":
            print(f"cached graph {graph}: {problem}; making it again", file=sys.stderr)
        _clear_entry(graph.parent, graph)
        try:
            make(graph)
        except ImportError as e:
            raise RuntimeError(f"{graph.parent}: cached graph unusable ({problem}) and it cannot be exported here "
                               f"({e}); install the export extra or delete {graph.parent} and rerun") from None
        record_graph(graph)
    return graph


def _key(sha256: str, options: dict) -> str:
    opts = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return f"{sha256[:16]}-{opts}"


def onnx_root() -> Path:
    return cache_dir() / "onnx"


def export_demucs_member(checkpoint: Path, *, segment: float | None, opset: int = DEFAULT_OPSET,
                         out_root: Path | None = None, explain: bool = False) -> Path:
    """Path of the cached graph for one checkpoint, exporting it on a miss (explain: the explanation graph, with
    the time- and spectral-branch terms as extra outputs)."""
    sha = sha256_file(checkpoint)
    options = {"family": "htdemucs", "segment": segment, "opset": opset, "export_version": EXPORT_VERSION}
    if explain:
        options["explain"] = True
    out = (out_root or onnx_root()) / "htdemucs" / _key(sha, options) / "model.onnx"

    def make(out: Path) -> None:
        export_demucs = _export_side("onnx_export").export_demucs
        safe_load = _export_side("safe_load")
        print(f"exporting {checkpoint.name} ({checkpoint.stat().st_size / 1e6:.0f} MB) to ONNX: first use only, "
              f"cached in {out.parent}. Tracing, then a parity check against upstream torch; a released-size model "
              "takes about half a minute on two cores", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        model = safe_load.build_demucs_model(safe_load.load_demucs_package(checkpoint))
        if segment is not None and segment <= float(model.segment):
            model.segment = segment  # upstream BagOfModels rule for HTDemucs
        export_demucs(model, out, opset=opset, explain=explain, metadata={
            "ripper.checkpoint_sha256": sha, "ripper.checkpoint_name": checkpoint.name,
            "ripper.export_options": json.dumps(options, sort_keys=True)}, progress=sys.stderr)
        _report_export(out, t0)

    return cached_graph(out, make)


def demucs_shape(source: DemucsSource) -> tuple[list[str], float] | None:
    """(sources, longest usable segment in seconds) of a local Demucs model, read from its checkpoints' kwargs with
    the safe loader (nothing from the file is executed; ~0.3 s for a released-size file), so that --stems, --two-stems
    and --segment are refused before a half-minute export. The segment rule is the export's: a bag's `segment`
    applies to a member whose own is longer. None where the export side (torch) is not installed: the export would
    stop with its own message anyway."""
    try:
        safe_load = _export_side("safe_load")
    except ExportUnavailable:
        return None
    sources, segment = None, None
    for member in source.members:
        kwargs = safe_load.load_demucs_package(member.path)["kwargs"]
        if "sources" not in kwargs:
            return None
        own = float(kwargs.get("segment", 10))  # HTDemucs' constructor default
        if source.segment is not None and source.segment <= own:
            own = float(source.segment)
        sources = sources or [str(s) for s in kwargs["sources"]]
        segment = own if segment is None else min(segment, own)
    return (sources, segment) if sources is not None else None


def _report_export(path: Path, t0: float) -> None:
    from .onnx_model import read_info
    parity = read_info(path).raw.get("ripper.parity_sdr_db")
    print(f"  exported in {time.monotonic() - t0:.0f} s" + (f", {float(parity):.1f} dB from upstream" if parity else ""),
          file=sys.stderr, flush=True)


def export_demucs_source(source: DemucsSource, *, opset: int = DEFAULT_OPSET, out_root: Path | None = None,
                         explain: bool = False) -> ExportedModel:
    paths = tuple(export_demucs_member(m.path, segment=source.segment, opset=opset, out_root=out_root,
                                       explain=explain) for m in source.members)
    return ExportedModel(source.name, "htdemucs", paths, source.weights)


def export_roformer(family: str, config: Path, checkpoint: Path, *, opset: int = DEFAULT_OPSET,
                    out_root: Path | None = None, explain: bool = False) -> ExportedModel:
    """Cached graph for a RoFormer checkpoint + its YAML config (both hashed into the key); explain: the graph that
    also outputs the per-band masks."""
    sha = sha256_file(checkpoint)
    options = {"family": family, "config_sha256": sha256_file(config), "opset": opset,
               "export_version": EXPORT_VERSION, "roformer_graph": ROFORMER_GRAPH_VERSION}
    if explain:
        options["explain"] = True
    out = (out_root or onnx_root()) / family / _key(sha, options) / "model.onnx"

    def make(out: Path) -> None:
        RoformerKeyError = _export_side("roformer").RoformerKeyError
        _export = _export_side("roformer_export").export_roformer
        print(f"exporting {checkpoint.name} ({checkpoint.stat().st_size / 1e6:.0f} MB) to ONNX: first use only, "
              f"cached in {out.parent}. Tracing, then a check against the reference; a vocals-size RoFormer takes "
              "several minutes on a few cores", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            import bs_roformer  # noqa: F401  (the reference; a test dependency)
            check_reference = True
        except ImportError:
            check_reference = False
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _export(config, checkpoint, out, family=family, opset=opset, check_reference=check_reference,
                    explain=explain,
                    metadata={"ripper.checkpoint_sha256": sha, "ripper.checkpoint_name": checkpoint.name,
                              "ripper.export_options": json.dumps(options, sort_keys=True)})
        except RoformerKeyError as e:  # a checkpoint that does not fit the config: the user's to fix
            raise ValueError(f"{checkpoint}: {e}") from None
        _report_export(out, t0)

    cached_graph(out, make)
    return ExportedModel(checkpoint.stem, family, (out,), None)


def with_precision(exported: ExportedModel, precision: str) -> ExportedModel:
    """The same model at `precision`: fp32 as exported, or fp16/bf16 graphs derived from (and checked against)
    them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return exported
    derive = fp16_graph if precision == "fp16" else bf16_graph
    return dataclasses.replace(exported, onnx_paths=tuple(derive(p) for p in exported.onnx_paths))


def fp16_graph(fp32_path: Path) -> Path:
    """`model-fp16.onnx` beside the cached fp32 graph (so it shares its key), converting on a miss.

    The conversion keeps the precision-sensitive parts in fp32 (ripper_export.fp16) and is checked: its SDR against
    the fp32 graph on a music-like chunk is stored in the metadata (`ripper.fp16_sdr_db`) and must reach
    FP16_MIN_SDR_DB. Needs onnx and onnxruntime only, no torch.
    """
    return cached_graph(fp32_path.with_name("model-fp16.onnx"), lambda out: _convert_fp16(fp32_path, out))


def _convert_fp16(fp32_path: Path, out: Path) -> None:
    import onnx

    from ripper_export.fp16 import fp16_sdr, music_like, to_fp16
    print(f"converting {fp32_path.parent.name} to fp16 (first use; checked against fp32, then cached)",
          file=sys.stderr)
    model = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in model.metadata_props}
    half = to_fp16(model)
    mix = music_like(1, int(meta["ripper.channels"]), int(meta["ripper.chunk_samples"]),
                     sample_rate=int(meta["ripper.sample_rate"]))
    sdr = fp16_sdr(model, half, mix)
    if not sdr >= FP16_MIN_SDR_DB:
        raise ValueError(f"{fp32_path}: the fp16 graph is only {sdr:.1f} dB from fp32 (at least {FP16_MIN_SDR_DB} dB "
                         "needed); use --precision fp32")
    onnx.helper.set_model_props(half, meta | {"ripper.precision": "fp16", "ripper.fp16_sdr_db": f"{sdr:.1f}"})
    with atomic_path(out) as tmp:
        onnx.save(half, str(tmp))
    log.info("fp16 graph %s: %.1f dB from fp32", out, sdr)


def bf16_graph(fp32_path: Path) -> Path:
    """`model-bf16.onnx` beside the cached fp32 graph: the same graph plus, in its metadata, the MatMuls OpenVINO
    feeds with bf16 (`ripper.bf16_matmuls`, chosen by ripper_export.bf16) and the SDR of OpenVINO's bf16 output
    against ONNX Runtime's fp32 output on a music-like chunk (`ripper.bf16_sdr_db`), which must reach
    BF16_MIN_SDR_DB. Made (compiled and checked) once; needs onnx, onnxruntime and openvino, no torch."""
    return cached_graph(fp32_path.with_name("model-bf16.onnx"), lambda out: _convert_bf16(fp32_path, out))


def _convert_bf16(fp32_path: Path, out: Path) -> None:
    import onnx

    from ripper_export.bf16 import bf16_matmuls
    from ripper_export.fp16 import _session, music_like
    from ripper_export.metrics import sdr_db

    from .openvino_model import OpenVinoRunner
    print(f"checking {fp32_path.parent.name} in bf16 (first use; OpenVINO against fp32, then cached)", file=sys.stderr)
    model = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in model.metadata_props}
    names = bf16_matmuls(model)
    if not names:
        raise ValueError(f"{fp32_path}: no MatMul of this graph can run in bf16; use --precision fp32")
    onnx.helper.set_model_props(model, meta | {"ripper.precision": "bf16", "ripper.bf16_matmuls": json.dumps(names)})
    data = model.SerializeToString()
    mix = music_like(1, int(meta["ripper.channels"]), int(meta["ripper.chunk_samples"]),
                     sample_rate=int(meta["ripper.sample_rate"]))
    ref = _session(fp32_path).run(None, {"mix": mix})[0]
    sdr = sdr_db(ref, OpenVinoRunner(data)(mix))
    if not sdr >= BF16_MIN_SDR_DB:
        raise ValueError(f"{fp32_path}: the bf16 graph is only {sdr:.1f} dB from fp32 (at least {BF16_MIN_SDR_DB} dB "
                         "needed); use --precision fp32")
    onnx.helper.set_model_props(model, meta | {"ripper.precision": "bf16", "ripper.bf16_matmuls": json.dumps(names),
                                               "ripper.bf16_sdr_db": f"{sdr:.1f}"})
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    log.info("bf16 graph %s: %.1f dB from fp32 (%d MatMuls in bf16)", out, sdr, len(names))
