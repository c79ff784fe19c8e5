"""Ensembles: `-n modelA,modelB --ensemble ALGO [--ensemble-weights 2,1]`, several models combined per stem.

An ensemble is one more model family to the engines (`EnsembleFamily`): its bundle is the members' graphs in one flat
list (so the Ray job ships and places them like a bag's), and a span is run by every member on the same samples
(`Family.run_span` of each: the same chunk plans, the same model calls as alone) and combined where it ran. Members
may be of any family (Demucs bags, RoFormer, exported graphs) with the same stems (after `--stems`/`--two-stems`),
sample rate and channels.

Algorithms (the names audio-separator and MSST use):
- `avg_wave` (weighted mean of the waveforms), `median_wave`, `min_wave` / `max_wave` (per sample, the value with the
  smallest / largest magnitude);
- `avg_fft` (weighted mean of the complex spectra), `median_fft` (median of the real and imaginary parts),
  `min_fft` / `max_fft` (per bin, the value with the smallest / largest magnitude), on an STFT of `N_FFT` samples,
  hop `HOP`, periodic Hann analysis and synthesis windows, inverted by weighted overlap-add.
Weights apply to the averages (`avg_wave`, `avg_fft`); the order statistics have none.

Whether a track is one span or many, the output is the same bits: the STFT frames sit at fixed track positions
(`k * HOP`, zeros outside the track), a span runs its members over its samples plus `N_FFT` on each side, and every
output sample sums its frames in the same order. Long spans are combined in pieces of at most `PIECE_S` seconds so the
members' outputs held at once stay bounded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .families import Family, family_for
from .model_ref import CONFIG, recognise
from .models import ModelBundle, ModelChoice, export_model
from .options import SeparateOptions

WAVE = ("avg_wave", "median_wave", "min_wave", "max_wave")
FFT = ("avg_fft", "median_fft", "min_fft", "max_fft")
ALGORITHMS = WAVE + FFT
N_FFT, HOP = 2048, 512
PIECE_S = 120.0
FRAME_BLOCK = 256  # STFT frames transformed at once (memory: members x stems x channels x this x N_FFT)


# -- combining (pure numpy) ------------------------------------------------------------------------------------------
def reduce(values: np.ndarray, algorithm: str, weights: Sequence[float] | None = None) -> np.ndarray:
    """Combine along axis 0 (the members): real waveforms or complex spectra."""
    m = values.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    kind = algorithm.split("_")[0]
    if kind == "avg":
        out = np.tensordot(w / w.sum(), values, axes=(0, 0))
        return out.astype(values.dtype, copy=False)
    if kind == "median":
        if np.iscomplexobj(values):
            return (np.median(values.real, axis=0) + 1j * np.median(values.imag, axis=0)).astype(values.dtype)
        return np.median(values, axis=0).astype(values.dtype, copy=False)
    if kind in ("min", "max"):
        mag = np.abs(values)
        pick = (np.argmin if kind == "min" else np.argmax)(mag, axis=0)
        return np.take_along_axis(values, pick[None], axis=0)[0]
    raise ValueError(f"--ensemble {algorithm!r}: use one of {', '.join(ALGORITHMS)}")


def window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float64)


def combine_fft(outs: np.ndarray, base: int, span: tuple[int, int], length: int, algorithm: str,
                weights: Sequence[float] | None) -> np.ndarray:
    """Spectral combination of member outputs for track samples [span).

    outs: (members, stems, channels, n) holding track samples [base, base + n), which must cover every STFT frame
    that touches the span (the span +- N_FFT, clipped to the track). Frame k covers [k*HOP, k*HOP + N_FFT); samples
    outside [0, length) are zeros. Returns (stems, channels, span length) float32.
    """
    a, b = span
    end = base + outs.shape[-1]
    k0, k1 = (a - N_FFT) // HOP + 1, (b - 1) // HOP  # the frames that touch [a, b)
    if max(k0 * HOP, 0) < base or min(k1 * HOP + N_FFT, length) > end:
        raise ValueError(f"member outputs [{base}, {end}) do not cover the STFT frames of span [{a}, {b})")
    win = window()
    num = np.zeros(outs.shape[1:3] + (b - a,), dtype=np.float64)
    den = np.zeros(b - a, dtype=np.float64)
    offs = np.arange(N_FFT)
    for f0 in range(k0, k1 + 1, FRAME_BLOCK):
        ks = np.arange(f0, min(f0 + FRAME_BLOCK, k1 + 1))
        pos = ks[:, None] * HOP + offs[None, :]                       # (K, N_FFT) track positions
        valid = (pos >= 0) & (pos < length)
        idx = np.clip(pos - base, 0, outs.shape[-1] - 1)
        frames = np.where(valid, outs[..., idx], 0.0) * win           # (M, S, C, K, N_FFT)
        spec = np.fft.rfft(frames, axis=-1)
        y = np.fft.irfft(reduce(spec, algorithm, weights), n=N_FFT, axis=-1) * win  # (S, C, K, N_FFT)
        for j, k in enumerate(ks):                                     # overlap-add in frame order
            lo, hi = max(k * HOP, a), min(k * HOP + N_FFT, b)
            if lo >= hi:
                continue
            num[..., lo - a:hi - a] += y[..., j, lo - k * HOP:hi - k * HOP]
            den[lo - a:hi - a] += win[lo - k * HOP:hi - k * HOP] ** 2
    return (num / np.maximum(den, 1e-12)).astype(np.float32)


# -- the model -------------------------------------------------------------------------------------------------------
def member_options(opts: SeparateOptions, model: str) -> ModelChoice:
    """What `export_model` needs for one member: --checkpoint/--config go to the member named by its family (`-n
    mel_band_roformer`, at most one), --repo to the others."""
    own = recognise(model, repo=opts.repo).how == CONFIG
    return ModelChoice(model, repo=None if own else opts.repo, checkpoint=opts.checkpoint if own else None,
                       config=opts.config if own else None, precision=opts.precision, device=opts.device,
                       progress=opts.progress)


class EnsembleBundle:
    """The members' bundles as one: their graphs in one flat list, runners built per member and concatenated."""

    def __init__(self, members: list[ModelBundle], algorithm: str, weights: Sequence[float] | None):
        self.members = members
        self.algorithm = algorithm
        self.weights = None if weights is None else [float(w) for w in weights]
        self.name = "+".join(m.name for m in members)
        self.family = "ensemble"
        self.offsets = list(np.cumsum([0] + [len(m.graphs) for m in members])[:-1])
        self.graphs = [g for m in members for g in m.graphs]

    def runners(self, device: str = "cpu", threads: int | None = None, models: set[int] | None = None,
                max_batch: int | None = None, backend: str = "ort") -> list:
        out = []
        for m, off in zip(self.members, self.offsets):
            own = None if models is None else {i - off for i in models if off <= i < off + len(m.graphs)}
            out.extend(m.runners(device, threads, own, max_batch, backend=backend))
        return out

    def identity(self) -> dict:
        return {"ensemble": self.algorithm, "weights": self.weights, "members": [m.identity() for m in self.members]}


