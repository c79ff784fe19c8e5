"""`Separator`: separation from Python, without argparse, a command line or a Ray cluster.

The options are the command line's (`SeparateOptions`, validated when the `Separator` is built, so a mistake fails
before anything is loaded); the model is exported or loaded on first use and kept for the next calls. Files go where
the command line puts them (`OUT/<model>/<track>/<stem>.<ext>` unless `filename=` says otherwise) and get a row in
`OUT/metadata.parquet`, so the command line can resume what a script started and the other way round.
"""
from __future__ import annotations

import dataclasses
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from .options import SeparateOptions


#: options that choose the graphs or the sessions running them: `update` reloads the model when one changes (any
#: other option is rebound to the loaded sessions: stems, shifts, overlap, tta, format, clip mode, output names ...)
RELOAD_OPTIONS = ("model", "repo", "checkpoint", "config", "onnx", "precision", "explain", "device", "backend",
                  "threads", "batch_size")


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """What loading cost: the graphs (bundle) and their sessions (runners; built for the sub-models in `models`)."""
    bundle: object
    runners: list
    models: frozenset
    batch_size: int
    load_s: float


class Separator:
    """A model ready to separate files and arrays.

    model: a released name (htdemucs, htdemucs_ft, htdemucs_6s), a bag in `repo`, mel_band_roformer/bs_roformer with
    `config` + `checkpoint`, or `onnx=` an exported graph (no checkpoint, no torch). options: any `SeparateOptions`
    field (two_stems, stems, shifts, overlap, segment, tta, format, subtype, bitrate, sample_rate, clip_mode,
    filename, threads, batch_size, precision, ...).
    progress: a callable, called as `progress(done_s, total_s)` (audio seconds at the model rate) at the start of a
    track and after each group of chunks, as demucs' `callback`: non-decreasing, the last call exactly
    `(total_s, total_s)`; an exception raised in it stops the track (no stem file is left).
    """

    def __init__(self, model: str = "htdemucs", *, repo=None, checkpoint=None, config=None, onnx=None,
                 device: str = "cpu", progress=None, **options):
        given = dict(model=model, repo=repo, checkpoint=checkpoint, config=config, onnx=onnx, device=device,
                     **options)
        self.options, self.progress = _build(given, progress)
        self._given, self._progress_arg = given, progress
        self._loaded: _Loaded | None = None
        self._model = None  # (bundle, family, runners, batch_size, key, load_s) for self.options

    def update(self, **options) -> "Separator":
        """Change options (the keywords of the constructor) on this Separator, as demucs' `update_parameter`.

        Validated as at construction, against the loaded model too (a stem it lacks, --tta on Demucs ...): a bad
        value raises ValueError and leaves the Separator as it was. The loaded sessions are kept unless a
        `RELOAD_OPTIONS` option changes (another model, device, precision, threads ...): then the model is loaded
        again on next use. Stems that need a sub-model the loaded bag skipped get its session added. Returns self.
        """
        progress = options.pop("progress", self._progress_arg)
        given = {**self._given, **options}
        opts, callback = _build(given, progress)
        loaded, model = self._loaded, None
        if loaded is not None and any(str(getattr(opts, f)) != str(getattr(self.options, f)) for f in RELOAD_OPTIONS):
            loaded = None  # another model or other sessions: loaded on next use
        elif loaded is not None:
            model, loaded = _rebind(opts, loaded)  # raises before anything changes here
        self.options, self.progress, self._given, self._progress_arg = opts, callback, given, progress
        self._loaded, self._model = loaded, model
        return self

    # -- the model, loaded once ----------------------------------------------------------------------------------------
    def _load(self):
        if self._model is None:
            if self._loaded is None:
                from .onnx_model import batch_plan, fit_runners
                from .separator import load_model
                opts = self.options
                t0 = time.monotonic()
                bundle, family = load_model(opts)
                batch_size, fit_gpu = batch_plan(opts.batch_size, opts.device)
                runners = bundle.runners(opts.device, opts.threads, family.models, max_batch=batch_size)
                if fit_gpu:
                    batch_size = fit_runners(runners, batch_size)
                self._loaded = _Loaded(bundle, runners, frozenset(family.models), batch_size,
                                       time.monotonic() - t0)
            self._model, self._loaded = _rebind(self.options, self._loaded)
        return self._model

    def _hooks(self, sample_rate: int):
        """(progress, on_plan) for `separate_track`: the callback's figures in seconds, counted in samples so the
        last call is exactly the total."""
        if self.progress is None:
            return None, None
        callback, state = self.progress, {"done": 0, "total": 0}

        def on_plan(plan) -> None:
            state["done"], state["total"] = 0, int(plan.length)
            callback(0.0, state["total"] / sample_rate)

        def progress(n: int) -> None:
            state["done"] += int(n)
            callback(state["done"] / sample_rate, state["total"] / sample_rate)
        return progress, on_plan

    @property
    def stems(self) -> list[str]:
        """The stems each separation returns (loads the model)."""
        return list(self._load()[1].stems)

    @property
    def sample_rate(self) -> int:
        """The model's own rate (inputs at other rates are resampled to it and back)."""
        return int(self._load()[1].sample_rate)

    # -- separating ----------------------------------------------------------------------------------------------------
    def separate_file(self, path, out_dir="separated") -> tuple[dict[str, Path], dict]:
        """Separate one audio file into `out_dir`; returns ({stem: path}, its metadata row). Errors raise."""
        from .inputs import assign_tracks, expand_inputs
        from .manifest import Manifest
        from .separator import job_columns
        from .span_work import separate_track
        opts = dataclasses.replace(self.options, out=Path(out_dir), inputs=(str(path),))  # checks out_dir again
        track = assign_tracks(expand_inputs([str(path)]))[0]
        bundle, family, runners, batch_size, key, load_s = self._load()
        progress, on_plan = self._hooks(family.sample_rate)
        from .manifest import RowContext
        rows = RowContext(str(opts.out), opts.model_name, opts.format, opts.subtype, key, "api",
                          job_columns(opts, bundle, family, load_s))
        opts.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        paths, plan, info = separate_track(family, runners, track.path,
                                           opts.layout().paths(track.track, family.stems, track.path),
                                           output=opts.output(), batch_size=batch_size, progress=progress,
                                           on_plan=on_plan)
        row = rows.done(str(track.path), track.track, plan=plan, paths=paths, started=started, finished=time.time(),
                        node=socket.gethostname(), worker="api", compute_s=info["compute_s"], **info["stems"])
        manifest = Manifest(opts.out)
        manifest.record(row)
        manifest.compact()
        return paths, row

    def separate_array(self, audio, sample_rate: int) -> dict[str, np.ndarray]:
        """Separate samples in memory: `audio` is (channels, samples) or (samples,) at `sample_rate`; returns
        {stem: float32 (channels, samples)} at the same rate and length, unclipped (as demucs' `separate_tensor`)."""
        from .span_work import separate_track
        from .stem_sink import StemOutput
        import soundfile as sf
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"audio: expected (channels, samples), got shape {x.shape}")
        if x.shape[0] > 8 and x.shape[1] <= 8:
            raise ValueError(f"audio: shape {x.shape} looks like (samples, channels); pass audio.T")
        _, family, runners, batch_size, _, _ = self._load()
        progress, on_plan = self._hooks(family.sample_rate)
        with tempfile.TemporaryDirectory(prefix="ripper-dist-") as tmp:
            src = Path(tmp) / "input.wav"
            sf.write(src, x.T, int(sample_rate), subtype="FLOAT")
            outs = {s: Path(tmp) / f"{s}.wav" for s in family.stems}
            paths, _, _ = separate_track(family, runners, src, outs, output=StemOutput("wav", "FLOAT", "none"),
                                         batch_size=batch_size, progress=progress, on_plan=on_plan)
            return {s: np.ascontiguousarray(sf.read(p, dtype="float32", always_2d=True)[0].T)
                    for s, p in paths.items()}


