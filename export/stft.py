"""STFT and ISTFT as real-valued tensor pairs, so they export to plain ONNX (Conv/MatMul/Pad/Add).

ONNX has no complex dtype and `torch.stft`/`torch.istft` do not export; every model here keeps spectra as
(real, imag) pairs. Matches `torch.stft`/`torch.istft` with a periodic Hann window, `center=True`, reflect padding,
`onesided=True`, optionally `normalized=True`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _window(n_fft: int, win_length: int) -> np.ndarray:
    """Periodic Hann of `win_length`, zero-padded centred to `n_fft` (as torch does)."""
    n = np.arange(win_length)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    out = np.zeros(n_fft)
    out[left:left + win_length] = w
    return out


class RealSTFT(nn.Module):
    """`(N, L)` waveform -> `(re, im)`, each `(N, n_bins, frames)`.

    A strided Conv1d whose kernels are window*cos and -window*sin; `n_bins` lets a model that drops the Nyquist bin
    never compute it.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None, normalized: bool = False,
                 n_bins: int | None = None):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        w = _window(n_fft, win_length or n_fft)
        k = np.arange(self.n_bins)[:, None]
        n = np.arange(n_fft)[None, :]
        ang = 2 * np.pi * k * n / n_fft
        scale = 1 / math.sqrt(n_fft) if normalized else 1.0
        kernel = np.concatenate([w * np.cos(ang), -w * np.sin(ang)], 0) * scale
        self.register_buffer("kernel", torch.from_numpy(kernel[:, None, :]).float(), persistent=False)

    def forward(self, x: torch.Tensor):
        pad = self.n_fft // 2
        x = F.pad(x[:, None, :], (pad, pad), mode="reflect")
        z = F.conv1d(x, self.kernel, stride=self.hop_length)
        return z[:, :self.n_bins], z[:, self.n_bins:]


class RealISTFT(nn.Module):
    """`(re, im)` each `(N, n_bins, frames)` -> `(N, length)`; bins above `n_bins` are taken as zero.

    Inverse DFT as one MatMul (window and onesided doubling folded into the basis), overlap-add as a sum of shifted
    frame blocks (no ConvTranspose, no scatter), then division by the squared-window envelope, a constant for the
    fixed frame count of an export.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None, normalized: bool = False,
                 n_bins: int | None = None):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        self.blocks = -(-n_fft // hop_length)
        w = _window(n_fft, win_length or n_fft)
        self._win = w
        k = np.arange(self.n_bins)[:, None]
        n = np.arange(n_fft)[None, :]
        ang = 2 * np.pi * k * n / n_fft
        c = np.where((k == 0) | (2 * k == n_fft), 1.0, 2.0)
        scale = (math.sqrt(n_fft) if normalized else 1.0) / n_fft
        basis = np.concatenate([c * np.cos(ang), -c * np.sin(ang)], 0) * w[None, :] * scale
        padded = np.zeros((basis.shape[0], self.blocks * hop_length))
        padded[:, :n_fft] = basis
        self.register_buffer("basis", torch.from_numpy(padded).float(), persistent=False)
        self._envelopes: dict[int, torch.Tensor] = {}

    def _envelope(self, frames: int) -> torch.Tensor:
        if frames not in self._envelopes:
            total = (frames + self.blocks - 1) * self.hop_length
            env = np.zeros(total)
            sq = self._win ** 2
            for t in range(frames):
                env[t * self.hop_length:t * self.hop_length + self.n_fft] += sq
            inv = np.where(env > 1e-11, 1.0 / np.maximum(env, 1e-11), 0.0)
            self._envelopes[frames] = torch.from_numpy(inv).float()
        return self._envelopes[frames]

    def forward(self, re: torch.Tensor, im: torch.Tensor, length: int):
        n, _, frames = re.shape
        frames = int(frames)
        spec = torch.cat([re, im], 1).transpose(1, 2)  # (N, T, 2B)
        y = torch.matmul(spec, self.basis.to(spec.dtype))  # (N, T, blocks*hop)
        y = y.reshape(n, frames, self.blocks, self.hop_length)
        out = None
        for j in range(self.blocks):
            piece = F.pad(y[:, :, j, :], (0, 0, j, self.blocks - 1 - j))
            out = piece if out is None else out + piece
        out = out.reshape(n, (frames + self.blocks - 1) * self.hop_length)
        out = out * self._envelope(frames).to(out.dtype)
        start = self.n_fft // 2
        avail = out.shape[-1] - start
        if length > avail:
            out = F.pad(out, (0, length - avail))
        return out[:, start:start + length]
