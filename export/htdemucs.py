"""HTDemucs (demucs v4) as an ONNX-exportable module.

`OnnxHTDemucs(model, chunk_samples)` wraps an upstream `demucs.htdemucs.HTDemucs` (eval mode) and reproduces its
`forward` for a fixed input length, sharing the upstream submodules (encoder, decoder, tencoder, tdecoder,
freq_emb, channel up/downsamplers and the cross-transformer's weights), with these changes:

- Spectrogram as real/imag pairs via `ripper_export.stft`: the frames upstream keeps (`[2:2+le]` of a centred STFT
  of the reflect-padded signal) are exactly the uncentred frames of that padded signal, so the analysis is
  `RealSTFT(center=False)` of it, only `nfft//2` bins (the Nyquist bin upstream drops is never computed). At
  n_fft 4096 / hop 1024 both transforms use the factorised (64 x 64 Cooley-Tukey) DFT: about 7 GFLOP per segment
  instead of 114 GFLOP for the dense basis (half of the whole model's arithmetic).
  The inverse is `RealISTFT` on the frames padded by two zero frames each side (as upstream `_ispec` does, which
  matters for the window envelope at the edges), then the same crop. No complex tensors anywhere.
- Complex-as-channels layout `[L.re, L.im, R.re, R.im]` (upstream `_magnitude`/`_mask` with `cac=True`).
- The transformer runs with plain matmul + softmax attention using the upstream layers' weights (no
  `nn.MultiheadAttention` fused path, no `einops`), and its positional embeddings are precomputed constants for the
  fixed chunk length (the random shift `t_sin_random_shift` must be 0, as in the released models).
- Numerics: ONNX Runtime's long float32 reductions (InstanceNormalization for GroupNorm, ReduceMean for `std`) over
  hundreds of thousands of elements cost about 50 dB of parity at the released 7.8 s segment (70 dB instead of
  120 dB). The input normalisation and every GroupNorm with large groups (DConv of the outer time layers, the
  transformer's `norm_out`) are computed with staged sums instead (`_mean_std`, `_AccurateGroupNorm`). This
  happens on a private deep copy of the model, so the caller's (reference) model is left untouched.
- All shape logic is resolved in Python at construction (a shape probe on the meta device); the batch axis stays
  dynamic in the traced graph.
- `Fraction` segment: the training length is computed once, `int(segment * samplerate)`.

Input shorter than the training length (`chunk_samples < int(segment * samplerate)`) is zero-padded on the right
to the training length and the output cropped back, as upstream does (`use_train_segment=True`).

Only the configuration HTDemucs v4 uses is supported: `cac=True` (Wiener filtering never applies), dense attention
(no sparse/xformers), positional embedding "sin" (without random shift), "cape" (eval) or "scaled". Others raise
`UnsupportedModelError`.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from .stft import RealISTFT, RealSTFT

__all__ = ["OnnxHTDemucs", "UnsupportedModelError", "training_length"]


class UnsupportedModelError(ValueError):
    """The upstream model uses an option the exportable wrapper does not implement."""


def training_length(model) -> int:
    """`int(model.segment * model.samplerate)`: the length upstream pads every input to (use_train_segment)."""
    return int(model.segment * model.samplerate)


def _check_supported(model) -> None:
    from demucs.hdemucs import MultiWrap
    from demucs.htdemucs import HTDemucs

    if not isinstance(model, HTDemucs):
        raise UnsupportedModelError(f"expected demucs.htdemucs.HTDemucs, got {type(model).__name__}")
    if not model.cac:
        raise UnsupportedModelError("only complex-as-channels HTDemucs (cac=True) is supported")
    if model.hop_length != model.nfft // 4:
        raise UnsupportedModelError("hop_length must be nfft // 4")
    if any(isinstance(m, MultiWrap) for m in model.modules()):
        raise UnsupportedModelError("multi_freqs (MultiWrap layers) is not supported")
    ct = model.crosstransformer
    if ct is not None:
        if ct.emb == "sin" and ct.sin_random_shift:
            raise UnsupportedModelError(
                f"t_sin_random_shift={ct.sin_random_shift}: upstream inference is random; only 0 is supported")
        if ct.emb not in ("sin", "cape", "scaled"):
            raise UnsupportedModelError(f"unknown transformer embedding {ct.emb!r}")
        for layer in list(ct.layers) + list(ct.layers_t):
            if getattr(layer, "sparse", False):
                raise UnsupportedModelError("sparse attention (t_sparse_*_attn) is not supported")
            mha = layer.self_attn if hasattr(layer, "self_attn") else layer.cross_attn
            if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim \
                    or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
                raise UnsupportedModelError("unsupported attention configuration in the transformer")


def _divisor_near(n: int, target: float) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if abs(math.log(c / target)) < abs(math.log(best / target)):
                    best = c
    return best


def _sum_stages(n: int) -> tuple[int, int, int] | None:
    """n = a*b*c with each factor near n**(1/3) (at most 4x it), or None when n has no such factorisation."""
    a = _divisor_near(n, n ** (1 / 3))
    b = _divisor_near(n // a, math.sqrt(n // a))
    c = n // a // b
    return (a, b, c) if max(a, b, c) <= 4 * n ** (1 / 3) + 1 else None


def _accurate_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all non-batch axes of a fixed-shape tensor, as (B,), in three short stages.

    One long ReduceSum/ReduceMean (millions of elements) in ONNX Runtime accumulates enough float32 error to cost
    tens of dB of parity (`std` over a 7.8 s spectrogram was off by 5e-5 relative); summing blocks of about
    n**(1/3) elements at a time keeps it at torch's accuracy. The blocks are an exact factorisation of n when one
    exists (no padding copy of a tensor of millions of elements), else n is zero-padded to a cube.
    """
    n = 1
    for d in x.shape[1:]:
        n *= int(d)
    x = x.reshape(-1, n)
    stages = _sum_stages(n)
    if stages is None:
        b = max(1, int(math.ceil(n ** (1 / 3))))
        while b ** 3 < n:
            b += 1
        if b ** 3 > n:
            x = F.pad(x, (0, b ** 3 - n))
        stages = (b, b, b)
    return x.reshape(-1, *stages).sum(-1).sum(-1).sum(-1)


