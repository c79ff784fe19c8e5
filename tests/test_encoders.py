"""Output formats through soundfile and PyAV: what is available, bitrates as asked, rates the codec takes."""
import numpy as np
import pytest
import soundfile as sf

from ripper_dist.audio import write_stem
from ripper_dist.encoders import FORMATS, _mp3_compression, available, output_rate, unavailable


def _tone(seconds=2.0, rate=44100):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.stack([x, 0.8 * x]).astype(np.float32)


def test_formats_available_here_and_their_rates():
    assert set(available()) == set(FORMATS)  # the wheels bundle libsndfile with MP3/Opus, and PyAV is a test extra
    assert unavailable("mp3") is None and unavailable("m4a") is None
    assert output_rate("opus", 44100) == 48000 and output_rate("opus", 24000) == 24000
    assert output_rate("mp3", 22050) == 22050
    assert _mp3_compression(320, 44100) == 0.0 and _mp3_compression(32, 44100) == 1.0
    assert _mp3_compression(160, 22050) == 0.0  # MPEG-2 range below 32 kHz


@pytest.mark.parametrize("fmt,kbps", [("mp3", 320), ("mp3", 96), ("m4a", 192), ("m4a", 64)])
def test_bitrate_is_what_was_asked(tmp_path, fmt, kbps):
    path = write_stem(tmp_path / f"x.{fmt}", _tone(), in_rate=44100, fmt=fmt, bitrate=kbps)
    measured = path.stat().st_size * 8 / 2.0 / 1000
    assert 0.8 * kbps < measured < 1.25 * kbps, measured


def test_lossy_files_decode_to_the_signal(tmp_path):
    x = _tone()
    for fmt in ("mp3", "ogg"):
        y = sf.read(write_stem(tmp_path / f"x.{fmt}", x, in_rate=44100, fmt=fmt), dtype="float32")[0].T
        n = min(x.shape[1], y.shape[1])
        corr = np.corrcoef(x[0, 4096:n - 4096], y[0, 4096:n - 4096])[0, 1]
        assert y.shape[0] == 2 and abs(y.shape[1] - x.shape[1]) < 2048 and corr > 0.99, (fmt, corr)
    import av
    with av.open(str(write_stem(tmp_path / "x.m4a", x, in_rate=44100, fmt="m4a"))) as c:
        y = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    assert y.shape[0] == 2 and np.abs(y).max() > 0.2
