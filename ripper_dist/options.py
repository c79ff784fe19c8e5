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
from .encoders import BITRATE_FORMATS, unavailable
from .model_ref import CATALOGUE, CONFIG, LOCAL, ONNX, ModelRef, recognise, released_names
from .stem_sink import DEFAULT_TEMPLATE, check_template
from .watchdog import DEFAULT_CHUNK_TIMEOUT_S, DEFAULT_TRACK_TIMEOUT_S, Limits

ENGINES = ("auto", "ray", "local")
OTHER_METHODS = ("add", "minus", "none")
#: `--ensemble` algorithms (ripper_dist.ensemble), named as in audio-separator and MSST.
ENSEMBLE_ALGORITHMS = ("avg_wave", "median_wave", "min_wave", "max_wave", "avg_fft", "median_fft", "min_fft",
                       "max_fft")


@dataclass(frozen=True)
class SeparateOptions:
    inputs: tuple[str, ...] = ()
    out: Path = Path("separated")
    # model
    model: str = "htdemucs"
    onnx: Path | None = None          # an exported graph (`ripper-dist export -o`): no checkpoint, no torch
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
    tta: bool = False  # RoFormer: MSST's test-time augmentation (mix, channels swapped, polarity inverted; averaged)
    batch_size: int | str = "auto"
    # output
    stems: tuple[str, ...] | None = None
    two_stems: str | None = None
    other_method: str | None = None   # --two-stems complement: add (sum of the other sources, default) | minus | none
    format: str = "wav"
    subtype: str | None = None        # None: the format's default (PCM_16 for wav/flac)
    clip_mode: str = "rescale"
    bitrate: int | None = None        # kbps, mp3/m4a (default 320)
    sample_rate: int | None = None    # output rate (default: the input's)
    filename: str = DEFAULT_TEMPLATE  # stem path inside OUT, with {track} {trackext} {stem} {ext} {model}
    label: str | None = None          # the {model} of the layout and the manifest (default: the model's name)
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
        if self.onnx is not None:
            set_("onnx", Path(self.onnx))
        if self.format in WRITE_SUBTYPES and self.subtype is None:
            set_("subtype", WRITE_SUBTYPES[self.format][0])
        set_("subtype", str(self.subtype).upper())
        set_("clip_mode", str(self.clip_mode).lower())
        set_("ensemble", str(self.ensemble).lower())
        if self.repo is None and self.onnx is None:  # a catalogue alias (`-n MelBandRoformer.ckpt`) -> its name
            names = [recognise(m).name for m in self.members]
            set_("model", ",".join(names) if len(names) > 1 or names[0] != self.model else self.model)
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

        if self.precision not in ("fp32", "fp16", "bf16"):
            bad("--precision", f"{self.precision!r} is not fp32, fp16 or bf16")
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
            bad("--format", f"{self.format!r}: use one of {list(WRITE_SUBTYPES)}")
        if (why := unavailable(self.format)) is not None:
            bad("--format", why)
        if self.subtype not in WRITE_SUBTYPES[self.format]:
            bad("--subtype", f"{self.format} cannot hold {self.subtype}: use one of {WRITE_SUBTYPES[self.format]}")
        if self.bitrate is not None:
            if self.format not in BITRATE_FORMATS:
                bad("--bitrate", f"only for {' and '.join(BITRATE_FORMATS)} (--format {self.format} is not)")
            if not 8 <= self.bitrate <= (320 if self.format == "mp3" else 512):
                bad("--bitrate", f"{self.bitrate} kbps is out of range (8 to {320 if self.format == 'mp3' else 512})")
        if self.sample_rate is not None and not 8000 <= self.sample_rate <= 384000:
            bad("--sample-rate", f"{self.sample_rate} Hz is out of range (8000 to 384000)")
        if self.other_method is not None:
            if self.other_method not in OTHER_METHODS:
                bad("--other-method", f"{self.other_method!r}: use one of {', '.join(OTHER_METHODS)}")
            if not self.two_stems:
                bad("--other-method", "only applies with --two-stems STEM")
        check_template(self.filename)
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
        if self.precision == "bf16":  # before any export: bf16 needs the CPU's bf16 units and OpenVINO
            from .openvino_model import bf16_problem
            if (why := bf16_problem(self.device)) is not None:
                bad("--precision", why)
            if self.backend == "ort":
                bad("--backend", "ort cannot run bf16 graphs (OpenVINO runs them): drop --backend ort")
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
        if self.tta and self.explain:
            bad("--tta", "cannot be combined with --explain: the band masks of one pass are |mask| magnitudes, and the "
                         "averaged output's mask is the mean of the passes' complex masks, which no mean of "
                         "magnitudes gives")
        if self.explain and not self.shared_fs:
            bad("--explain", "needs a shared filesystem (RoFormer band masks are written beside the span parts)")
        if not self.shared_fs and self.engine == "local":
            bad("--no-shared-fs", "is a Ray job option: it does nothing with --engine local")
        members = self.members
        if not all(members):
            bad("-n", f"{self.model!r}: an empty model name")
        if len(members) == 1 and Path(self.model).suffix == ".onnx" and self.onnx is None:
            object.__setattr__(self, "onnx", Path(self.model))
        if self.onnx is not None:
            option = "--onnx" if Path(self.model).suffix != ".onnx" else "-n"
            if len(members) > 1:
                bad("--onnx", "one exported graph; for an ensemble list the .onnx files in -n a.onnx,b.onnx")
            if self.onnx.suffix != ".onnx":
                bad(option, f"{self.onnx}: not an .onnx file (export one with `ripper-dist export -o DIR`)")
            if not self.onnx.is_file():
                bad(option, f"{self.onnx}: no such ONNX file")
            given = [o for o, v in (("--repo", self.repo), ("--checkpoint", self.checkpoint), ("--config", self.config))
                     if v is not None]
            if given:
                bad(option, f"an exported graph carries its model: drop {', '.join(given)}")
        refs = self.model_refs
        for ref in refs if self.onnx is None else ():
            model = ref.model
            if ref.how == ONNX:
                if not Path(model).is_file():
                    bad("-n", f"{model}: no such ONNX file")
            elif ref.how == CATALOGUE and ref.msst:
                if len(members) == 1:
                    ref.check_own_files(self.config, self.checkpoint)
                from .sources import refuse_unexportable
                refuse_unexportable(ref.entry)  # before anything is downloaded: one line naming the options
                refuse_demucs_options(self, model)
                self.check_model_shape(model, ref.entry.stems, None)
            elif ref.how == CONFIG:
                if not self.config or not self.checkpoint:
                    bad("-n", f"{model} needs --config CONFIG.yaml and --checkpoint MODEL.ckpt")
                refuse_demucs_options(self, model)
            elif ref.how == CATALOGUE and (self.checkpoint is None or len(members) > 1):
                # a released Demucs model, checked by its known shape (an unknown name fails when resolved)
                self.check_model_shape(model, ref.entry.stems, ref.entry.segment_s)
        if self.tta and self.onnx is None:  # a Demucs model by its name: refused before anything is loaded
            demucs = [r.model for r in refs if r.demucs]
            if demucs:
                bad("--tta", f"a RoFormer option (MSST's test-time augmentation); {demucs[0]} is a Demucs model: "
                             "use --shifts")
        if sum(r.how == CONFIG for r in refs) > 1:
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
        if len(members) > 1 and self.checkpoint and not any(r.how == CONFIG for r in refs):
            bad("--checkpoint", "a single Demucs checkpoint is one model, not an ensemble member: use --repo")
        for path, option in ((self.repo, "--repo"), (self.checkpoint, "--checkpoint"), (self.config, "--config"),
                             (self.then_repo, "--then-repo")):
            if path is not None and not Path(path).exists():
                bad(option, f"{path} does not exist")
        if self.out.exists() and not self.out.is_dir():
            bad("-o", f"{self.out} exists and is not a folder")
        existing = next((p for p in (self.out, *self.out.absolute().parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            bad("-o", f"{self.out}: {existing} is a file, not a folder")
        for stem, model in self.then:
            if not stem or not model:
                bad("--then", "expected STEM=MODEL, e.g. other=htdemucs")

    def check_model_shape(self, model: str, sources, segment_s: float | None) -> None:
        """--stems/--two-stems/--segment against a model's stems and longest segment (None: no Demucs segment), known
        before it is exported: from the released models' table, or read from a local checkpoint or config."""
        if segment_s is not None and self.segment is not None and self.segment > segment_s + 1e-9:
            raise ValueError(f"--segment: {self.segment:g} s is longer than {model}'s {segment_s:g} s "
                             "(a Transformer model cannot use a longer segment than it was trained for)")
        for option, wanted in (("--stems", self.stems or ()), ("--two-stems", (self.two_stems,) if self.two_stems
                                                                else ())):
            unknown = [s for s in wanted if s not in sources]
            if unknown:
                raise ValueError(f"{option}: {model} has no {', '.join(unknown)} (it has "
                                 f"{', '.join(sources)})")

    def check_model_names(self) -> None:
        """A plain `-n` name without --repo/--checkpoint must be a catalogue model (checked before OUT is created;
        not in `validate`, so options naming models of a repo can be built before the repo is given)."""
        for ref in self.model_refs if self.onnx is None and self.repo is None else ():
            if ref.how == LOCAL and (self.checkpoint is None or self.is_ensemble):
                raise ValueError(f"-n: unknown model {ref.model!r}; released models: "
                                 f"{', '.join(released_names())} and the "
                                 "RoFormers of `ripper-dist models`; or give --repo DIR, --checkpoint FILE.th or "
                                 "--onnx FILE.onnx")

    # -- derived ---------------------------------------------------------------------------------------------------
    @property
    def members(self) -> tuple[str, ...]:
        """The models of `-n`: one, or an ensemble's (`-n a,b`)."""
        return tuple(m.strip() for m in str(self.model).split(","))

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def model_refs(self) -> tuple[ModelRef, ...]:
        """What each model of `-n` names (`model_ref.recognise`, with this --repo and --onnx)."""
        return tuple(recognise(m, repo=self.repo, onnx=self.onnx) for m in self.members)

    @property
    def model_name(self) -> str:
        """The model's name as the layout's {model} and the manifest's `model` column: known before it is loaded."""
        if self.label:
            return self.label
        if self.onnx is not None:
            return self.onnx.stem
        names = [Path(r.model).stem if r.how == ONNX else Path(self.checkpoint).stem
                 if self.checkpoint is not None and (r.how == CONFIG or len(self.members) == 1) else r.model
                 for r in self.model_refs]
        return "+".join(names)  # an ensemble: its members' names, as `EnsembleBundle.name`

    def layout(self):
        from .stem_sink import StemLayout
        return StemLayout(self.out, self.model_name, self.format, self.filename)

    def output(self):
        from .stem_sink import StemOutput
        return StemOutput(self.format, self.subtype, self.clip_mode, self.bitrate, self.sample_rate)

    def limits(self) -> Limits:
        return Limits(float(self.track_timeout), float(self.chunk_timeout))

    def ray_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def chained(self, stem: str, model: str) -> "SeparateOptions":
        """The next `--then STEM=MODEL` stage: MODEL on STEM's files, in the same OUT as the model
        `<this model>.<STEM>.<MODEL>` (default layout: OUT/<this model>.STEM.MODEL/<track>/). The chunking options
        and --tta are this stage's: a chained Demucs model has its own (--tta would be refused there)."""
        template = self.filename if "{model}" in self.filename else "{model}/" + self.filename
        return dataclasses.replace(
            self, model=model, onnx=None, checkpoint=None, config=None, repo=self.then_repo, stems=None,
            two_stems=None, other_method=None, segment=None, num_overlap=None, overlap=None, then=(), tta=False,
            label=f"{self.model_name}.{stem}.{model}", filename=template, ensemble_weights=None)


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