def _mean_std(x: torch.Tensor):
    """Mean and unbiased std over all non-batch axes (keepdim), like `x.mean(dims)`, `x.std(dims)` upstream."""
    n = 1
    for d in x.shape[1:]:
        n *= int(d)
    view = (-1,) + (1,) * (x.dim() - 1)
    mean = (_accurate_sum(x) / n).reshape(view)
    dev = x - mean
    std = torch.sqrt(_accurate_sum(dev * dev) / (n - 1)).reshape(view)
    return mean, std


class _AccurateGroupNorm(nn.Module):
    """Drop-in for `nn.GroupNorm` (and demucs' channel-last `MyGroupNorm`) sharing its affine parameters.

    ONNX exports GroupNorm as InstanceNormalization, whose long float32 reductions in ONNX Runtime lose about 50 dB
    of parity when a group holds hundreds of thousands of elements (DConv in the first time layer, the transformer's
    `norm_out`). Large groups use the staged sums of `_accurate_sum`; small ones keep `F.group_norm`.
    """

    SMALL = 32768

    def __init__(self, gn: nn.GroupNorm, channel_last: bool):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = gn.num_groups, gn.num_channels, gn.eps
        self.weight, self.bias = gn.weight, gn.bias  # shared Parameters (or None)
        self.channel_last = channel_last

    def forward(self, x):
        if self.channel_last:
            x = x.transpose(1, 2)
        n = 1
        for d in x.shape[1:]:
            n *= int(d)
        per_group = n // self.num_groups
        if per_group <= self.SMALL:
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            shape = [int(d) for d in x.shape[1:]]
            g = x.reshape(-1, per_group)
            mean = (_accurate_sum(g) / per_group).reshape(-1, 1)
            dev = g - mean
            var = (_accurate_sum(dev * dev) / per_group).reshape(-1, 1)
            y = (dev / torch.sqrt(var + self.eps)).reshape([-1] + shape)
            if self.weight is not None:
                affine = [1, self.num_channels] + [1] * (len(shape) - 1)
                y = y * self.weight.reshape(affine) + self.bias.reshape(affine)
        if self.channel_last:
            y = y.transpose(1, 2)
        return y


