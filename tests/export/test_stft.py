import numpy as np
import pytest
import torch

from ripper_export.stft import RealISTFT, RealSTFT


@pytest.mark.parametrize("n_fft,hop,win,normalized,length", [
    (4096, 1024, 4096, True, 40000),   # htdemucs
    (2048, 441, 2048, False, 44100),   # Mel-Band RoFormer
    (512, 128, 400, False, 5000),      # win_length < n_fft
])
def test_matches_torch(n_fft, hop, win, normalized, length):
    torch.manual_seed(0)
    x = torch.randn(3, length)
    window = torch.hann_window(win)
    ref = torch.stft(x, n_fft, hop, win, window=window, center=True, pad_mode="reflect",
                     normalized=normalized, return_complex=True)
    re, im = RealSTFT(n_fft, hop, win, normalized)(x)
    assert torch.allclose(re, ref.real, atol=1e-3 * ref.abs().max())
    assert torch.allclose(im, ref.imag, atol=1e-3 * ref.abs().max())

    z = torch.randn_like(ref)
    back_ref = torch.istft(z, n_fft, hop, win, window=window, center=True, normalized=normalized, length=length)
    back = RealISTFT(n_fft, hop, win, normalized)(z.real, z.imag, length)
    err = (back - back_ref).norm() / back_ref.norm()
    assert err < 1e-5, err


def test_istft_round_trip_fewer_bins():
    """Bins above n_bins are zero: dropping the Nyquist bin equals padding it back with zeros."""
    x = torch.randn(2, 9000)
    re, im = RealSTFT(1024, 256, n_bins=512)(x)
    z = torch.complex(torch.nn.functional.pad(re, (0, 0, 0, 1)), torch.nn.functional.pad(im, (0, 0, 0, 1)))
    ref = torch.istft(z, 1024, 256, window=torch.hann_window(1024), center=True, length=9000)
    out = RealISTFT(1024, 256, n_bins=512)(re, im, 9000)
    assert torch.allclose(out, ref, atol=1e-5)
