"""Mel-Band RoFormer and BS-RoFormer, written for export, loading the community checkpoints unchanged.

The module tree mirrors the parameter names of the community checkpoints (Kim's vocals model: a raw state dict of
684 keys; ZFTurbo's MSST with ``linear_transformer_depth=0``; ``bs-roformer==0.3.10``), so a state dict loads as is:

- ``band_split.to_features.{band}.{0.gamma, 1.weight, 1.bias}``
- ``layers.{i}.{0 time, 1 freq}.layers.{j}.0.{norm.gamma, to_qkv.weight, to_gates.{weight,bias}, to_out.0.weight,
  rotary_embed.freqs}`` and ``...layers.{j}.1.net.{0.gamma, 1.*, 4.*}``; ``layers.{i}.{0,1}.norm.gamma`` (Mel-Band)
  or ``final_norm.gamma`` (BS)
- ``mask_estimators.{stem}.to_freqs.{band}.0.{0,2,4,...}.{weight,bias}``

The forward pass computes the same function as the references, restated for ONNX: STFT/ISTFT as real pairs
(`ripper_export.stft`), band gathering and mask averaging as constant-index Gathers (no scatter), plain
matmul/softmax attention, rotary tables that can be frozen for a fixed chunk length. Input ``(batch, channels, L)``,
output always ``(batch, stems, channels, L)``.

Behaviour that differs between implementations and how it is settled here:

- ``zero_dc`` (zero the DC bin before the ISTFT): current MSST default true when absent; an explicit false is
  honoured. Kim's original code and ``bs-roformer==0.3.10`` never zero it (the parity check patches the reference).
- mask-estimator depth: Mel-Band uses ``depth`` hidden layers, BS ``depth - 1`` (as upstream).
- ``flash_attn``/``sage_attention`` only choose kernels: ignored. Dropouts are inactive at inference: ignored.
- Architecture switches this code does not implement (``linear_transformer_depth > 0``, ``skip_connection``,
  ``use_pope``, custom window functions) are refused with an error rather than silently mis-modelled.
"""
from __future__ import annotations

import re

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .roformer_config import COMMON_KEYS, FAMILY_KEYS, IGNORED_KEYS, unknown_keys, unsupported_options
from .stft import RealISTFT, RealSTFT

__all__ = [
    "FAMILIES",
    "RoformerSpec",
    "Roformer",
    "RoformerKeyError",
    "mel_band_membership",
    "read_checkpoint",
    "unwrap_state_dict",
    "load_roformer_state",
    "build_roformer",
]

FAMILIES = ("mel_band_roformer", "bs_roformer")

