"""From command-line model arguments to what the runtime needs: ONNX graphs (exported once, cached) and their info.

`ModelBundle` is the unit shipped to workers: the graph bytes plus bag weights. Everything else (sources, rates,
chunk lengths) is read back from the graphs' own metadata, so a worker needs nothing but the bundle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .export_cache import ExportedModel, export_demucs_source
from .family_registry import is_msst
from .model_ref import CATALOGUE, CONFIG, ONNX, recognise
from .onnx_model import GraphInfo, read_info
from .options import SeparateOptions

#: check(model, its stems, its longest segment in s or None): refuses options the model cannot honour, before export
ShapeCheck = Callable[[str, Sequence[str], Optional[float]], None]


@dataclass(frozen=True)
class ModelChoice:
    """Which model to export or load, and how: the model part of `SeparateOptions` (`of`), or what the `export`
    command was given (unvalidated there: what it cannot use fails here, before anything is exported)."""

    model: str = "htdemucs"
    onnx: Path | None = None
    repo: Path | None = None
    checkpoint: Path | None = None
    config: Path | None = None
    precision: str = "fp32"
    explain: bool = False
    device: str = "cpu"
    progress: bool = True  # the download's progress bar (catalogue models)

    @classmethod
    def of(cls, opts: SeparateOptions) -> "ModelChoice":
        return cls(opts.model, opts.onnx, opts.repo, opts.checkpoint, opts.config, opts.precision, opts.explain,
                   opts.device, opts.progress)


def export_model(choice: ModelChoice, check: ShapeCheck | None = None) -> ExportedModel:
    """The chosen model: cached graphs, exported (and parity-checked) on first use. check: refuses stem and segment
    options against the shape a local checkpoint or config states, before the export (`SeparateOptions.
    check_model_shape`; None checks nothing)."""
    from .export_cache import with_precision
    precision, explain = choice.precision, choice.explain
    if precision == "bf16":  # `export` reaches here without SeparateOptions: refuse before exporting anything
        from .openvino_model import bf16_problem
        if (why := bf16_problem(choice.device)) is not None:
            raise ValueError(f"--precision: {why}")
    ref = recognise(choice.model, repo=choice.repo, onnx=choice.onnx)
    if ref.how == ONNX:  # an exported graph (`ripper-dist export -o`): no checkpoint, no torch needed
        path = Path(choice.onnx or choice.model)
        if not path.is_file():
            raise FileNotFoundError(f"--onnx {path}: no such ONNX file")
        if explain and "ripper.explain" not in read_info(path).raw:
            raise ValueError(f"--explain: {path} is not an explanation graph (export one with `ripper-dist export "
                             "--explain -o DIR`)")
        exported = ExportedModel(path.stem, read_info(path).family, (path,), None)
        return with_precision(exported, precision)
    if ref.how == CATALOGUE and ref.msst:  # `-n NAME` of the catalogue: download, verify, export
        import dataclasses

        from .export_cache import export_roformer
        from .sources import fetch_roformer
        ref.check_own_files(choice.config, choice.checkpoint)
        entry = ref.entry
        if check is not None:
            check(entry.name, entry.stems, None)
        src = fetch_roformer(entry.name, progress=choice.progress)
        exported = export_roformer(src.family, src.config, src.checkpoint, explain=explain)
        return with_precision(dataclasses.replace(exported, name=entry.name), precision)
    if ref.how == CONFIG:
        from .export_cache import export_roformer
        if not choice.config or not choice.checkpoint:
            raise ValueError(f"-n {choice.model} needs --config CONFIG.yaml and --checkpoint MODEL.ckpt")
        _check_before_export(check, lambda: _roformer_shape(Path(choice.config)), Path(choice.checkpoint).stem)
        return with_precision(export_roformer(choice.model, Path(choice.config), Path(choice.checkpoint),
                                              explain=explain), precision)
    from .sources import resolve_demucs  # a released name (CATALOGUE), a bag in --repo, a --checkpoint (LOCAL)
    source = resolve_demucs(choice.model, repo=choice.repo, checkpoint=choice.checkpoint)
    if choice.repo is not None or choice.checkpoint is not None:  # released names were checked by the options
        from .export_cache import demucs_shape
        _check_before_export(check, lambda: demucs_shape(source), source.name)
    return with_precision(export_demucs_source(source, explain=explain), precision)


def _roformer_shape(config: Path) -> tuple[list[str], None] | None:
    """The stems a RoFormer config makes (its YAML, read safely: no torch needed); RoFormer takes no --segment.
    None for a config without instrument names (the export names the stems then)."""
    from ripper_export.roformer_config import load_roformer_config

    from .msst_chunking import output_stems
    cfg = load_roformer_config(config)
    if not cfg.instruments and not cfg.target_instrument:
        return None
    return output_stems(cfg.instruments, cfg.target_instrument), None


def _check_before_export(check: ShapeCheck | None, shape, label: str) -> None:
    """Refuse stem/segment options the model cannot honour before exporting it (seconds to minutes), from what its
    checkpoint or config says (read only when there is something to check)."""
    if check is None:
        return
    found = shape()
    if found is not None:
        check(label, *found)


def graph_bytes(graph: bytes | Path) -> bytes:
    """A bundle's graph as bytes, for shipping it to Ray workers (which may not see the driver's files). Read when
    shipped, not kept: the local engine and the actors hold the session's copy of the weights only (RoFormer vocals:
    0.9 GB less per process, docs/BENCHMARKS.md)."""
    return graph if isinstance(graph, bytes) else Path(graph).read_bytes()


@dataclass
class ModelBundle:
    name: str
    family: str
    graphs: list[bytes | Path]  # the cached files (bytes where a caller built the bundle from bytes)
    weights: list[list[float]] | None
    infos: list[GraphInfo]

    @classmethod
    def from_exported(cls, exported: ExportedModel) -> "ModelBundle":
        graphs = [Path(p) for p in exported.onnx_paths]  # files, not bytes: sessions load them from disk
        infos = []
        for path in graphs:
            try:
                infos.append(read_info(path))
            except Exception as e:  # noqa: BLE001 - protobuf errors name no file
                raise ValueError(f"{path}: not a usable ripper-dist ONNX graph ({type(e).__name__}: "
                                 f"{str(e).strip()[:200]})") from None
        first = infos[0]
        for i in infos[1:]:
            if (i.sources, i.sample_rate, i.channels) != (first.sources, first.sample_rate, first.channels):
                raise ValueError("sub-models of a bag must share sources, sample rate and channels")
        return cls(exported.name, first.family, graphs, exported.weights, infos)

    @property
    def info(self) -> GraphInfo:
        return self.infos[0]

    @property
    def is_msst(self) -> bool:
        """An MSST-style (RoFormer) model, by its graphs' family (`family_registry`)."""
        return is_msst(self.family)

    @property
    def sources(self) -> list[str]:
        """The stems this model writes. RoFormer with a target instrument: the target plus its complement."""
        if self.is_msst:
            from .msst_chunking import output_stems
            return output_stems(self.instruments, self.target_instrument)
        return list(self.info.sources)

    @property
    def instruments(self) -> list[str]:
        import json
        return json.loads(self.info.raw.get("ripper.instruments", "[]")) or list(self.info.sources)

    @property
    def target_instrument(self) -> str | None:
        return self.info.raw.get("ripper.target_instrument") or None

    @property
    def num_overlap(self) -> int:
        return int(self.info.raw.get("ripper.num_overlap", 2))

    @property
    def full_weights(self) -> list[list[float]]:
        if self.weights and self.explain == "branches":  # the bag's per-source weights apply to each branch term
            return [list(row) * 3 for row in self.weights]
        return self.weights or [[1.0] * len(self.sources) for _ in self.graphs]

    @property
    def explain(self) -> str | None:
        """What an explanation graph adds: "branches" (Demucs time/spectral terms), "band_masks" (RoFormer)."""
        return self.info.raw.get("ripper.explain") or None

    def runners(self, device: str = "cpu", threads: int | None = None, models: set[int] | None = None,
                max_batch: int | None = None, backend: str = "ort") -> list:
        """One runner per sub-model (a placeholder where `models` says it is not needed), on `backend` (`ort`,
        `openvino`, or `auto`: see cpu_backend).

        max_batch: the largest batch the runners will be given (TensorRT builds its engine profile for it)."""
        from .cpu_backend import make_runners
        wanted = [g if models is None or m in models else None for m, g in enumerate(self.graphs)]
        made = make_runners(wanted, device, threads, backend, max_batch=max_batch)
        return [r if r is not None else _Unused(i.chunk_samples) for r, i in zip(made, self.infos)]

    def roformer_runner(self, device: str = "cpu", threads: int | None = None,
                        max_batch: int | None = None, backend: str = "ort"):
        if not self.is_msst:
            raise ValueError(f"{self.name} is a {self.family} model, not a RoFormer")
        return self.runners(device, threads, max_batch=max_batch, backend=backend)[0]

    def demucs_bag(self, device: str = "cpu", threads: int | None = None, models: set[int] | None = None,
                   max_batch: int | None = None, backend: str = "ort"):
        """The engine's `DemucsBag` over ONNX Runtime runners."""
        from .engine import DemucsBag
        if self.is_msst:
            raise ValueError(f"{self.name} is a {self.family} model, not Demucs")
        return DemucsBag(self.runners(device, threads, models, max_batch, backend=backend), self.full_weights,
                         [i.segment_samples for i in self.infos], self.sources, self.info.sample_rate,
                         self.info.channels, name=self.name)

    def identity(self) -> dict:
        """What makes outputs differ: the checkpoints (by hash) and the bag weights (and --explain's extra files)."""
        out = {"name": self.name, "family": self.family, "weights": self.weights,
               "checkpoints": [i.raw.get("ripper.checkpoint_sha256") for i in self.infos],
               "export_version": [i.raw.get("ripper.export_version") for i in self.infos],
               "precision": [i.raw.get("ripper.precision", "fp32") for i in self.infos]}
        return out | ({"explain": self.explain} if self.explain else {})


class _Unused:
    """Placeholder runner for a bag member whose output no selected stem needs."""

    def __init__(self, chunk_samples: int):
        self.chunk_samples = chunk_samples

    def __call__(self, batch):
        raise RuntimeError("this sub-model is not needed for the selected stems")
