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


class Separator:
    """A model ready to separate files and arrays.

    model: a released name (htdemucs, htdemucs_ft, htdemucs_6s), a bag in `repo`, mel_band_roformer/bs_roformer with
    `config` + `checkpoint`, or `onnx=` an exported graph (no checkpoint, no torch). options: any `SeparateOptions`
    field (two_stems, stems, shifts, overlap, segment, format, subtype, bitrate, sample_rate, clip_mode, filename,
    threads, batch_size, precision, ...).
    """

    def __init__(self, model: str = "htdemucs", *, repo=None, checkpoint=None, config=None, onnx=None,
                 device: str = "cpu", **options):
        options.setdefault("progress", False)
        options["engine"] = "local"
        self.options = SeparateOptions(model=model, repo=repo, checkpoint=checkpoint, config=config, onnx=onnx,
                                       device=device, **options)
        self._model = None

    # -- the model, loaded once ----------------------------------------------------------------------------------------
    def _load(self):
        if self._model is None:
            from .families import family_for
            from .hashing import options_key
            from .models import ModelBundle, export_model
            from .onnx_model import batch_plan, fit_runners
            from .separator import resume_options
            opts = self.options
            t0 = time.monotonic()
            if opts.is_ensemble:
                from .ensemble import load_ensemble
                bundle, family = load_ensemble(opts)
            else:
                bundle = ModelBundle.from_exported(export_model(opts))
                family = family_for(bundle, opts)
            batch_size, fit_gpu = batch_plan(opts.batch_size, opts.device)
            runners = bundle.runners(opts.device, opts.threads, family.models, max_batch=batch_size)
            if fit_gpu:
                batch_size = fit_runners(runners, batch_size)
            key = options_key(resume_options(opts, bundle, family))
            self._model = (bundle, family, runners, batch_size, key, time.monotonic() - t0)
        return self._model

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
        from .manifest import RowContext
        rows = RowContext(str(opts.out), opts.model_name, opts.format, opts.subtype, key, "api",
                          job_columns(opts, bundle, family, load_s))
        opts.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        paths, plan, info = separate_track(family, runners, track.path,
                                           opts.layout().paths(track.track, family.stems, track.path),
                                           output=opts.output(), batch_size=batch_size)
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
        with tempfile.TemporaryDirectory(prefix="ripper-dist-") as tmp:
            src = Path(tmp) / "input.wav"
            sf.write(src, x.T, int(sample_rate), subtype="FLOAT")
            outs = {s: Path(tmp) / f"{s}.wav" for s in family.stems}
            paths, _, _ = separate_track(family, runners, src, outs, output=StemOutput("wav", "FLOAT", "none"),
                                         batch_size=batch_size)
            return {s: np.ascontiguousarray(sf.read(p, dtype="float32", always_2d=True)[0].T)
                    for s, p in paths.items()}