def _build(given: dict, progress) -> tuple[SeparateOptions, object]:
    """The options of a Separator and its progress callback (a bool `progress` is the options' own, the bar)."""
    opts = dict(given)
    opts["progress"] = bool(progress) if not callable(progress) and progress is not None else False
    opts["engine"] = "local"
    return SeparateOptions(**opts), progress if callable(progress) else None


def _rebind(opts: SeparateOptions, loaded: _Loaded):
    """The family, key and runners of `opts` over loaded graphs and sessions: ((bundle, family, runners, batch_size,
    key, load_s), loaded), sessions added only for sub-models the loaded ones lack. Raises ValueError (the family's
    checks) before anything is built."""
    from .families import family_for
    from .hashing import options_key
    from .separator import resume_options
    bundle = loaded.bundle
    if opts.is_ensemble:
        from .ensemble import ensemble_of
        bundle, family = ensemble_of(bundle.members, opts)
    else:
        family = family_for(bundle, opts)
    missing = set(family.models) - loaded.models
    if missing:  # e.g. --stems now needing a specialist of a one-hot bag that was skipped
        extra = bundle.runners(opts.device, opts.threads, missing, max_batch=loaded.batch_size)
        runners = [extra[i] if i in missing else r for i, r in enumerate(loaded.runners)]
        loaded = dataclasses.replace(loaded, runners=runners, models=loaded.models | missing)
    key = options_key(resume_options(opts, bundle, family))
    return (bundle, family, loaded.runners, loaded.batch_size, key, loaded.load_s), loaded
