"""StemSink: a model that returns NaN/Inf fails the track; nothing is published."""
import numpy as np
import pytest

from ripper_dist.stem_sink import NonFiniteOutputError, StemLayout, StemOutput, StemSink


def test_non_finite_model_output_fails_and_leaves_no_file(tmp_path):
    paths = StemLayout(tmp_path, "m", "wav", "{track}/{stem}.{ext}").paths("t", ["vocals", "other"])
    sink = StemSink(paths, model_rate=44100, in_rate=44100, frames=1000, input_channels=2, model_channels=2,
                    output=StemOutput("wav", "FLOAT", "rescale"))
    block = np.zeros((2, 2, 1000), np.float32)
    sink.write(block[..., :500])
    block[1, 0, 700] = np.nan
    with pytest.raises(NonFiniteOutputError, match="NaN or Inf"):
        sink.write(block[..., 500:])
    sink.abort()
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())
