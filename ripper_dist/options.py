"""`SeparateOptions`: everything a separation job is asked to do, validated once, passed down unchanged.

The command line builds it (`cli.py`), a Python caller builds it directly; nothing below the CLI reads argparse.
It is frozen: a chained stage derives its own with `dataclasses.replace`, so a stage can never change another's.
Validation here covers what can be checked without the model (ranges, formats, devices); what depends on the model
(stems it has, options its family ignores) is checked by the family (`families.py`) before any track is touched.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .audio import CLIP_MODES, WRITE_SUBTYPES
from .device import canonical
from .watchdog import DEFAULT_CHUNK_TIMEOUT_S, DEFAULT_TRACK_TIMEOUT_S, Limits

ENGINES = ("auto", "ray", "local")
#: `--ensemble` algorithms (ripper_dist.ensemble), named as in audio-separator and MSST.
ENSEMBLE_ALGORITHMS = ("avg_wave", "median_wave", "min_wave", "max_wave", "avg_fft", "median_fft", "min_fft",
                       "max_fft")
ROFORMER_FAMILIES = ("mel_band_roformer", "bs_roformer")


@dataclass(frozen=True)
class SeparateOptions:
    inputs: tuple[str, ...] = ()
    out: Path = Path("separated")
    # model
    model: str = "htdemucs"
    repo: Path | None = None
    checkpoint: Path | None = None
    config: Path | None = None
    precision: str = "fp32"
    explain: bool = False  # explanation graphs: Demucs branch terms, RoFormer band masks (extra files per stem)
    # chunking (None = the family's default; a family refuses the ones it cannot honour)
    shifts: int = 0
    seed: int = 0
    overlap: float | None = None
    segment: float | None = None
    num_overlap: int | None = None
    batch_size: int | str = "auto"
    # output
    stems: tuple[str, ...] | None = None
    two_stems: str | None = None
    format: str = "wav"
    subtype: str = "PCM_16"
    clip_mode: str = "rescale"
    # placement
    device: str = "cpu"
    backend: str = "auto"  # CPU runtime: ort, openvino, or auto (measured once per machine and graph)
    threads: int | None = None
    engine: str = "auto"
    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None
    shared_fs: bool = True
    # watchdog (seconds; 0 = no limit): see watchdog.py
    track_timeout: float = DEFAULT_TRACK_TIMEOUT_S
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT_S
    # job
    force: bool = False
    progress: bool = True
    verbose: bool = False
    then: tuple[tuple[str, str], ...] = field(default=())
    then_repo: Path | None = None
    # ensembles: `model` lists several models ("a,b")
    ensemble: str = "avg_wave"
    ensemble_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - normalising a frozen instance
        set_("inputs", tuple(str(i) for i in self.inputs))
        set_("out", Path(self.out))
        if isinstance(self.stems, str):
            set_("stems", tuple(s.strip() for s in self.stems.split(",") if s.strip()) or None)
        elif self.stems is not None:
            set_("stems", tuple(self.stems) or None)
        set_("then", tuple(tuple(t) for t in self.then))
        set_("format", str(self.format).lower())
        set_("subtype", str(self.subtype).upper())
        set_("clip_mode", str(self.clip_mode).lower())
        set_("ensemble", str(self.ensemble).lower())
        if isinstance(self.ensemble_weights, str):
            try:
                set_("ensemble_weights", tuple(float(w) for w in self.ensemble_weights.split(",")))
            except ValueError:
                raise ValueError(f"--ensemble-weights: {self.ensemble_weights!r} is not a list of numbers") from None
        elif self.ensemble_weights is not None:
            set_("ensemble_weights", tuple(float(w) for w in self.ensemble_weights))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option and the reason; nothing else is done before this passes."""
        def bad(option: str, why: str):
            raise ValueError(f"{option}: {why}")

        if self.precision not in ("fp32", "fp16"):
            bad("--precision", f"{self.precision!r} is not fp32 or fp16")
        if int(self.shifts) != self.shifts or self.shifts < 0:
            bad("--shifts", f"{self.shifts} must be a whole number >= 0")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            bad("--overlap", f"{self.overlap} must be in [0, 1)")
        if self.segment is not None and not self.segment > 0:
            bad("--segment", f"{self.segment} s must be > 0 seconds")
        if self.num_overlap is not None and self.num_overlap < 1:
            bad("--num-overlap", f"{self.num_overlap} must be >= 1")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            bad("--batch-size", f"{self.batch_size!r}: give a positive number of chunks or auto")
        if self.stems and self.two_stems:
            bad("--stems", "cannot be combined with --two-stems")
        if self.format not in WRITE_SUBTYPES:
            bad("--format", f"{self.format!r}: use one of {sorted(WRITE_SUBTYPES)}")
        if self.subtype not in WRITE_SUBTYPES[self.format]:
            bad("--subtype", f"{self.format} cannot hold {self.subtype}: use one of {WRITE_SUBTYPES[self.format]}")
        if self.clip_mode not in CLIP_MODES:
            bad("--clip-mode", f"{self.clip_mode!r}: use one of {CLIP_MODES}")
        try:
            object.__setattr__(self, "device", canonical(self.device))
        except ValueError as e:
            bad("--device", str(e))
        from .cpu_backend import BACKENDS
        if self.backend not in BACKENDS:
            bad("--backend", f"{self.backend!r}: use one of {BACKENDS}")
        if self.backend == "openvino" and self.device != "cpu":
            bad("--backend", f"openvino runs on the CPU only, not --device {self.device}")
        for name in ("threads", "actors", "num_cpus"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"--{name.replace('_', '-')}", f"{v} must be >= 1")
        for name in ("track_timeout", "chunk_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                bad(f"--{name.replace('_', '-')}", f"{v!r} must be a number of seconds >= 0 (0: no limit)")
        if self.engine not in ENGINES:
            bad("--engine", f"{self.engine!r}: use one of {ENGINES}")
        if self.explain and len(self.members) > 1:
            bad("--explain", "explains one model: run it without an ensemble (-n a,b)")
        if self.explain and not self.shared_fs:
            bad("--explain", "needs a shared filesystem (RoFormer band masks are written beside the span parts)")
        if not self.shared_fs and self.engine == "local":
            bad("--no-shared-fs", "is a Ray job option: it does nothing with --engine local")
        members = self.members
        if not all(members):
            bad("-n", f"{self.model!r}: an empty model name")
        for model in members:
            if Path(model).suffix == ".onnx" and not Path(model).is_file():
                bad("-n", f"{model}: no such ONNX file")
            if model in ROFORMER_FAMILIES and (not self.config or not self.checkpoint):
                bad("-n", f"{model} needs --config CONFIG.yaml and --checkpoint MODEL.ckpt")
            if model in ROFORMER_FAMILIES:
                refuse_demucs_options(self, model)
        if sum(m in ROFORMER_FAMILIES for m in members) > 1:
            bad("-n", "one --config/--checkpoint pair serves one RoFormer: export the others "
                      "(`ripper-dist export ... -o DIR`) and list their .onnx files")
        if self.ensemble not in ENSEMBLE_ALGORITHMS:
            bad("--ensemble", f"{self.ensemble!r}: use one of {', '.join(ENSEMBLE_ALGORITHMS)}")
        if self.ensemble_weights is not None:
            if len(members) < 2:
                bad("--ensemble-weights", "needs several models (-n a,b)")
            if len(self.ensemble_weights) != len(members):
                bad("--ensemble-weights", f"{len(self.ensemble_weights)} weights for {len(members)} models")
            if any(not w >= 0 for w in self.ensemble_weights) or not sum(self.ensemble_weights) > 0:
                bad("--ensemble-weights", "weights must be >= 0 and not all 0")
        if len(members) > 1 and self.checkpoint and not any(m in ROFORMER_FAMILIES for m in members):
            bad("--checkpoint", "a single Demucs checkpoint is one model, not an ensemble member: use --repo")
        for path, option in ((self.repo, "--repo"), (self.checkpoint, "--checkpoint"), (self.config, "--config"),
                             (self.then_repo, "--then-repo")):
            if path is not None and not Path(path).exists():
                bad(option, f"{path} does not exist")
        if self.out.exists() and not self.out.is_dir():
            bad("-o", f"{self.out} exists and is not a folder")
        for stem, model in self.then:
            if not stem or not model:
                bad("--then", "expected STEM=MODEL, e.g. other=htdemucs")

    # -- derived ---------------------------------------------------------------------------------------------------
    @property
    def members(self) -> tuple[str, ...]:
        """The models of `-n`: one, or an ensemble's (`-n a,b`)."""
        return tuple(m.strip() for m in str(self.model).split(","))

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def is_roformer(self) -> bool:
        return self.model in ROFORMER_FAMILIES

    def limits(self) -> Limits:
        return Limits(float(self.track_timeout), float(self.chunk_timeout))

    def ray_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def chained(self, stem: str, model: str) -> "SeparateOptions":
        """The next `--then STEM=MODEL` stage: MODEL on STEM's files, into OUT/STEM.MODEL/<track>/."""
        return dataclasses.replace(
            self, model=model, checkpoint=None, config=None, repo=self.then_repo, stems=None, two_stems=None,
            segment=None, num_overlap=None, overlap=None, then=(), out=self.out / f"{stem}.{model}",
            ensemble_weights=None)


def refuse_demucs_options(opts: SeparateOptions, family: str) -> None:
    """RoFormer chunks by its config: the Demucs chunking options are refused rather than silently ignored."""
    given = [flag for flag, on in (("--shifts", opts.shifts), ("--overlap", opts.overlap is not None),
                                   ("--segment", opts.segment is not None)) if on]
    if given:
        raise ValueError(f"{', '.join(given)}: Demucs options; {family} chunks by its config's chunk size and "
                         "--num-overlap")


def parse_then(specs) -> tuple[tuple[str, str], ...]:
    """`--then STEM=MODEL` strings -> ((stem, model), ...)."""
    out = []
    for spec in specs or []:
        stem, sep, model = spec.partition("=")
        if not sep or not stem.strip() or not model.strip():
            raise ValueError(f"--then {spec!r}: expected STEM=MODEL, e.g. other=htdemucs")
        out.append((stem.strip(), model.strip()))
    return tuple(out)