#: lucidrains/ZFTurbo default BS-RoFormer bands (1025 bins for n_fft 2048).
DEFAULT_FREQS_PER_BANDS = (
    (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
)

# The key rules live torch-free in roformer_config (the runtime's model catalogue reads them too).
_IGNORED_KEYS, _COMMON_KEYS, _FAMILY_KEYS = IGNORED_KEYS, COMMON_KEYS, FAMILY_KEYS


class RoformerKeyError(KeyError):
    """The state dict does not match the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []

        def few(items, budget=1500):  # a config off by a lot would list a million keys: name some, count the rest
            shown, used = [], 0
            for item in items:
                if used + len(item) > budget:
                    break
                shown.append(item)
                used += len(item) + 2
            rest = len(items) - len(shown)
            return ", ".join(shown) + (f", ... ({rest} more)" if rest else "")
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {few(self.unexpected)}")
        if self.mismatched:
            parts.append(f"shape mismatches ({len(self.mismatched)}): " + few(
                [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        super().__init__("; ".join(parts) or "state dict mismatch")

    def __str__(self):  # KeyError would repr() the message
        return self.args[0]


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class RoformerSpec:
    """Architecture hyper-parameters with the defaults of current MSST (ZFTurbo) code."""
    family: str
    dim: int
    depth: int
    stereo: bool = False
    num_stems: int = 1
    time_transformer_depth: int = 2
    freq_transformer_depth: int = 2
    dim_head: int = 64
    heads: int = 8
    stft_n_fft: int = 2048
    stft_hop_length: int = 512
    stft_win_length: int = 2048
    stft_normalized: bool = False
    zero_dc: bool = True
    mask_estimator_depth: int = 1
    mlp_expansion_factor: int = 4
    num_bands: int = 60                                  # mel_band_roformer
    sample_rate: int = 44100                             # mel_band_roformer (mel filter bank)
    freqs_per_bands: tuple[int, ...] = DEFAULT_FREQS_PER_BANDS  # bs_roformer
    ignored: dict = field(default_factory=dict, compare=False)

    @property
    def channels(self) -> int:
        return 2 if self.stereo else 1

    @property
    def n_freqs(self) -> int:
        return self.stft_n_fft // 2 + 1

    @classmethod
    def from_kwargs(cls, family: str, kwargs: Mapping) -> "RoformerSpec":
        """Model kwargs as in a config's ``model:`` section -> spec; unknown or unsupported keys raise ValueError."""
        if family not in FAMILIES:
            raise ValueError(f"unknown RoFormer family {family!r}; expected one of {FAMILIES}")
        kwargs = dict(kwargs)
        unknown = unknown_keys(family, kwargs)
        if unknown:
            raise ValueError(f"{family}: unknown model config keys {unknown}; refusing to guess their meaning")
        unsupported = unsupported_options(kwargs)
        if unsupported:
            raise ValueError(f"{family}: unsupported architecture options: {', '.join(unsupported)}")
        for key in ("dim", "depth"):
            if key not in kwargs:
                raise ValueError(f"{family}: model config lacks {key!r}")
        ignored = {k: kwargs.pop(k) for k in list(kwargs) if k in _IGNORED_KEYS}
        for k in ("linear_transformer_depth", "skip_connection", "use_pope", "stft_window_fn"):
            kwargs.pop(k, None)
        out = dict(family=family, ignored=ignored)
        if family == "bs_roformer":
            out["mask_estimator_depth"] = 2          # upstream BS default
        for k, v in kwargs.items():
            if k == "freqs_per_bands":
                v = tuple(int(x) for x in v)
            elif k in ("stereo", "stft_normalized", "zero_dc"):
                v = bool(v)
            elif v is not None:
                v = int(v)
            out[k] = v
        if out.get("zero_dc") is None:
            out["zero_dc"] = True
        spec = cls(**out)
        if spec.stft_win_length > spec.stft_n_fft:
            raise ValueError("stft_win_length > stft_n_fft is not supported")
        if family == "bs_roformer" and sum(spec.freqs_per_bands) != spec.n_freqs:
            raise ValueError(f"freqs_per_bands sum to {sum(spec.freqs_per_bands)}, but n_fft {spec.stft_n_fft} "
                             f"gives {spec.n_freqs} bins")
        return spec


# ----------------------------------------------------------------------------------------------------------------
# band layout


def _hz_to_mel(f):
    """librosa's Slaney mel scale (htk=False), same floating-point operations."""
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    if mels.ndim:
        log_t = f >= min_log_hz
        mels[log_t] = min_log_mel + np.log(f[log_t] / min_log_hz) / logstep
    elif f >= min_log_hz:
        mels = min_log_mel + np.log(f / min_log_hz) / logstep
    return mels


def _mel_to_hz(m):
    m = np.asanyarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = m >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (m[log_t] - min_log_mel))
    return freqs


def mel_band_membership(sample_rate: int, n_fft: int, num_bands: int) -> np.ndarray:
    """Bool ``(num_bands, n_fft//2+1)``: bin f belongs to band b where the mel filter is > 0.

    Reproduces ``librosa.filters.mel(sr, n_fft, n_mels)`` (Slaney scale and norm, float32 result) with the
    reference's ``[0, 0] = 1`` and ``[-1, -1] = 1`` overrides, without importing librosa.
    """
    n_bins = 1 + n_fft // 2
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(float(sample_rate) / 2), num_bands + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((num_bands, n_bins), dtype=np.float32)
    for i in range(num_bands):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:num_bands + 2] - mel_f[:num_bands]))[:, None]
    weights[0, 0] = 1.0
    weights[-1, -1] = 1.0
    member = weights > 0
    if not member.any(axis=0).all():
        raise ValueError(f"mel bands (sr {sample_rate}, n_fft {n_fft}, {num_bands} bands) leave bins uncovered")
    return member


def band_bins(spec: RoformerSpec) -> list[np.ndarray]:
    """Per band, the ascending STFT bin indices it covers."""
    if spec.family == "mel_band_roformer":
        member = mel_band_membership(spec.sample_rate, spec.stft_n_fft, spec.num_bands)
        return [np.nonzero(row)[0] for row in member]
    edges = np.cumsum((0,) + tuple(spec.freqs_per_bands))
    return [np.arange(edges[i], edges[i + 1]) for i in range(len(spec.freqs_per_bands))]