def _replace_group_norms(module: nn.Module) -> None:
    from demucs.transformer import MyGroupNorm

    for name, child in list(module.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, _AccurateGroupNorm(child, channel_last=isinstance(child, MyGroupNorm)))
        else:
            _replace_group_norms(child)


class _EncoderProbe(nn.Module):
    def __init__(self, wrapper: "OnnxHTDemucs"):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, mix):
        x, xt, *_ = self.wrapper._encode(mix)
        return x, xt


class OnnxHTDemucs(nn.Module):
    """`forward(mix: (B, C, chunk_samples)) -> (B, S, C, chunk_samples)`, equal to upstream `HTDemucs.forward`."""

    def __init__(self, model: nn.Module, chunk_samples: int | None = None, explain: bool = False):
        """explain: also return the two terms HTDemucs sums, `(B, 3S, C, T)` = output, time branch, spectral branch
        (`--explain`: what each branch contributed to each stem)."""
        super().__init__()
        _check_supported(model)
        self.explain = bool(explain)
        # a private copy, so that swapping its GroupNorms leaves the caller's (reference) model untouched
        model = copy.deepcopy(model).float().eval()
        _replace_group_norms(model)
        self.model = model
        self.sources = list(model.sources)
        self.audio_channels = int(model.audio_channels)
        self.samplerate = int(model.samplerate)
        self.nfft = int(model.nfft)
        self.hop = int(model.hop_length)
        train_len = training_length(model) if model.use_train_segment else None
        if chunk_samples is None:
            if train_len is None:
                raise ValueError("chunk_samples is required when use_train_segment is False")
            chunk_samples = train_len
        chunk_samples = int(chunk_samples)
        if train_len is not None and chunk_samples > train_len:
            raise ValueError(f"chunk_samples {chunk_samples} is longer than the model's training length "
                             f"{train_len} (upstream refuses such inputs)")
        self.chunk_samples = chunk_samples
        # the length every branch actually processes
        self.length = train_len if train_len is not None else chunk_samples
        self.le = int(math.ceil(self.length / self.hop))
        self.pad = self.hop // 2 * 3
        if self.pad + self.le * self.hop - self.length >= self.length:
            raise ValueError(f"length {self.length} too short for the spectrogram's reflect padding")
        n_bins = self.nfft // 2
        self.stft = RealSTFT(self.nfft, self.hop, normalized=True, n_bins=n_bins, center=False)
        self.istft = RealISTFT(self.nfft, self.hop, normalized=True, n_bins=n_bins)
        self.n_bins = n_bins
        self._prepare_transformer()

    # ------------------------------------------------------------------ setup
    def _probe_shapes(self):
        probe = _EncoderProbe(self)
        meta = {k: v.to("meta") for k, v in probe.named_parameters()}
        meta.update({k: v.to("meta") for k, v in probe.named_buffers()})
        x = torch.zeros(1, self.audio_channels, self.chunk_samples, device="meta")
        with torch.no_grad():
            x, xt = torch.func.functional_call(probe, meta, (x,), strict=False)
        return tuple(x.shape), tuple(xt.shape)

    def _prepare_transformer(self):
        ct = self.model.crosstransformer
        self._tokens = None
        if ct is None:
            return
        from demucs.transformer import create_2d_sin_embedding

        (_, _, fr, t1), (_, _, t2) = self._probe_shapes()
        dim = ct.layers[0].linear1.in_features
        self._fr, self._t1, self._t2 = fr, t1, t2
        with torch.no_grad():
            pos2d = create_2d_sin_embedding(dim, fr, t1, "cpu", ct.max_period)  # (1, C, Fr, T1)
            pos2d = pos2d.permute(0, 3, 2, 1).reshape(1, t1 * fr, dim)  # tokens ordered (t1, fr)
            was = ct.training
            ct.eval()
            pos1d = ct._get_pos_embedding(t2, 1, dim, "cpu")  # (T2, 1, C)
            ct.train(was)
            pos1d = pos1d.permute(1, 0, 2).reshape(1, t2, dim)
        w = float(ct.weight_pos_embed)
        self.register_buffer("pos_emb_2d", (w * pos2d).float().detach().clone(), persistent=False)
        self.register_buffer("pos_emb_1d", (w * pos1d).float().detach().clone(), persistent=False)

    # ------------------------------------------------------------------ spectrogram
    def _spec(self, mix):
        """(B, C, L) -> cac spectrogram (B, 2C, nfft//2, le), channels [C0.re, C0.im, C1.re, C1.im, ...]."""
        x = F.pad(mix, (self.pad, self.pad + self.le * self.hop - self.length), mode="reflect")
        re, im = self.stft(x.reshape(-1, x.shape[-1]))  # each (B*C, nb, le)
        return torch.stack([re, im], 1).reshape(-1, 2 * self.audio_channels, self.n_bins, self.le)

    def _ispec(self, x):
        """(N, 2, nfft//2, le) -> (N, length)."""
        re = F.pad(x[:, 0], (2, 2))
        im = F.pad(x[:, 1], (2, 2))
        total = self.hop * self.le + 2 * self.pad
        y = self.istft(re, im, total)
        return y[:, self.pad:self.pad + self.length]

    # ------------------------------------------------------------------ branches
    def _encode(self, mix):
        m = self.model
        if self.length > self.chunk_samples:
            mix = F.pad(mix, (0, self.length - self.chunk_samples))
        x = self._spec(mix)
        mean, std = _mean_std(x)
        x = (x - mean) / (1e-5 + std)
        xt = mix
        meant, stdt = _mean_std(xt)
        xt = (xt - meant) / (1e-5 + stdt)

        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(int(x.shape[-1]))
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(int(xt.shape[-1]))
                tenc = m.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                frs = torch.arange(int(x.shape[-2]), device=x.device)
                emb = m.freq_emb(frs).t()[None, :, :, None]
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        return x, xt, saved, saved_t, lengths, lengths_t, (mean, std, meant, stdt)

    def _attention(self, mha: nn.MultiheadAttention, q_in, kv_in, t_q: int, t_k: int, self_attn: bool):
        c = mha.embed_dim
        h = mha.num_heads
        d = c // h
        w, b = mha.in_proj_weight, mha.in_proj_bias
        if self_attn:
            q, k, v = F.linear(q_in, w, b).split(c, dim=-1)
        else:
            q = F.linear(q_in, w[:c], None if b is None else b[:c])
            k, v = F.linear(kv_in, w[c:], None if b is None else b[c:]).split(c, dim=-1)
        q = q.reshape(-1, t_q, h, d).transpose(1, 2) * (d ** -0.5)
        k = k.reshape(-1, t_k, h, d).permute(0, 2, 3, 1)
        v = v.reshape(-1, t_k, h, d).transpose(1, 2)
        a = torch.softmax(torch.matmul(q, k), dim=-1)
        o = torch.matmul(a, v).transpose(1, 2).reshape(-1, t_q, c)
        return F.linear(o, mha.out_proj.weight, mha.out_proj.bias)

    @staticmethod
    def _ff(layer, x):
        return layer.linear2(layer.activation(layer.linear1(x)))

    def _self_layer(self, layer, x, t: int):
        if layer.norm_first:
            x = x + layer.gamma_1(self._attention(layer.self_attn, layer.norm1(x), None, t, t, True))
            x = x + layer.gamma_2(self._ff(layer, layer.norm2(x)))
            if layer.norm_out is not None:
                x = layer.norm_out(x)
        else:
            x = layer.norm1(x + layer.gamma_1(self._attention(layer.self_attn, x, None, t, t, True)))
            x = layer.norm2(x + layer.gamma_2(self._ff(layer, x)))
        return x

    def _cross_layer(self, layer, q, k, t_q: int, t_k: int):
        if layer.norm_first:
            x = q + layer.gamma_1(self._attention(layer.cross_attn, layer.norm1(q), layer.norm2(k), t_q, t_k, False))
            x = x + layer.gamma_2(self._ff(layer, layer.norm3(x)))
            if layer.norm_out is not None:
                x = layer.norm_out(x)
        else:
            x = layer.norm1(q + layer.gamma_1(self._attention(layer.cross_attn, q, k, t_q, t_k, False)))
            x = layer.norm2(x + layer.gamma_2(self._ff(layer, x)))
        return x

    def _transformer(self, x, xt):
        ct = self.model.crosstransformer
        fr, t1, t2 = self._fr, self._t1, self._t2
        n1 = t1 * fr
        c = x.shape[1]
        x = x.permute(0, 3, 2, 1).reshape(-1, n1, c)  # b c fr t1 -> b (t1 fr) c
        x = ct.norm_in(x) + self.pos_emb_2d
        xt = xt.transpose(1, 2)
        xt = ct.norm_in_t(xt) + self.pos_emb_1d
        for idx in range(ct.num_layers):
            if idx % 2 == ct.classic_parity:
                x = self._self_layer(ct.layers[idx], x, n1)
                xt = self._self_layer(ct.layers_t[idx], xt, t2)
            else:
                old_x = x
                x = self._cross_layer(ct.layers[idx], x, xt, n1, t2)
                xt = self._cross_layer(ct.layers_t[idx], xt, old_x, t2, n1)
        x = x.reshape(-1, t1, fr, c).permute(0, 3, 2, 1)
        xt = xt.transpose(1, 2)
        return x, xt

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, xt, saved, saved_t, lengths, lengths_t, (mean, std, meant, stdt) = self._encode(mix)
        if m.crosstransformer is not None:
            if m.bottom_channels:
                _, c, f, t = x.shape
                x = m.channel_upsampler(x.reshape(-1, int(c), int(f) * int(t)))
                x = x.reshape(-1, m.bottom_channels, int(f), int(t))
                xt = m.channel_upsampler_t(xt)
            x, xt = self._transformer(x, xt)
            if m.bottom_channels:
                x = m.channel_downsampler(x.reshape(-1, m.bottom_channels, int(f) * int(t)))
                x = x.reshape(-1, int(c), int(f), int(t))
                xt = m.channel_downsampler_t(xt)

        offset = m.depth - len(m.tdecoder)
        for idx, decode in enumerate(m.decoder):
            skip = saved.pop(-1)
            x, pre = decode(x, skip, lengths.pop(-1))
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    pre = pre[:, :, 0]
                    xt, _ = tdec(pre, None, length_t)
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), length_t)
        assert not saved and not saved_t and not lengths_t

        n_src, n_ch = len(self.sources), self.audio_channels
        x = x.reshape(-1, n_src, 2 * n_ch, self.n_bins, self.le)
        x = x * std[:, None] + mean[:, None]
        x = self._ispec(x.reshape(-1, 2, self.n_bins, self.le))
        x = x.reshape(-1, n_src, n_ch, self.length)
        xt = xt.reshape(-1, n_src, n_ch, self.length)
        xt = xt * stdt[:, None] + meant[:, None]
        out = xt + x
        if self.explain:
            out = torch.cat([out, xt, x], dim=1)
        if self.length > self.chunk_samples:
            out = out[..., :self.chunk_samples]
        return out
