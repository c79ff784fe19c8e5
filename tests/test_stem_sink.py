"""StemLayout (where stems go, templates) and StemSink (a model that returns NaN/Inf fails the track, nothing is
published; what the row records about the stems)."""
import numpy as np
import pytest
import soundfile as sf

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


def test_layout_default_templates_and_refusals(tmp_path):
    from ripper_dist.stem_sink import DEFAULT_TEMPLATE, check_template
    layout = StemLayout(tmp_path, "htdemucs", "flac")
    assert layout.template == DEFAULT_TEMPLATE
    assert layout.paths("song", ["vocals"], "/in/song.mp3") == {"vocals": tmp_path / "htdemucs" / "song" / "vocals.flac"}
    custom = StemLayout(tmp_path, "kim", "wav", "{track}.{trackext}/{model}-{stem}.{ext}")
    assert custom.paths("a", ["vocals", "other"], "x/a.ogg")["other"] == tmp_path / "a.ogg" / "kim-other.wav"
    assert custom.folders(["a", "b"], ["vocals"], ["a.wav", "b.mp3"]) == {tmp_path / "a.wav", tmp_path / "b.mp3"}
    for bad, why in [("{track}.{ext}", "{stem}"), ("{stem}.{ext}", "{track}"), ("{track}/{stem}.{codec}", "codec"),
                     ("/abs/{track}/{stem}", "relative"), ("../{track}/{stem}", "relative"), ("{track/{stem}", "")]:
        with pytest.raises(ValueError, match="--filename"):
            check_template(bad)


def test_row_fields_peak_and_rescale_gain(tmp_path):
    paths = StemLayout(tmp_path, "m", "wav").paths("t", ["loud", "quiet"])
    sink = StemSink(paths, model_rate=44100, in_rate=22050, frames=1000, input_channels=1, model_channels=2,
                    output=StemOutput("wav", "PCM_16", "rescale"))
    block = np.zeros((2, 2, 2000), np.float32)
    block[0, :, 100:900] = 2.0  # plateaus: the resampler keeps their level
    block[1, :, 100:900] = 0.5
    sink.write(block)
    sink.close()
    f = sink.row_fields()
    assert (f["out_sample_rate"], f["out_channels"]) == (22050, 1)
    assert f["stem_peak_dbfs"]["quiet"] < 0 < f["stem_peak_dbfs"]["loud"]
    assert f["stem_gain"]["quiet"] == 1.0 and f["stem_gain"]["loud"] == pytest.approx(1 / (1.01 * 10 ** (f["stem_peak_dbfs"]["loud"] / 20)), rel=2e-3)  # dBFS kept to 0.01 dB
    assert sf.info(paths["loud"]).frames == 1000 and sf.info(paths["loud"]).samplerate == 22050