class EnsembleFamily(Family):
    """Members run on the same span, combined per stem (see the module docstring)."""

    kind = "ensemble"

    def __init__(self, members: list[Family], sizes: list[int], algorithm: str,
                 weights: Sequence[float] | None = None, names: Sequence[str] | None = None):
        """members: one family per model; sizes: how many graphs (runners) each has, in the flat runner list."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"--ensemble {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        names = list(names or [getattr(m, "name", f"model {i}") for i, m in enumerate(members)])
        self.name = "+".join(names)
        self.algorithm, self.weights = algorithm, None if weights is None else [float(w) for w in weights]
        self.members = list(members)
        self.sizes = [int(n) for n in sizes]
        self.offsets = [int(o) for o in np.cumsum([0] + self.sizes)[:-1]]
        first = self.members[0]
        self.sample_rate, self.channels = first.sample_rate, first.channels
        for m, name in zip(self.members[1:], names[1:]):
            if (m.sample_rate, m.channels) != (self.sample_rate, self.channels):
                raise ValueError(f"-n: {name} runs at {m.sample_rate} Hz x {m.channels} channels, {names[0]} at "
                                 f"{self.sample_rate} Hz x {self.channels}: an ensemble needs one rate and channel "
                                 "count")
            if sorted(m.stems) != sorted(first.stems):
                raise ValueError(f"-n: {name} writes {m.stems}, {names[0]} writes {first.stems}: choose common "
                                 "stems with --stems or --two-stems")
        self.order = [[m.stems.index(s) for s in first.stems] for m in self.members]
        self.outputs = list(first.stems)
        self.stem_map = {s: [i] for i, s in enumerate(first.stems)}
        self.models = {off + i for m, off in zip(self.members, self.offsets) for i in m.models}

    def resume_options(self) -> dict:
        return {"ensemble": self.algorithm, "weights": self.weights,
                "members": [[m.kind, m.resume_options()] for m in self.members]}

    def track_state(self, reader) -> dict:
        return {str(i): m.track_state(reader) for i, m in enumerate(self.members)}

    def call_intervals(self, length: int) -> list[tuple[int, int]]:
        return [iv for m in self.members for iv in m.call_intervals(length)]

    def _member_output(self, i: int, runners, reader, length, state, span, batch_size) -> np.ndarray:
        m, off = self.members[i], self.offsets[i]
        blocks: list[np.ndarray] = []
        m.run_span(runners[off:off + self.sizes[i]], reader, length, state[str(i)], span, batch_size, blocks.append)
        out = np.concatenate(blocks, axis=-1) if blocks else np.zeros((len(self.outputs), self.channels, 0),
                                                                       np.float32)
        if out.shape[-1] != span[1] - span[0]:
            raise ValueError(f"member {m.name}: {out.shape[-1]} samples for a span of {span[1] - span[0]}")
        return out[self.order[i]]

    def run_span(self, runners, reader, length, state, span, batch_size, emit) -> None:
        piece = max(int(PIECE_S * self.sample_rate), HOP)
        spectral = self.algorithm in FFT
        for a in range(span[0], span[1], piece):
            b = min(a + piece, span[1])
            lo, hi = (max(a - N_FFT, 0), min(b + N_FFT, length)) if spectral else (a, b)
            outs = np.stack([self._member_output(i, runners, reader, length, state, (lo, hi), batch_size)
                             for i in range(len(self.members))])
            if spectral:
                emit(combine_fft(outs, lo, (a, b), length, self.algorithm, self.weights))
            else:
                emit(reduce(outs, self.algorithm, self.weights).astype(np.float32, copy=False))


def load_ensemble(opts: SeparateOptions) -> tuple[EnsembleBundle, EnsembleFamily]:
    """Export (or find cached) every member, then check they can be combined (before any track is touched)."""
    members = [ModelBundle.from_exported(export_model(member_options(opts, m))) for m in opts.members]
    return ensemble_of(members, opts)


def ensemble_of(members: list[ModelBundle], opts: SeparateOptions) -> tuple[EnsembleBundle, EnsembleFamily]:
    """The ensemble of loaded members under `opts` (`Separator.update` rebinds new options to the same graphs)."""
    bundle = EnsembleBundle(members, opts.ensemble, opts.ensemble_weights)
    family = EnsembleFamily([family_for(m, opts) for m in members], [len(m.graphs) for m in members],
                            opts.ensemble, opts.ensemble_weights, [m.name for m in members])
    return bundle, family
