"""STFT and ISTFT as real-valued tensor pairs, so they export to plain ONNX (MatMul/Conv/Reshape/Transpose/Add).

ONNX has no complex dtype and `torch.stft`/`torch.istft` do not export; every model here keeps spectra as
(real, imag) pairs. Matches `torch.stft`/`torch.istft` with a periodic Hann window, reflect padding (`center=True`,
or no padding with `center=False`), `onesided=True`, optionally `normalized=True`.

Two formulations of the DFT, chosen per instance (`factorized=None`: automatic):

- dense: one strided Conv1d (analysis) / one MatMul (synthesis) against the full `n_bins x n_fft` cos/sin basis,
  `2 * n_fft * n_bins` MACs per frame. Works for any hop.
- factorised: a two-stage Cooley-Tukey split `n_fft = P * Q` (for htdemucs 4096 = 64 x 64), both stages plain real
  MatMuls (the window, the twiddle factors and the one-sided doubling folded into the constant matrices), about
  `4 * n_fft * (P + Q)` FLOPs per frame: 16x fewer than dense at n_fft 4096. Needs `Q | hop` and `hop | n_fft`
  (then the framing and the overlap-add are reshapes, slices and one transpose of the small signal, no gather).

    n = Q*a + b (a < P, b < Q),  k = k1 + P*k2 (k1 < P, k2 < K2 = ceil(n_bins / P))
    analysis:   Z[b, k1]  = sum_a  w[n] x[n] e^{-2 pi i k1 n / N}              (per-b matrix, batched MatMul)
                X[k1+P k2] = sum_b Z[b, k1] e^{-2 pi i k2 b / Q}                (one MatMul)
    synthesis:  Y[n2, k1] = sum_k2 c_k X[k1+P k2] e^{2 pi i k2 n2 / Q}          (one MatMul)
                x[Q n1+n2] = w[n] Re sum_k1 Y[n2, k1] e^{2 pi i k1 n / N}       (per-n2 matrix, batched MatMul)
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


def _angle(k: np.ndarray, n: np.ndarray, n_fft: int) -> np.ndarray:
    """2*pi*k*n/n_fft with k*n reduced mod n_fft first (exact integer arithmetic, accurate cos/sin)."""
    return 2 * np.pi * ((k.astype(np.int64) * n.astype(np.int64)) % n_fft) / n_fft


def _split(n_fft: int, hop: int) -> tuple[int, int] | None:
    """(P, Q) with P*Q = n_fft, Q | hop, Q as close to sqrt(n_fft) as possible; None when no useful split exists."""
    if hop <= 0 or n_fft % hop:
        return None
    best = None
    for q in range(2, hop + 1):
        if hop % q == 0 and n_fft % q == 0:
            p = n_fft // q
            if p < 2:
                continue
            cost = p + q
            if best is None or cost < best[0]:
                best = (cost, p, q)
    if best is None or 2 * best[0] * 2 > n_fft:  # not worth it for tiny transforms
        return None
    return best[1], best[2]


def _use_factorized(factorized: bool | None, n_fft: int, hop: int) -> tuple[int, int] | None:
    split = _split(n_fft, hop)
    if factorized is True and split is None:
        raise ValueError(f"factorised DFT needs n_fft ({n_fft}) = P*Q with Q | hop ({hop}) and hop | n_fft")
    return split if factorized is not False else None


class RealSTFT(nn.Module):
    """`(N, L)` waveform -> `(re, im)`, each `(N, n_bins, frames)`.

    `center=True`: reflect-pad `n_fft // 2` each side first (torch's `center=True`); `center=False`: frames of the
    input as given. `n_bins` lets a model that drops the Nyquist bin never compute it.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None, normalized: bool = False,
                 n_bins: int | None = None, center: bool = True, factorized: bool | None = None):
        super().__init__()
        self.n_fft, self.hop_length, self.center = n_fft, hop_length, center
        self.n_bins = n_bins or n_fft // 2 + 1
        w = _window(n_fft, win_length or n_fft)
        scale = 1 / math.sqrt(n_fft) if normalized else 1.0
        self._w, self._scale = w, scale
        self._kernel = None
        self.split = _use_factorized(factorized, n_fft, hop_length)
        if self.split is None:
            self.register_buffer("_dense", self._dense_kernel(), persistent=False)
            return
        p, q = self.split
        k2n = -(-self.n_bins // p)
        self.k2n = k2n
        # stage A, per b: rows [c, k1] (c: 0 re, 1 im), columns a; n = q*a + b
        a = np.arange(p)[None, None, :]
        b = np.arange(q)[:, None, None]
        k1 = np.arange(p)[None, :, None]
        n = q * a + b
        ang = _angle(k1, n, n_fft)
        wn = w[n] * scale
        stage_a = np.concatenate([np.cos(ang) * wn, -np.sin(ang) * wn], 1)  # (Q, 2P, P)
        # stage B: rows [c', k2], columns [b, c]
        k2 = np.arange(k2n)[:, None]
        bb = np.arange(q)[None, :]
        phi = _angle(k2, bb, q)
        cos, sin = np.cos(phi), np.sin(phi)
        stage_b = np.zeros((2, k2n, q, 2))
        stage_b[0, :, :, 0], stage_b[0, :, :, 1] = cos, sin     # re' = cos*Zr + sin*Zi
        stage_b[1, :, :, 0], stage_b[1, :, :, 1] = -sin, cos    # im' = -sin*Zr + cos*Zi
        self.register_buffer("stage_a", torch.from_numpy(stage_a).float(), persistent=False)
        self.register_buffer("stage_b", torch.from_numpy(stage_b.reshape(2 * k2n, 2 * q)).float(), persistent=False)

    def _dense_kernel(self) -> torch.Tensor:
        k = np.arange(self.n_bins)[:, None]
        n = np.arange(self.n_fft)[None, :]
        ang = _angle(k, n, self.n_fft)
        kernel = np.concatenate([self._w * np.cos(ang), -self._w * np.sin(ang)], 0) * self._scale
        return torch.from_numpy(kernel[:, None, :]).float()

    @property
    def kernel(self) -> torch.Tensor:
        """The dense `(2*n_bins, 1, n_fft)` Conv1d kernel ([re bins; im bins]), built on first use."""
        if self.split is None:
            return self._dense
        if self._kernel is None:
            self._kernel = self._dense_kernel()
        return self._kernel

    def forward(self, x: torch.Tensor):
        if self.center:
            pad = self.n_fft // 2
            x = F.pad(x[:, None, :], (pad, pad), mode="reflect")[:, 0]
        if self.split is None:
            z = F.conv1d(x[:, None, :], self._dense, stride=self.hop_length)
            return z[:, :self.n_bins], z[:, self.n_bins:]
        p, q = self.split
        hop, nb, k2n = self.hop_length, self.n_bins, self.k2n
        length = int(x.shape[-1])
        frames = (length - self.n_fft) // hop + 1
        h = hop // q
        blocks = self.n_fft // hop
        used = (frames + blocks - 1) * hop
        x = x[:, :used].reshape(-1, frames + blocks - 1, h, q).permute(0, 3, 2, 1)  # (N, Q b, H r, blocks') m=H*q'+r
        xf = torch.cat([x[..., j:j + frames] for j in range(blocks)], 2)            # (N, Q b, P a, T), a = H*j + r
        z = torch.matmul(self.stage_a, xf)                                          # (N, Q b, 2P [c,k1], T)
        z = z.reshape(-1, 2 * q, p * frames)                                        # rows [b, c]
        y = torch.matmul(self.stage_b, z)                                           # (N, 2K2 [c',k2], P*T)
        y = y.reshape(-1, 2, k2n * p, frames)
        return y[:, 0, :nb], y[:, 1, :nb]


class RealISTFT(nn.Module):
    """`(re, im)` each `(N, n_bins, frames)` -> `(N, length)`; bins above `n_bins` are taken as zero.

    Inverse DFT (window and onesided doubling folded into the constants), overlap-add as a sum of shifted frame
    blocks (no ConvTranspose, no scatter), then division by the squared-window envelope, a constant for the fixed
    frame count of an export.
    """

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None, normalized: bool = False,
                 n_bins: int | None = None, factorized: bool | None = None):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.n_bins = n_bins or n_fft // 2 + 1
        self.blocks = -(-n_fft // hop_length)
        w = _window(n_fft, win_length or n_fft)
        self._win = w
        scale = (math.sqrt(n_fft) if normalized else 1.0) / n_fft
        self._envelopes: dict[int, torch.Tensor] = {}
        self.split = _use_factorized(factorized, n_fft, hop_length)
        if self.split is None:
            k = np.arange(self.n_bins)[:, None]
            n = np.arange(n_fft)[None, :]
            ang = _angle(k, n, n_fft)
            c = np.where((k == 0) | (2 * k == n_fft), 1.0, 2.0)
            basis = np.concatenate([c * np.cos(ang), -c * np.sin(ang)], 0) * w[None, :] * scale
            padded = np.zeros((basis.shape[0], self.blocks * hop_length))
            padded[:, :n_fft] = basis
            self.register_buffer("basis", torch.from_numpy(padded).float(), persistent=False)
            return
        p, q = self.split
        k2n = -(-self.n_bins // p)
        self.k2n = k2n
        # one-sided doubling c_k (1 at DC and Nyquist, 2 elsewhere), applied to the input bins
        k = np.arange(self.n_bins)
        c = np.where((k == 0) | (2 * k == n_fft), 1.0, 2.0)
        self.register_buffer("weights", torch.from_numpy(c[:, None]).float(), persistent=False)
        # stage 1: rows [n2, c'], columns [c, k2]
        n2 = np.arange(q)[:, None]
        k2 = np.arange(k2n)[None, :]
        phi = _angle(n2, k2, q)
        cos, sin = np.cos(phi), np.sin(phi)
        stage1 = np.zeros((q, 2, 2, k2n))
        stage1[:, 0, 0], stage1[:, 0, 1] = cos, -sin   # Yr = cos*Xr - sin*Xi
        stage1[:, 1, 0], stage1[:, 1, 1] = sin, cos    # Yi = sin*Xr + cos*Xi
        # stage 2, per n2: rows n1, columns [c', k1]; n = q*n1 + n2
        nn2 = np.arange(q)[:, None, None]
        n1 = np.arange(p)[None, :, None]
        k1 = np.arange(p)[None, None, :]
        n = q * n1 + nn2
        ang = _angle(k1, n, n_fft)
        wn = w[n] * scale
        stage2 = np.concatenate([np.cos(ang) * wn, -np.sin(ang) * wn], 2)  # (Q, P, 2P)
        self.register_buffer("stage1", torch.from_numpy(stage1.reshape(2 * q, 2 * k2n)).float(), persistent=False)
        self.register_buffer("stage2", torch.from_numpy(stage2).float(), persistent=False)

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

    def _dense(self, re, im):
        n, _, frames = re.shape
        spec = torch.cat([re, im], 1).transpose(1, 2)  # (N, T, 2B)
        y = torch.matmul(spec, self.basis.to(spec.dtype))  # (N, T, blocks*hop)
        y = y.reshape(n, frames, self.blocks, self.hop_length)
        out = None
        for j in range(self.blocks):
            piece = F.pad(y[:, :, j, :], (0, 0, j, self.blocks - 1 - j))
            out = piece if out is None else out + piece
        return out.reshape(n, (frames + self.blocks - 1) * self.hop_length)

    def _factorized(self, re, im):
        p, q = self.split
        frames = int(re.shape[-1])
        k2n, nb = self.k2n, int(re.shape[1])
        re = re * self.weights[:nb]
        im = im * self.weights[:nb]
        if k2n * p > nb:
            re = F.pad(re, (0, 0, 0, k2n * p - nb))
            im = F.pad(im, (0, 0, 0, k2n * p - nb))
        x = torch.cat([re.reshape(-1, k2n, p * frames), im.reshape(-1, k2n, p * frames)], 1)  # rows [c, k2]
        y = torch.matmul(self.stage1, x)                     # (N, 2Q [n2, c'], P*T)
        y = y.reshape(-1, q, 2 * p, frames)                  # (N, Q n2, 2P [c', k1], T)
        y = torch.matmul(self.stage2, y)                     # (N, Q n2, P n1, T); n = Q*n1 + n2
        h = self.hop_length // q
        y = y.reshape(-1, q, self.blocks, h, frames)         # n1 = H*j + r
        out = None
        for j in range(self.blocks):
            piece = F.pad(y[:, :, j], (j, self.blocks - 1 - j))  # (N, Q, H, T + blocks - 1)
            out = piece if out is None else out + piece
        # sample = hop*m + Q*r + n2 with m the padded frame index
        return out.permute(0, 3, 2, 1).reshape(-1, (frames + self.blocks - 1) * self.hop_length)

    def forward(self, re: torch.Tensor, im: torch.Tensor, length: int):
        frames = int(re.shape[-1])
        if int(re.shape[1]) > self.n_bins:
            re, im = re[:, :self.n_bins], im[:, :self.n_bins]
        out = self._dense(re, im) if self.split is None else self._factorized(re, im)
        out = out * self._envelope(frames).to(out.dtype)
        start = self.n_fft // 2
        avail = out.shape[-1] - start
        if length > avail:
            out = F.pad(out, (0, length - avail))
        return out[:, start:start + length]
