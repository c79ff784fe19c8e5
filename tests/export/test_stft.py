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


@pytest.mark.parametrize("n_fft,hop,win,normalized,n_bins", [
    (4096, 1024, None, True, 2048),    # htdemucs (no Nyquist bin)
    (1024, 256, None, False, None),    # with the Nyquist bin (K2 not a multiple of P)
    (512, 128, 400, False, None),      # win_length < n_fft
])
def test_factorized_matches_dense(n_fft, hop, win, normalized, n_bins):
    torch.manual_seed(0)
    x = torch.randn(2, 5 * n_fft + 37)
    fast = RealSTFT(n_fft, hop, win, normalized, n_bins=n_bins)
    dense = RealSTFT(n_fft, hop, win, normalized, n_bins=n_bins, factorized=False)
    assert fast.split is not None and dense.split is None
    (re, im), (re0, im0) = fast(x), dense(x)
    scale = max(re0.abs().max(), im0.abs().max())
    assert re.shape == re0.shape and torch.allclose(re, re0, atol=1e-5 * scale)
    assert torch.allclose(im, im0, atol=1e-5 * scale)
    length = x.shape[-1]
    ifast = RealISTFT(n_fft, hop, win, normalized, n_bins=n_bins)
    idense = RealISTFT(n_fft, hop, win, normalized, n_bins=n_bins, factorized=False)
    y, y0 = ifast(re0, im0, length), idense(re0, im0, length)
    assert (y - y0).norm() / y0.norm() < 1e-5
    if n_bins is None:  # all bins kept: the round trip is exact
        assert (y - x).norm() / x.norm() < 1e-5


def test_center_false_frames_the_input_as_given():
    torch.manual_seed(1)
    x = torch.randn(3, 4096 * 3)
    re, im = RealSTFT(4096, 1024, normalized=True, n_bins=2048, center=False)(x)
    ref = torch.stft(x, 4096, 1024, window=torch.hann_window(4096), center=False, normalized=True,
                     return_complex=True)[:, :2048]
    assert re.shape == ref.real.shape == (3, 2048, 9)
    tol = 1e-4 * ref.abs().max()
    assert torch.allclose(re, ref.real, atol=tol) and torch.allclose(im, ref.imag, atol=tol)
    # the dense kernel stays available (Conv1d layout [re bins; im bins])
    k = RealSTFT(4096, 1024, normalized=True, n_bins=2048, center=False).kernel
    z = torch.nn.functional.conv1d(x[:, None], k, stride=1024)
    assert torch.allclose(z[:, :2048], re, atol=tol)


def test_factorized_refused_when_impossible():
    with pytest.raises(ValueError):
        RealSTFT(2048, 441, factorized=True)
    assert RealISTFT(2048, 441).split is None   # RoFormer's hop: dense