# ----------------------------------------------------------------------------------------------------------------
# layers (names follow the checkpoints)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        return x / norm * (self.gamma * self.scale)


class RotaryFreqs(nn.Module):
    """Holds the checkpoint's ``rotary_embed.freqs`` (theta 10000); one instance shared by all layers of an axis."""

    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim_head, 2)[:dim_head // 2].float() / dim_head))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def tables(self, n: int, scale: float = 1.0):
        """cos, signed sin ``(n, dim_head)`` for interleaved pairs (computed in float32 as the reference does)."""
        with torch.no_grad():
            f = torch.arange(n, dtype=torch.float32)[:, None] * self.freqs.detach().float()[None, :]
            f = f.repeat_interleave(2, dim=-1)
            cos, sin = f.cos(), f.sin()
            sign = torch.tensor([-1.0, 1.0]).repeat(f.shape[-1] // 2)
            return (cos * scale).contiguous(), (sin * sign * scale).contiguous()


def _pair_swap_index(dim_head: int) -> torch.Tensor:
    idx = torch.arange(dim_head).reshape(-1, 2).flip(-1).reshape(-1)
    return idx


class Attention(nn.Module):
    """Gated multi-head attention with rotary embeddings.

    `head_groups` > 1 computes the scores and softmax one group of heads after another (same values): over the
    time axis a chunk's scores for all heads at once are 60 bands x 8 heads x 801 x 801 floats (1.2 GB, plus as
    much for the softmax), which made ONNX Runtime's peak memory; per head they are 8x smaller and the runtime
    reuses one group's buffers for the next (a vocals-size session peaked at 5.0 GB, now 2.6 GB, at the same speed;
    docs/BENCHMARKS.md).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, rotary_embed: RotaryFreqs, head_groups: int = 1):
        super().__init__()
        if heads % head_groups:
            raise ValueError(f"head_groups {head_groups} does not divide heads {heads}")
        self.heads, self.dim_head, self.head_groups = heads, dim_head, head_groups
        inner = heads * dim_head
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False))
        self.rotary_embed = rotary_embed
        self.register_buffer("swap", _pair_swap_index(dim_head), persistent=False)

    def forward(self, x, rope):
        """x ``(N, n, dim)``; rope = (cos_q, sin_q, cos_k, sin_k), each ``(n, dim_head)``; q tables carry the scale."""
        n = x.shape[-2]
        h, dh = self.heads, self.dim_head
        xn = self.norm(x)
        qkv = self.to_qkv(xn).reshape(-1, n, 3, h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        cos_q, sin_q, cos_k, sin_k = rope
        q = q * cos_q + q.index_select(-1, self.swap) * sin_q
        k = k * cos_k + k.index_select(-1, self.swap) * sin_k
        g = self.head_groups
        parts = zip(q.chunk(g, 1), k.chunk(g, 1), v.chunk(g, 1)) if g > 1 else [(q, k, v)]
        outs = [torch.matmul(torch.matmul(qg, kg.transpose(-1, -2)).softmax(dim=-1), vg) for qg, kg, vg in parts]
        out = outs[0] if g == 1 else torch.cat(outs, dim=1)           # (N, h, n, dh)
        gates = self.to_gates(xn).sigmoid().transpose(1, 2).unsqueeze(-1)
        out = (out * gates).transpose(1, 2).reshape(-1, n, h * dh)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Identity(),
                                 nn.Linear(inner, dim), nn.Identity())

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, rotary_embed, norm_output: bool, head_groups: int = 1):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([Attention(dim, heads, dim_head, rotary_embed, head_groups), FeedForward(dim)])
            for _ in range(depth)])
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x, rope):
        for attn, ff in self.layers:
            x = attn(x, rope) + x
            x = ff(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    def __init__(self, dim: int, dim_inputs: tuple[int, ...]):
        super().__init__()
        self.dim_inputs = tuple(dim_inputs)
        self.to_features = nn.ModuleList([nn.Sequential(RMSNorm(d), nn.Linear(d, dim)) for d in dim_inputs])

    def forward(self, x):                      # (B, T, sum dim_inputs) -> (B, T, bands, dim)
        parts = torch.split(x, self.dim_inputs, dim=-1)
        return torch.stack([net(p) for p, net in zip(parts, self.to_features)], dim=-2)


def _mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    dims = (dim_in,) + (dim_hidden,) * hidden_layers + (dim_out,)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    def __init__(self, dim: int, dim_inputs: tuple[int, ...], hidden_layers: int, expansion: int):
        super().__init__()
        self.to_freqs = nn.ModuleList([
            nn.Sequential(_mlp(dim, d * 2, dim * expansion, hidden_layers), nn.GLU(dim=-1)) for d in dim_inputs])

    def forward(self, x):                      # (B, T, bands, dim) -> (B, T, sum dim_inputs)
        return torch.cat([mlp(x[..., i, :]) for i, mlp in enumerate(self.to_freqs)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# the model


class Roformer(nn.Module):
    """Mel-Band RoFormer or BS-RoFormer (``spec.family``); ``(B, C, L) -> (B, stems, C, L)``; with ``explain`` set,
    also the per-band mask magnitudes ``(B, stems, bands, frames)`` the estimators produced (before band averaging)."""

    def __init__(self, spec: RoformerSpec):
        super().__init__()
        self.spec = spec
        c = spec.channels
        bins = band_bins(spec)
        self.num_bands = len(bins)
        sel = np.concatenate(bins)
        self.n_sel = int(sel.size)
        dim_inputs = tuple(int(b.size) * 2 * c for b in bins)

        time_rot, freq_rot = RotaryFreqs(spec.dim_head), RotaryFreqs(spec.dim_head)
        norm_each = spec.family == "mel_band_roformer"
        self.layers = nn.ModuleList([
            nn.ModuleList([
                Transformer(spec.dim, spec.time_transformer_depth, spec.heads, spec.dim_head, time_rot, norm_each,
                            head_groups=spec.heads),     # long sequences (801 frames): one head at a time
                Transformer(spec.dim, spec.freq_transformer_depth, spec.heads, spec.dim_head, freq_rot, norm_each),
            ]) for _ in range(spec.depth)])
        self._time_rot, self._freq_rot = [time_rot], [freq_rot]     # lists: not registered twice
        if not norm_each:
            self.final_norm = RMSNorm(spec.dim)
        self.band_split = BandSplit(spec.dim, dim_inputs)
        hidden = spec.mask_estimator_depth if norm_each else spec.mask_estimator_depth - 1
        if hidden < 0:
            raise ValueError("mask_estimator_depth must be >= 1")
        self.mask_estimators = nn.ModuleList([
            MaskEstimator(spec.dim, dim_inputs, hidden, spec.mlp_expansion_factor) for _ in range(spec.num_stems)])

        self.stft = RealSTFT(spec.stft_n_fft, spec.stft_hop_length, spec.stft_win_length, spec.stft_normalized)
        self.istft = RealISTFT(spec.stft_n_fft, spec.stft_hop_length, spec.stft_win_length, spec.stft_normalized)

        # band gathering (bins in band order) and mask averaging (K gathers of the selected rows, weighted 1/count)
        n_f = spec.n_freqs
        self._identity = bool(self.n_sel == n_f and np.array_equal(sel, np.arange(n_f)))
        self.register_buffer("freq_indices", torch.from_numpy(sel.astype(np.int64)), persistent=False)
        occurrences: list[list[int]] = [[] for _ in range(n_f)]
        for pos, f in enumerate(sel):
            occurrences[int(f)].append(pos)
        counts = np.array([len(o) for o in occurrences])
        k_max = int(counts.max())
        gather = np.zeros((k_max, n_f), dtype=np.int64)
        present = np.zeros((k_max, n_f), dtype=np.float32)
        for f, occ in enumerate(occurrences):
            for k in range(k_max):
                gather[k, f] = occ[k] if k < len(occ) else occ[0]
                present[k, f] = 1.0 if k < len(occ) else 0.0
        scale = (1.0 / counts).astype(np.float32)
        if spec.zero_dc:
            scale[0] = 0.0
        self._uniform = bool(np.all(present == 1.0))
        self.register_buffer("mask_gather", torch.from_numpy(gather), persistent=False)
        self.register_buffer("mask_present", torch.from_numpy(present), persistent=False)
        self.register_buffer("mask_scale", torch.from_numpy(scale), persistent=False)
        self.bands_per_freq = counts
        self._frozen: dict | None = None
        # --explain: a second output, each band's mask magnitude (mean over its bins and channels) per frame
        self.explain = False
        band_mean = np.zeros((self.n_sel, self.num_bands), dtype=np.float32)
        start = 0
        for i, b in enumerate(bins):
            band_mean[start:start + b.size, i] = 1.0 / b.size
            start += b.size
        self.register_buffer("band_mean", torch.from_numpy(band_mean), persistent=False)

    # -- rotary tables ------------------------------------------------------------------------------------------
    def _rope(self, frames: int):
        if self._frozen is not None and self._frozen["frames"] == frames:
            return self._frozen["time"], self._frozen["freq"]
        scale = self.spec.dim_head ** -0.5
        out = []
        for rot, n in ((self._time_rot[0], frames), (self._freq_rot[0], self.num_bands)):
            cq, sq = rot.tables(n, scale)
            ck, sk = rot.tables(n)
            out.append((cq, sq, ck, sk))
        return out[0], out[1]

    def freeze_length(self, length: int | None) -> None:
        """Precompute the rotary tables for chunks of `length` samples (they become constants in an export)."""
        if length is None:
            self._frozen = None
            return
        self._frozen = None
        frames = length // self.spec.stft_hop_length + 1
        t, f = self._rope(frames)
        self._frozen = {"frames": frames, "time": t, "freq": f}

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        s = self.spec
        c, n_f, nb, d, stems = s.channels, s.n_freqs, self.num_bands, s.dim, s.num_stems
        if mix.dim() != 3 or int(mix.shape[1]) != c:
            raise ValueError(f"expected (batch, {c}, samples), got {tuple(mix.shape)}")
        length = int(mix.shape[-1])
        frames = length // s.stft_hop_length + 1

        re, im = self.stft(mix.reshape(-1, length))                            # (B*C, F, T)
        spec = torch.stack((re, im), dim=-1).reshape(-1, c, n_f, frames, 2)
        spec = spec.permute(0, 3, 2, 1, 4)                                      # (B, T, F, C, 2)
        feats = spec if self._identity else spec.index_select(2, self.freq_indices)
        x = self.band_split(feats.reshape(-1, frames, self.n_sel * c * 2))     # (B, T, bands, dim)

        rope_t, rope_f = self._rope(frames)
        for time_tf, freq_tf in self.layers:
            x = x.transpose(1, 2).reshape(-1, frames, d)
            x = time_tf(x, rope_t)
            x = x.reshape(-1, nb, frames, d).transpose(1, 2).reshape(-1, nb, d)
            x = freq_tf(x, rope_f)
            x = x.reshape(-1, frames, nb, d)
        if s.family == "bs_roformer":
            x = self.final_norm(x)

        masks = torch.stack([est(x) for est in self.mask_estimators], dim=1)   # (B, S, T, n_sel*C*2)
        masks = masks.reshape(-1, stems, frames, self.n_sel, c, 2)
        band_masks = None
        if self.explain:  # |mask| per band: (B, S, bands, T)
            mag = torch.sqrt(masks[..., 0] ** 2 + masks[..., 1] ** 2).mean(dim=-1)  # (B, S, T, n_sel)
            band_masks = torch.matmul(mag, self.band_mean).transpose(2, 3)
        masks = self._average(masks)                                           # (B, S, T, F, C, 2)

        sp = spec.unsqueeze(1)
        sr, si = sp[..., 0], sp[..., 1]
        mr, mi = masks[..., 0], masks[..., 1]
        out_re = (sr * mr - si * mi).permute(0, 1, 4, 3, 2).reshape(-1, n_f, frames)
        out_im = (sr * mi + si * mr).permute(0, 1, 4, 3, 2).reshape(-1, n_f, frames)
        wav = self.istft(out_re, out_im, length)                                # (B*S*C, L)
        wav = wav.reshape(-1, stems, c, length)
        return (wav, band_masks) if self.explain else wav

    def _average(self, masks):
        scale = self.mask_scale[:, None, None]
        if self._identity:
            return masks * scale if self.spec.zero_dc else masks
        total = None
        for k in range(self.mask_gather.shape[0]):
            part = masks.index_select(3, self.mask_gather[k])
            if not self._uniform and k > 0:
                part = part * self.mask_present[k][:, None, None]
            total = part if total is None else total + part
        return total * scale


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_WRAPPERS = ("state_dict", "model_state_dict", "state", "model")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, _depth: int = 0) -> dict[str, torch.Tensor]:
    """A raw state dict, or one wrapped as ``state_dict``/``model_state_dict``/``state``/``model`` (other entries of
    the wrapper, e.g. Lightning's epoch counters, are ignored)."""
    from .safe_load import UnsupportedCheckpointError

    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and _depth < 2:
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], Mapping):
                try:
                    return unwrap_state_dict(obj[key], _depth + 1)
                except UnsupportedCheckpointError:
                    continue
    kind = type(obj).__name__
    keys = list(obj)[:8] if isinstance(obj, Mapping) else []
    raise UnsupportedCheckpointError(
        f"not a RoFormer state dict: a {kind} with keys {keys}; expected tensors, or a dict wrapping them "
        f"under one of {list(_WRAPPERS)}")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no code runs) and unwrap its state dict."""
    from .safe_load import UnsafeCheckpointError, _offending_global

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "GLOBAL" in msg or "Unsupported" in msg:
            name = _offending_global(msg)
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds Python objects beyond tensors and plain containers"
                + (f" (global {name})" if name else ""), name) from None
        raise
    return unwrap_state_dict(obj)


def load_roformer_state(model: Roformer, state: Mapping[str, torch.Tensor]) -> None:
    """Load `state` strictly; raises `RoformerKeyError` listing missing, unexpected and mis-shaped keys.

    A uniform ``module.``/``model.``/``_orig_mod.`` prefix (DataParallel, Lightning, torch.compile) is stripped when
    the keys do not match otherwise. Half-precision tensors are converted to float32.
    """
    expected = model.state_dict()
    state = dict(state)
    if not set(state) & set(expected):
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                if set(stripped) & set(expected):
                    state = stripped
                    break
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in sorted(set(state) & set(expected))
                  if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise RoformerKeyError(missing, unexpected, mismatched)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def check_sizes(spec: RoformerSpec, state: Mapping[str, torch.Tensor]) -> None:
    """Compare the config's sizes with the checkpoint's tensors before any model is built, so a wrong config (depth
    10000) fails in a moment with a short message instead of allocating the model it describes.
    Raises RoformerKeyError naming each size that differs."""
    anchor = "band_split.to_features.0.1.weight"
    prefix = next((k[:-len(anchor)] for k in state if k.endswith(anchor)), None)
    if prefix is None:
        raise RoformerKeyError(missing=[anchor])

    def count(pattern: str) -> int:
        rx = re.compile(re.escape(prefix) + pattern)
        return len({m.group(1) for k in state if (m := rx.match(k))})

    bands = spec.num_bands if spec.family == "mel_band_roformer" else len(spec.freqs_per_bands)
    qkv = state.get(f"{prefix}layers.0.0.layers.0.0.to_qkv.weight")
    found = {
        "dim": int(state[prefix + anchor].shape[0]),
        "depth": count(r"layers\.(\d+)\."),
        "time_transformer_depth": count(r"layers\.0\.0\.layers\.(\d+)\."),
        "freq_transformer_depth": count(r"layers\.0\.1\.layers\.(\d+)\."),
        "bands": count(r"band_split\.to_features\.(\d+)\."),
        "num_stems": count(r"mask_estimators\.(\d+)\."),
        "heads * dim_head": None if qkv is None else int(qkv.shape[0]) // 3,
    }
    wanted = {"dim": spec.dim, "depth": spec.depth, "time_transformer_depth": spec.time_transformer_depth,
              "freq_transformer_depth": spec.freq_transformer_depth, "bands": bands, "num_stems": spec.num_stems,
              "heads * dim_head": spec.heads * spec.dim_head}
    wrong = [(f"config {k}", (found[k],), (wanted[k],)) for k in wanted
             if found[k] is not None and found[k] != wanted[k]]
    if wrong:
        raise RoformerKeyError(mismatched=wrong)


def build_roformer(family: str, model_kwargs: Mapping, state: Mapping[str, torch.Tensor] | None = None) -> Roformer:
    """Model from config kwargs, optionally loaded with `state`; returned in eval mode, float32."""
    spec = RoformerSpec.from_kwargs(family, model_kwargs)
    if state is not None:
        check_sizes(spec, state)
    model = Roformer(spec)
    if state is not None:
        load_roformer_state(model, state)
    return model.float().eval()


def num_parameters(model: nn.Module) -> int:
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total

